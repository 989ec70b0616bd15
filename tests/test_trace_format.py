"""tierflow-trace v1: round trips, streaming, atomic writes, and every kind of bad file."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_one_line_error, run_cli
from tierflow.errors import TierflowError, TraceError
from tierflow.trace.format import (
    GATE_SCORE_DTYPE,
    TraceWriter,
    expert_dtype,
    open_trace,
    validate_trace,
    write_trace,
)


@st.composite
def traces(draw):
    """A small valid trace: shapes, optional fields and chunking all vary."""
    num_experts = draw(st.sampled_from([1, 2, 8, 64, 256, 300, 70000]))
    top_k = draw(st.integers(1, min(num_experts, 8)))
    num_layers = draw(st.integers(1, 5))
    num_tokens = draw(st.integers(0, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    experts = np.array(
        [[rng.choice(num_experts, top_k, replace=False) for _ in range(num_layers)] for _ in range(num_tokens)],
        dtype=np.int64,
    ).reshape(num_tokens, num_layers, top_k)
    sequence_id = np.sort(rng.integers(0, 4, num_tokens))
    optional = {}
    if draw(st.booleans()):
        # Router weights in any order: a row need not descend (DeepSeek-V3's bias-corrected selection).
        optional["gate_scores"] = rng.random((num_tokens, num_layers, top_k)).astype(np.float32)
    if draw(st.booleans()):
        optional["phase"] = rng.integers(0, 2, num_tokens).astype(np.uint8)
    if draw(st.booleans()):
        optional["token_index"] = np.concatenate([np.arange((sequence_id == s).sum()) for s in range(4)])
    if draw(st.booleans()):
        optional["embedding"] = rng.standard_normal((4, 3)).astype(np.float32)
    return experts, sequence_id, num_experts, optional


@given(trace=traces(), chunk_tokens=st.integers(1, 17))
def test_write_then_stream_round_trips(tmp_path_factory, trace, chunk_tokens):
    experts, sequence_id, num_experts, optional = trace
    path = tmp_path_factory.mktemp("rt") / "t.h5"
    write_trace(path, experts, sequence_id, model="m", num_experts=num_experts, source="test", **optional)

    meta = validate_trace(path)
    assert (meta.num_tokens, meta.num_layers, meta.top_k, meta.num_experts) == (
        experts.shape[0], experts.shape[1], experts.shape[2], num_experts,
    )
    with open_trace(path) as reader:
        chunks = list(reader.chunks(chunk_tokens, gate_scores=True, phase=True, token_index=True))
        assert all(len(c) <= chunk_tokens for c in chunks)
        assert [c.start for c in chunks] == list(range(0, len(sequence_id), chunk_tokens))
        joined = {
            "experts": np.concatenate([c.experts for c in chunks]) if chunks else np.empty((0, *experts.shape[1:])),
            "sequence_id": np.concatenate([c.sequence_id for c in chunks]) if chunks else np.empty(0),
        }
        np.testing.assert_array_equal(joined["experts"], experts)
        np.testing.assert_array_equal(joined["sequence_id"], sequence_id)
        assert reader._file["experts"].dtype == expert_dtype(num_experts)
        for name in ("phase", "token_index"):
            if name in optional and chunks:
                np.testing.assert_array_equal(np.concatenate([getattr(c, name) for c in chunks]), optional[name])
        if "gate_scores" in optional and chunks:
            stored = np.concatenate([c.gate_scores for c in chunks])
            assert stored.dtype == GATE_SCORE_DTYPE
            np.testing.assert_allclose(stored, optional["gate_scores"], rtol=1e-3, atol=1e-4)
        if "embedding" in optional:
            np.testing.assert_array_equal(reader.embedding(), optional["embedding"])
        else:
            assert reader.embedding() is None


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.int32, np.int64, np.uint32])
def test_reader_accepts_any_integer_expert_dtype(tmp_path, dtype):
    path = tmp_path / "t.h5"
    write_trace(path, [[[0, 3]], [[2, 1]]], [0, 0], model="m", num_experts=4, source="s")
    with h5py.File(path, "r+") as f:
        data = f["experts"][()]
        del f["experts"]
        f["experts"] = data.astype(dtype)
    assert validate_trace(path).num_tokens == 2


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    path = tmp_path / "t.h5"
    with pytest.raises(RuntimeError):
        with TraceWriter(path, model="m", num_layers=1, num_experts=4, top_k=2, source="s") as writer:
            writer.append(np.array([[[0, 1]]]), np.array([0]))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_validating_writer_never_publishes_an_invalid_file(tmp_path):
    path = tmp_path / "t.h5"
    with pytest.raises(TraceError, match="outside"):
        write_trace(path, [[[0, 9]]], [0], model="m", num_experts=4, source="s", validate=True)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_ids_its_stored_type_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="ids must be in"):
        write_trace(tmp_path / "t.h5", [[[0, -1]]], [0], model="m", num_experts=4, source="s")


def test_writer_rejects_fields_it_was_not_opened_with(tmp_path):
    with TraceWriter(tmp_path / "t.h5", model="m", num_layers=1, num_experts=4, top_k=1, source="s") as writer:
        with pytest.raises(ValueError, match="gate_scores"):
            writer.append(np.zeros((1, 1, 1)), np.zeros(1), gate_scores=np.zeros((1, 1, 1)))


# ------------------------------------------------------------------------------------------ bad files


def _valid(path, **overrides):
    fields = dict(
        experts=np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]]),
        sequence_id=np.array([0, 0]),
        token_index=np.array([0, 1]),
    )
    fields.update(overrides)
    write_trace(path, fields.pop("experts"), fields.pop("sequence_id"), model="m", num_experts=4, source="s",
                **fields)
    return path


def _edit(path, action):
    with h5py.File(path, "r+") as f:
        action(f)
    return path


def _replace(name, value):
    def action(f):
        del f[name]
        f[name] = value

    return action


BAD_FILES = {
    "missing": (lambda p: p.with_name("absent.h5"), "no such file"),
    "directory": (lambda p: p.parent, "directory"),
    "not hdf5": (lambda p: (p.write_text("experts,layer\n1,2\n"), p)[1], "not an HDF5 file"),
    "no experts": (lambda p: _edit(_valid(p), lambda f: f.__delitem__("experts")), "missing required dataset 'experts'"),
    "no sequence_id": (lambda p: _edit(_valid(p), lambda f: f.__delitem__("sequence_id")), "'sequence_id'"),
    "no top_k": (lambda p: _edit(_valid(p), lambda f: f.attrs.__delitem__("top_k")), "missing required attribute"),
    "wrong format": (lambda p: _edit(_valid(p), lambda f: f.attrs.__setitem__("format", "other")), "'format'"),
    "wrong version": (lambda p: _edit(_valid(p), lambda f: f.attrs.__setitem__("version", 7)), "version 7"),
    "float experts": (lambda p: _edit(_valid(p), _replace("experts", np.zeros((2, 2, 2)))), "integer dtype"),
    "shape vs attrs": (lambda p: _edit(_valid(p), lambda f: f.attrs.__setitem__("top_k", 3)), "shape"),
    "short sequence_id": (lambda p: _edit(_valid(p), _replace("sequence_id", np.zeros(3, int))), "shape"),
    "id too large": (lambda p: _valid(p, experts=np.array([[[0, 4], [2, 3]], [[1, 2], [3, 0]]])), "expert id 4"),
    "negative id": (lambda p: _edit(_valid(p), _replace("experts", np.array([[[0, -1], [2, 3]], [[1, 2], [3, 0]]]))),
                    "expert id -1"),
    "repeat": (lambda p: _valid(p, experts=np.array([[[0, 1], [2, 3]], [[1, 2], [3, 3]]])), "repeated within token 1"),
    "out of order": (lambda p: _valid(p, token_index=np.array([1, 0])), "out of order"),
    "bad phase": (lambda p: _valid(p, phase=np.array([0, 5], dtype=np.uint8)), "phase"),
    "nan gate": (lambda p: _valid(p, gate_scores=np.full((2, 2, 2), np.nan)), "NaN"),
    "embedding rows": (lambda p: _valid(p, sequence_id=np.array([0, 3]), token_index=None,
                                        embedding=np.zeros((2, 4))), "embedding"),
    "nan embedding": (lambda p: _valid(p, embedding=np.array([[0.0, 1.0], [np.nan, 0.0]])),
                      "/sequences/embedding has NaN or infinite values in row 1"),
    "negative phase": (lambda p: _edit(_valid(p), lambda f: f.create_dataset("phase", data=np.array([0, -1], np.int8))),
                       "phase values must be 0 (prefill) or 1 (decode), found -1 at token 1"),
    "negative sequence": (lambda p: _edit(_valid(p), _replace("sequence_id", np.array([0, -2]))),
                          "negative sequence_id -2 at token 1"),
    "experts group": (lambda p: _edit(_valid(p), lambda f: (f.__delitem__("experts"), f.create_group("experts"))),
                      "'experts' must be a dataset, found a group"),
    "experts 1-D": (lambda p: _edit(_valid(p), _replace("experts", np.zeros(4, int))),
                    "dataset 'experts' has shape (4,), expected (tokens, 2, 2)"),
    "corrupt chunk": (lambda p: _corrupt(_valid(p)), "cannot read dataset 'experts'"),
    "flipped gate score": (lambda p: _flip(_valid(p, gate_scores=np.random.default_rng(0).random((2, 2, 2)))),
                           "cannot read dataset 'gate_scores'"),
    "dangling link": (lambda p: _edit(_valid(p), lambda f: (f.__delitem__("experts"),
                                                            f.__setitem__("experts", h5py.SoftLink("/nowhere")))),
                      "'experts' cannot be opened (a link to nothing)"),
    "external link": (lambda p: _edit(_valid(p), lambda f: f.__setitem__("phase", h5py.ExternalLink("missing.h5",
                                                                                                    "/x"))),
                      "'phase' cannot be opened"),
    "scalar sequences": (lambda p: _edit(_valid(p), lambda f: f.create_dataset("sequences", data=1)),
                         "'/sequences' must be a group"),
    "truncated": (lambda p: _truncated(_valid(p)), "cut short"),
    "huge num_experts": (lambda p: _edit(_valid(p), lambda f: f.attrs.__setitem__("num_experts", 2**40)),
                         "attribute 'num_experts' is 1,099,511,627,776, beyond the 1,048,576 tierflow handles"),
    "fifo": (lambda p: (os.mkfifo(p), p)[1], "not a regular file"),
    "model not UTF-8": (lambda p: _edit(_valid(p), lambda f: f.attrs.__setitem__("model", np.bytes_(b"\xff\xfe"))),
                        "attribute 'model' is not UTF-8 text"),
    "model with a newline": (lambda p: _edit(_valid(p), lambda f: f.attrs.__setitem__("model", "deepseek\nr1")),
                             "attribute 'model' holds control characters: 'deepseek\\nr1'"),
    "too many keys": (lambda p: _edit(_valid(p), lambda f: f.attrs.update(num_layers=2**16, num_experts=2**20)),
                      "65,536 layers x 1,048,576 experts are 68,719,476,736 (layer, expert) pairs, beyond the "
                      "16,777,216 tierflow handles"),
    "negative gate": (lambda p: _valid(p, gate_scores=np.array([[[0.5, 0.4], [0.5, -0.1]], [[0.6, 0.4], [0.7, 0.3]]])),
                      "gate_scores holds a negative router weight at token 0, layer 1"),
    "repeated prediction": (lambda p: _valid(p, predicted_experts=np.array([[[0, 1], [2, 2]], [[1, 2], [3, 0]]])),
                            "predicted_experts repeated within token 0, layer 1: [2, 2]"),
    "negative position": (lambda p: _valid(p, token_index=np.array([-3, -2])), "negative token_index -3 at token 0"),
    "sequence beyond int64": (lambda p: _edit(_valid(p), _replace("sequence_id", np.full(2, 2**63 + 1, np.uint64))),
                              "sequence_id 9223372036854775809 at token 0 is beyond 2**63 - 1"),
    "no embedding columns": (lambda p: _edit(_valid(p), lambda f: f.create_dataset("sequences/embedding",
                                                                                   shape=(1, 0), dtype=np.float32)),
                             "'/sequences/embedding' has no columns"),
}


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _flip(path, name="gate_scores"):
    """Flip one byte in the middle of a dataset's first chunk: still valid LZF, so only a checksum tells."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + info.size // 2)
        byte = raw.read(1)
        raw.seek(-1, 1)
        raw.write(bytes([byte[0] ^ 0x40]))
    return path


def _corrupt(path, name="experts"):
    """Overwrite the compressed bytes of the first chunk of a dataset, as a damaged disk would."""
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset)
        raw.write(b"\xff" * info.size)
    return path


# Bad values that every reader of a trace must refuse, not only `trace info`.
BAD_VALUES = ["id too large", "negative id", "repeat", "out of order", "bad phase", "negative phase",
              "negative sequence", "corrupt chunk", "negative position", "sequence beyond int64"]


@pytest.mark.parametrize("case", BAD_VALUES)
def test_streaming_reader_checks_values(tmp_path, case):
    make, fragment = BAD_FILES[case]
    with open_trace(make(tmp_path / "t.h5")) as reader, pytest.raises(TraceError) as error:
        for _ in reader.chunks():
            pass
    assert fragment in str(error.value)


@pytest.mark.parametrize("case", ["nan gate", "embedding rows", "nan embedding", "negative gate",
                                  "repeated prediction"])
def test_streaming_reader_checks_the_fields_it_reads(tmp_path, case):
    make, fragment = BAD_FILES[case]
    with open_trace(make(tmp_path / "t.h5")) as reader, pytest.raises(TraceError) as error:
        for _ in reader.chunks(gate_scores=True, predicted_experts=True):
            pass
        reader.embedding()
    assert fragment in str(error.value)


def test_checks_leave_valid_chunks_as_they_were(tmp_path):
    path = _valid(tmp_path / "t.h5", phase=np.array([0, 1], dtype=np.uint8))
    with open_trace(path) as reader:
        chunk = next(reader.chunks())
    # phase and token_index are read for the checks but handed out only when asked for.
    assert chunk.phase is None and chunk.token_index is None
    assert chunk.experts.tolist() == [[[0, 1], [2, 3]], [[1, 2], [3, 0]]]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_error_line_with_status_2(tmp_path, case):
    make, fragment = BAD_FILES[case]
    path = make(tmp_path / "t.h5")
    result = run_cli("trace", "info", path)
    assert_one_line_error(result, fragment, str(path))


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_trace_error(tmp_path, case):
    make, fragment = BAD_FILES[case]
    with pytest.raises(TraceError, match=None) as error:
        validate_trace(make(tmp_path / "t.h5"))
    assert fragment in str(error.value)


def test_out_of_order_is_found_across_chunks_and_interleaved_sequences(tmp_path):
    experts = np.zeros((6, 1, 1), dtype=int)
    path = _valid(tmp_path / "t.h5", experts=experts, sequence_id=np.array([0, 1, 0, 1, 0, 1]),
                  token_index=np.array([0, 0, 1, 1, 2, 2]))
    assert validate_trace(path, chunk_tokens=1).num_tokens == 6
    bad = _valid(tmp_path / "u.h5", experts=experts, sequence_id=np.array([0, 1, 0, 1, 0, 1]),
                 token_index=np.array([0, 0, 1, 2, 2, 1]))
    with pytest.raises(TraceError, match="sequence 1 tokens out of order at token 5"):
        validate_trace(bad, chunk_tokens=2)


def test_published_files_have_ordinary_permissions(tmp_path):
    import os
    import stat

    path = tmp_path / "t.h5"
    write_trace(path, [[[0, 1]]], [0], model="m", num_experts=4, source="s")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


@given(rows=st.integers(1, 6).flatmap(lambda k: st.lists(
    st.lists(st.integers(0, 3 * k), min_size=k, max_size=k), min_size=1, max_size=5)),
       wide=st.booleans())
def test_repeated_rows_are_found_alike_in_narrow_and_wide_rows(rows, wide):
    """Rows up to top-16 are compared pairwise, wider ones sorted: both find exactly the rows that name an id
    twice (a wide row here is a narrow one padded with distinct ids of its own)."""
    from tierflow.trace.format import _repeated_rows

    k = len(rows[0])
    ids = np.array(rows)[:, None, :]
    if wide:
        padding = 1000 + np.arange(20)  # distinct, and unlike any id drawn
        ids = np.concatenate([ids, np.broadcast_to(padding, (len(rows), 1, 20))], axis=2)
        assert ids.shape[2] == k + 20 > 16
    repeated = _repeated_rows(ids)
    expected = [len(set(row)) < k for row in rows]
    assert (repeated is None) == (not any(expected))
    if repeated is not None:
        assert repeated[:, 0].tolist() == expected


def test_a_wide_top_k_is_checked_and_a_repeat_named_by_its_id(tmp_path):
    """top-4096 of 4096 experts (rows this wide are sorted: their 8 million column pairs took 47 s a token); the
    error names the id that repeats, not the row."""
    k = 4096
    row = np.arange(k)
    write_trace(tmp_path / "ok.h5", row[None, None, :], [0], model="m", num_experts=k, source="s")
    assert validate_trace(tmp_path / "ok.h5").top_k == k
    row[5] = 7
    bad = tmp_path / "bad.h5"
    write_trace(bad, row[None, None, :], [0], model="m", num_experts=k, source="s")
    with pytest.raises(TraceError, match="expert repeated within token 0, layer 0: id 7 twice among 4,096$"):
        validate_trace(bad)


def test_an_embedding_too_large_for_memory_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A sparse dataset declares 4 GiB of embedding in a file of a few kB: refused in one line, not a MemoryError."""
    import tierflow.workload

    path = _edit(_valid(tmp_path / "t.h5"), lambda f: f.create_dataset(
        "sequences/embedding", shape=(1, 2**30), dtype=np.float32, chunks=(1, 2**16)))
    assert path.stat().st_size < 100_000
    monkeypatch.setattr(tierflow.workload, "physical_memory_bytes", lambda: 2**30)
    with open_trace(path) as reader, pytest.raises(TierflowError, match=r"1 x 1,073,741,824\) would need 4\.0 GiB"):
        reader.embedding()


def test_a_path_too_long_for_the_system_is_one_error_line(tmp_path):
    path = tmp_path / ("a" * 300 + ".h5")
    assert_one_line_error(run_cli("trace", "info", path), "File name too long")


def test_a_model_attribute_that_contradicts_the_data_is_warned_about(tmp_path):
    path = _edit(_valid(tmp_path / "t.h5"), lambda f: f.attrs.__setitem__("model", "mixtral-8x7b"))
    result = run_cli("trace", "info", path, "--json", check_status=0)
    assert result.stderr.strip() == (f"tierflow: warning: {path}: the model attribute names mixtral-8x7b (32 MoE "
                                     "layers x 8 experts, top-2), but the trace is 2 x 4, top-2")
    assert result.stdout.startswith("{")
