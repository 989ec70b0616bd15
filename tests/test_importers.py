"""Importing routing logs (JSONL written by inference-engine hooks) into tierflow-trace v1 files.

The expected arrays are worked out here from the JSONL with plain Python, independently of the importer.
The fixtures come from tests/fixtures/import/make_fixtures.py; a test below checks they still match it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest

from tierflow.errors import TierflowError, TraceError
from tierflow.trace.importers import IMPORT_FORMATS, import_trace, layer_from_file_name

FIXTURES = Path(__file__).parent / "fixtures" / "import"
PER_STEP = FIXTURES / "per_step_mixtral.jsonl"
PER_LAYER = FIXTURES / "per_layer"


# ----------------------------------------------------------------------------------------- helpers


def run_import(fmt, inputs, out, *, model=None, num_experts=None):
    """Import and return (meta, warnings)."""
    warnings = []
    meta = import_trace(fmt, list(inputs), out, model=model, num_experts=num_experts, warn=warnings.append)
    return meta, warnings


def read_trace(path) -> dict:
    """Every dataset and root attribute of a trace file, as numpy values."""
    with h5py.File(path, "r") as file:
        contents = {name: file[name][()] for name in file if isinstance(file[name], h5py.Dataset)}
        contents["attrs"] = dict(file.attrs)
    return contents


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path, records) -> Path:
    """Records as JSONL; a str record is written as the raw line (for malformed input)."""
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def step(problem_id=1, layer=0, token_idx=0, experts=(0, 1), gating_probs=(0.6, 0.3), **extra) -> dict:
    """A per-step record; pass a field as None to leave it out."""
    record = {"problem_id": problem_id, "layer": layer, "token_idx": token_idx,
              "experts": list(experts) if isinstance(experts, tuple) else experts,
              "gating_probs": list(gating_probs) if isinstance(gating_probs, tuple) else gating_probs, **extra}
    return {name: value for name, value in record.items() if value is not None}


def expected_per_step(records: list[dict]) -> dict:
    """What the importer should make of per-step records: complete tokens in the order the log first shows
    them, each request's tokens in token_idx order (a request's tokens take its tokens' first lines, sorted)."""
    layers = sorted({record["layer"] for record in records})
    requests = list(dict.fromkeys(record["problem_id"] for record in records))
    by_token, first_line = defaultdict(dict), {}
    for line, record in enumerate(records):
        token = record["problem_id"], record["token_idx"]
        by_token[token][record["layer"]] = record
        first_line.setdefault(token, line)
    complete = [key for key, found in by_token.items() if len(found) == len(layers)]
    position = {}
    for request in requests:
        own = sorted((key for key in complete if key[0] == request), key=lambda key: key[1])
        for key, line in zip(own, sorted(first_line[key] for key in own), strict=True):
            position[key] = line
    tokens = sorted(complete, key=position.__getitem__)
    return {
        "experts": np.array([[by_token[token][layer]["experts"] for layer in layers] for token in tokens]),
        "gate_scores": np.array([[by_token[token][layer]["gating_probs"] for layer in layers] for token in tokens],
                                dtype=np.float32),
        "sequence_id": np.array([requests.index(problem_id) for problem_id, _ in tokens]),
        "token_index": np.array([token_idx for _, token_idx in tokens]),
        "layer_ids": np.array(layers),
        "dropped": len(by_token) - len(tokens),
    }


def assert_same_scores(stored: np.ndarray, expected_float32: np.ndarray) -> None:
    """Gate scores as the importer hands them over (float32), rounded to whatever precision the file keeps."""
    np.testing.assert_array_equal(stored, expected_float32.astype(stored.dtype))


def layer_rows(records: list[dict]) -> list[dict]:
    """Per-layer records unbatched into one dict per token row."""
    rows = []
    for record in records:
        batched = isinstance(record["topk_ids"][0], list)
        count = len(record["topk_ids"]) if batched else 1
        for i in range(count):
            rows.append({name: (value[i] if batched and isinstance(value, list) else value)
                         for name, value in record.items()})
    return rows


# ----------------------------------------------------------------------------------------- per-step


def test_formats_are_the_two_documented_shapes():
    assert sorted(IMPORT_FORMATS) == ["per-layer-files", "per-step"]


def test_per_step_fixture_round_trips(tmp_path):
    out = tmp_path / "mixtral.h5"
    meta, warnings = run_import("per-step", [PER_STEP], out, num_experts=8)
    expected = expected_per_step(read_jsonl(PER_STEP))
    trace = read_trace(out)

    np.testing.assert_array_equal(trace["experts"], expected["experts"])
    assert_same_scores(trace["gate_scores"], expected["gate_scores"])
    np.testing.assert_array_equal(trace["sequence_id"], expected["sequence_id"])
    np.testing.assert_array_equal(trace["token_index"], expected["token_index"])
    # Requests 17, 4, 9 join one after another and decode side by side, as the log lists their tokens;
    # positions continue after each prompt.
    assert trace["sequence_id"].tolist() == [0, 0, 1, 0, 1, 2, 1, 2, 2]
    assert trace["token_index"].tolist() == [21, 22, 9, 23, 10, 14, 11, 15, 16]
    assert "phase" not in trace
    assert (meta.num_tokens, meta.num_layers, meta.num_experts, meta.top_k) == (9, 32, 8, 2)
    assert meta.path == str(out) and meta.model == "unknown"
    assert trace["attrs"]["layer_ids"].tolist() == list(range(32))
    assert meta.source == "tierflow trace import --format per-step: per_step_mixtral.jsonl"
    assert expected["dropped"] == 1


def test_per_step_drops_the_cut_off_final_step_with_one_warning(tmp_path):
    _, warnings = run_import("per-step", [PER_STEP], tmp_path / "t.h5", num_experts=8)
    assert len(warnings) == 1
    assert warnings[0].startswith("dropped 1 incomplete token")


def test_per_step_remaps_layer_ids_and_records_them(tmp_path):
    # Only the MoE layers 3, 7 and 11 are logged, and not in layer order.
    records = [step(token_idx=0, layer=layer, experts=[layer % 4, 4 + layer % 3]) for layer in (11, 3, 7)]
    meta, _ = run_import("per-step", [write_jsonl(tmp_path / "log.jsonl", records)], tmp_path / "t.h5",
                         num_experts=8)
    trace = read_trace(tmp_path / "t.h5")
    assert meta.num_layers == 3
    assert trace["attrs"]["layer_ids"].tolist() == [3, 7, 11]
    assert trace["experts"].tolist() == [[[3, 4], [3, 5], [3, 6]]]


def test_per_step_keeps_the_logs_interleaving_and_each_requests_token_order(tmp_path):
    """Requests decoding side by side stay interleaved as the log shows them (replay follows file order, so a
    cache meets them as the engine did); a request's tokens are put in token_idx order in its own places."""
    records = [step("b", token_idx=5), step("a", token_idx=2), step("b", token_idx=4), step("a", token_idx=1)]
    run_import("per-step", [write_jsonl(tmp_path / "log.jsonl", records)], tmp_path / "t.h5", num_experts=8)
    trace = read_trace(tmp_path / "t.h5")
    assert trace["sequence_id"].tolist() == [0, 1, 0, 1]
    assert trace["token_index"].tolist() == [4, 1, 5, 2]
    # Two requests over two layers, one engine step at a time: tokens alternate between them.
    records = [step(request, layer=layer, token_idx=token, experts=[token % 8, 7 - token % 8])
               for token in range(3) for layer in range(2) for request in ("x", "y")]
    run_import("per-step", [write_jsonl(tmp_path / "steps.jsonl", records)], tmp_path / "s.h5", num_experts=8)
    trace = read_trace(tmp_path / "s.h5")
    assert trace["sequence_id"].tolist() == [0, 1, 0, 1, 0, 1]
    assert trace["token_index"].tolist() == [0, 0, 1, 1, 2, 2]
    expected = expected_per_step(records)
    np.testing.assert_array_equal(trace["experts"], expected["experts"])


def test_per_step_concatenates_several_files(tmp_path):
    lines = PER_STEP.read_text().splitlines(keepends=True)
    first, second = tmp_path / "part1.jsonl", tmp_path / "part2.jsonl"
    first.write_text("".join(lines[:150]))
    second.write_text("".join(lines[150:]))
    meta, warnings = run_import("per-step", [first, second], tmp_path / "split.h5", num_experts=8)
    run_import("per-step", [PER_STEP], tmp_path / "whole.h5", num_experts=8)

    split, whole = read_trace(tmp_path / "split.h5"), read_trace(tmp_path / "whole.h5")
    for name in ("experts", "gate_scores", "sequence_id", "token_index"):
        np.testing.assert_array_equal(split[name], whole[name])
    assert meta.source.endswith("part1.jsonl, part2.jsonl")
    assert len(warnings) == 1


def test_per_step_ignores_blank_lines_and_optional_gating_probs(tmp_path):
    records = [step(layer=0, gating_probs=None), "", "   ", step(layer=1, gating_probs=None)]
    meta, _ = run_import("per-step", [write_jsonl(tmp_path / "log.jsonl", records)], tmp_path / "t.h5",
                         num_experts=8)
    assert (meta.num_tokens, meta.num_layers, meta.has_gate_scores) == (1, 2, False)


def test_rows_keep_the_order_the_log_lists_them_whatever_their_weights(tmp_path):
    """DeepSeek-V3 selects by score plus a bias the logged weights leave out, and some top-k kernels do not sort:
    a row is stored as logged, weights beside their experts, with no warning."""
    records = [step(token_idx=0, experts=[1, 5], gating_probs=[0.25, 0.75]),
               step(token_idx=1, experts=[2, 3], gating_probs=[0.5, 0.5])]
    _, warnings = run_import("per-step", [write_jsonl(tmp_path / "log.jsonl", records)], tmp_path / "t.h5",
                             num_experts=8)
    trace = read_trace(tmp_path / "t.h5")
    assert trace["experts"][:, 0].tolist() == [[1, 5], [2, 3]]
    assert trace["gate_scores"][:, 0].tolist() == [[0.25, 0.75], [0.5, 0.5]]
    assert warnings == []


def test_request_ids_of_different_json_types_are_different_requests(tmp_path):
    """true, 1 and 1.0 are one dictionary key in Python; in a log they name three requests."""
    records = [step(problem_id=True), step(problem_id=1), step(problem_id=1.0), step(problem_id="1")]
    meta, _ = run_import("per-step", [write_jsonl(tmp_path / "log.jsonl", records)], tmp_path / "t.h5",
                         num_experts=8)
    assert read_trace(tmp_path / "t.h5")["sequence_id"].tolist() == [0, 1, 2, 3]


def test_num_experts_is_inferred_with_a_warning_when_not_given(tmp_path):
    records = [step(experts=[0, 5], gating_probs=[0.5, 0.4])]
    meta, warnings = run_import("per-step", [write_jsonl(tmp_path / "log.jsonl", records)], tmp_path / "t.h5")
    assert meta.num_experts == 6
    assert warnings == ["num_experts not given: inferred 6 from the largest expert id seen"]


# ----------------------------------------------------------------------------------------- per-layer-files


def test_per_layer_fixture_round_trips(tmp_path):
    files = sorted(PER_LAYER.glob("*.jsonl"), key=layer_from_file_name)
    meta, warnings = run_import("per-layer-files", files, tmp_path / "olmoe.h5", num_experts=64)
    trace = read_trace(tmp_path / "olmoe.h5")
    rows = {layer_from_file_name(path): layer_rows(read_jsonl(path)) for path in files}
    first = rows[0]

    expected_experts = np.stack([[row["topk_ids"] for row in rows[layer]] for layer in (0, 5, 10, 15)], axis=1)
    expected_scores = np.stack([[row["topk_weights"] for row in rows[layer]] for layer in (0, 5, 10, 15)], axis=1)
    np.testing.assert_array_equal(trace["experts"], expected_experts)
    assert_same_scores(trace["gate_scores"], expected_scores.astype(np.float32))
    requests = list(dict.fromkeys(row["request_id"] for row in first))
    assert trace["sequence_id"].tolist() == [requests.index(row["request_id"]) for row in first]
    assert trace["phase"].tolist() == [0 if row["phase"] == "prefill" else 1 for row in first]
    # The batched prefill of request 7 is the first five rows.
    assert trace["phase"][:5].tolist() == [0] * 5 and trace["sequence_id"][:5].tolist() == [0] * 5
    assert trace["attrs"]["layer_ids"].tolist() == [0, 5, 10, 15]
    assert (meta.num_tokens, meta.num_layers, meta.top_k, meta.has_token_index) == (13, 4, 8, False)
    assert warnings == []


def test_per_layer_accepts_a_folder(tmp_path):
    meta, _ = run_import("per-layer-files", [PER_LAYER], tmp_path / "t.h5", num_experts=64)
    assert meta.num_layers == 4
    assert meta.source == ("tierflow trace import --format per-layer-files: "
                           "layer_0.jsonl, layer_10.jsonl, layer_15.jsonl, layer_5.jsonl")


@pytest.mark.parametrize("name, layer", [
    ("layer_3.jsonl", 3), ("layer3.jsonl", 3), ("expert_trace_layer_12.jsonl", 12), ("3.jsonl", 3),
    ("olmoe_v2_layer_07.jsonl", 7),
])
def test_layer_comes_from_the_last_integer_in_the_file_name(tmp_path, name, layer):
    path = write_jsonl(tmp_path / name, [{"topk_ids": [0, 1]}])
    run_import("per-layer-files", [path], tmp_path / "t.h5", num_experts=4)
    assert read_trace(tmp_path / "t.h5")["attrs"]["layer_ids"].tolist() == [layer]


def test_per_layer_without_ids_or_phase_is_one_sequence(tmp_path):
    for layer in (1, 2):
        write_jsonl(tmp_path / f"layer_{layer}.jsonl", [{"topk_ids": [[0, 1], [2, 3]]}, {"topk_ids": [1, 3]}])
    meta, _ = run_import("per-layer-files", [tmp_path], tmp_path / "t.h5", num_experts=4)
    trace = read_trace(tmp_path / "t.h5")
    assert trace["sequence_id"].tolist() == [0, 0, 0]
    assert (meta.has_phase, meta.has_gate_scores) == (False, False)


def test_per_layer_batched_record_with_ids_per_row_and_is_prefill(tmp_path):
    records = [{"seq_id": ["x", "y"], "is_prefill": [True, False], "topk_ids": [[0, 1], [2, 3]]},
               {"seq_id": "y", "is_prefill": False, "topk_ids": [3, 0]}]
    write_jsonl(tmp_path / "layer_0.jsonl", records)
    run_import("per-layer-files", [tmp_path], tmp_path / "t.h5", num_experts=4)
    trace = read_trace(tmp_path / "t.h5")
    assert trace["sequence_id"].tolist() == [0, 1, 1]
    assert trace["phase"].tolist() == [0, 1, 1]


# ----------------------------------------------------------------------------------------- catalog model


class FakeModel:
    num_routed_experts, top_k, num_moe_layers = 8, 2, 32


@pytest.fixture
def fake_catalog(monkeypatch):
    """A catalog that knows one model, so these tests do not depend on the catalog's numbers."""
    import tierflow.catalog

    def get_model(name):
        if name != "fake-mixtral":
            raise TierflowError(f"unknown model {name!r}")
        return FakeModel()

    monkeypatch.setattr(tierflow.catalog, "get_model", get_model, raising=False)


def test_model_sets_num_experts_and_name(tmp_path, fake_catalog):
    meta, warnings = run_import("per-step", [PER_STEP], tmp_path / "t.h5", model="fake-mixtral")
    assert (meta.model, meta.num_experts) == ("fake-mixtral", 8)
    assert len(warnings) == 1  # the dropped token; num_experts was not inferred


def test_model_with_other_top_k_is_an_error(tmp_path, fake_catalog, monkeypatch):
    monkeypatch.setattr(FakeModel, "top_k", 4)
    with pytest.raises(TraceError, match="top-2 routing in the log, but model 'fake-mixtral' is top-4"):
        run_import("per-step", [PER_STEP], tmp_path / "t.h5", model="fake-mixtral")


def test_model_with_other_layer_count_is_an_error(tmp_path, fake_catalog, monkeypatch):
    monkeypatch.setattr(FakeModel, "num_moe_layers", 24)
    with pytest.raises(TraceError, match="32 layers in the log, but model 'fake-mixtral' has 24 MoE layers"):
        run_import("per-step", [PER_STEP], tmp_path / "t.h5", model="fake-mixtral")
    assert not (tmp_path / "t.h5").exists()


def test_model_and_contradicting_num_experts_is_an_error(tmp_path, fake_catalog):
    with pytest.raises(TierflowError, match="num_experts 16 contradicts model 'fake-mixtral'"):
        run_import("per-step", [PER_STEP], tmp_path / "t.h5", model="fake-mixtral", num_experts=16)


def test_expert_ids_are_checked_against_the_model(tmp_path, fake_catalog):
    path = write_jsonl(tmp_path / "log.jsonl", [step(experts=[0, 8])])
    with pytest.raises(TraceError, match=r"log.jsonl: line 1: expert id 8 .* out of range \[0, 8\)"):
        run_import("per-step", [path], tmp_path / "t.h5", model="fake-mixtral")


def test_real_catalog_mixtral_matches_the_fixture(tmp_path):
    meta, _ = run_import("per-step", [PER_STEP], tmp_path / "t.h5", model="mixtral-8x7b")
    assert (meta.model, meta.num_experts, meta.num_layers, meta.top_k) == ("mixtral-8x7b", 8, 32, 2)


# ----------------------------------------------------------------------------------------- malformed input

MALFORMED_PER_STEP = {
    "invalid JSON": ([step(), '{"problem_id": 1, "layer": 1,'], "line 2: invalid JSON"),
    "not an object": (["[1, 2]"], "line 1: expected a JSON object, got an array"),
    "missing field": ([step(token_idx=None)], "line 1: missing field 'token_idx'"),
    "layer not an integer": ([step(layer="3")], "line 1: 'layer' must be a non-negative integer"),
    "negative token_idx": ([step(token_idx=-1)], "line 1: 'token_idx' must be a non-negative integer"),
    "experts not a list": ([step(experts="0,1")], "line 1: 'experts' must be a non-empty list"),
    "expert not an integer": ([step(experts=[0, 1.5])], "line 1: 'experts' holds 1.5, not a non-negative"),
    "weight beyond half precision": ([step(gating_probs=[1e6, 0.5])],
                                     "line 1: 'gating_probs' holds 1000000.0, beyond the 65504"),
    "problem_id not a scalar": ([step(problem_id=[1])], "line 1: 'problem_id' must be a JSON scalar"),
    "ragged top-k": ([step(), step(layer=1, experts=[0, 1, 2], gating_probs=[0.3, 0.2, 0.1])],
                     "line 2: ragged top-k: 3 experts in a row, but earlier rows have 2"),
    "expert out of range": ([step(experts=[0, 8])], r"line 1: expert id 8 in 'experts' is out of range \[0, 8\)"),
    "expert repeated": ([step(experts=[3, 3])], "line 1: expert id repeated within one row of 'experts'"),
    "gating_probs length": ([step(gating_probs=[0.9])], "line 1: 'gating_probs' has 1 values for 2 experts"),
    "gating_probs not finite": (['{"problem_id": 1, "layer": 0, "token_idx": 0, "experts": [0, 1], '
                                 '"gating_probs": [NaN, 0.1]}'], "line 1: 'gating_probs' holds NaN"),
    "gating_probs dropped midway": ([step(), step(layer=1, gating_probs=None)],
                                    "line 2: missing field 'gating_probs', which the first record"),
    "duplicate record": ([step(), step(layer=1), step()],
                         "line 3: second record for problem_id 1, token_idx 0, layer 0"),
    "no complete tokens": ([step(token_idx=0, layer=0), step(token_idx=1, layer=1)], "no complete tokens"),
    "empty file": (["", "  "], "no records: the file is empty"),
    "number of thousands of digits": (['{"problem_id": 1, "layer": ' + "9" * 5000 + "}"],
                                      r"line 1: invalid JSON \(a number of thousands of digits\)"),
    "nested too deep": (['{"problem_id": 1, "experts": ' + "[" * 100_000 + "]" * 100_000 + "}"],
                        r"line 1: invalid JSON \(arrays or objects nested too deep\)"),
    "negative weight": ([step(gating_probs=[0.5, -0.2])],
                        "line 1: 'gating_probs' holds -0.2: router weights .* are >= 0, not logits"),
}


@pytest.mark.parametrize("records, message", MALFORMED_PER_STEP.values(), ids=MALFORMED_PER_STEP.keys())
def test_malformed_per_step_input_names_the_file(tmp_path, records, message):
    path = write_jsonl(tmp_path / "log.jsonl", records)
    with pytest.raises(TraceError, match=message) as caught:
        run_import("per-step", [path], tmp_path / "t.h5", num_experts=8)
    assert caught.value.path == str(path)
    assert "\n" not in str(caught.value)


MALFORMED_PER_LAYER = {
    "topk_ids missing": ({"layer_0.jsonl": [{"topk_weights": [0.5, 0.5]}]}, "line 1: missing field 'topk_ids'"),
    "ragged rows in a batch": ({"layer_0.jsonl": [{"topk_ids": [[0, 1], [0, 1, 2]]}]}, "line 1: ragged top-k"),
    "ragged across files": ({"layer_0.jsonl": [{"topk_ids": [0, 1]}], "layer_1.jsonl": [{"topk_ids": [0, 1, 2]}]},
                            "line 1: ragged top-k"),
    "weights per row": ({"layer_0.jsonl": [{"topk_ids": [[0, 1], [2, 3]], "topk_weights": [[0.5, 0.5]]}]},
                        "line 1: 'topk_weights' has 1 values for 2 token rows"),
    "weights length": ({"layer_0.jsonl": [{"topk_ids": [0, 1], "topk_weights": [0.5]}]},
                       "line 1: 'topk_weights' has 1 values for 2 experts"),
    "weights in one file only": ({"layer_0.jsonl": [{"topk_ids": [0, 1], "topk_weights": [0.5, 0.4]}],
                                  "layer_1.jsonl": [{"topk_ids": [0, 1]}]},
                                 "line 1: missing field 'topk_weights', which the first record "
                                 r"\(layer_0.jsonl line 1\) has"),
    "unknown phase": ({"layer_0.jsonl": [{"topk_ids": [0, 1], "phase": "warmup"}]},
                      "line 1: 'phase' must be one of 'prefill', 'decode'"),
    "is_prefill not boolean": ({"layer_0.jsonl": [{"topk_ids": [0, 1], "is_prefill": 1}]},
                               "line 1: 'is_prefill' must be true or false"),
    "phase an object": ({"layer_0.jsonl": [{"topk_ids": [0, 1], "phase": {"a": 1}}]},
                        "line 1: 'phase' must be one of 'prefill', 'decode'"),
    "phases of a batch nested": ({"layer_0.jsonl": [{"topk_ids": [[0, 1], [2, 3]], "phase": [["decode"], "decode"]}]},
                                 "line 1: 'phase' must be one of 'prefill', 'decode'"),
    "expert id too large": ({"layer_0.jsonl": [{"topk_ids": [0, 2**31 - 1]}]},
                            "line 1: expert id 2147483647 in 'topk_ids' is beyond the 1,048,576 experts"),
    "layer number too large": ({"layer_99999999999999999999999.jsonl": [{"topk_ids": [0, 1]}]},
                               "layer 99999999999999999999999 in the file name is beyond 65,535"),
    "request ids per row": ({"layer_0.jsonl": [{"topk_ids": [[0, 1], [2, 3]], "request_id": [1, 2, 3]}]},
                            "line 1: 'request_id' has 3 values for 2 token rows"),
    "request ids disagree": ({"layer_0.jsonl": [{"topk_ids": [0, 1], "request_id": "a"}],
                              "layer_1.jsonl": [{"topk_ids": [0, 1], "request_id": "b"}]},
                             "token row 0 has sequence id \"b\" but layer_0.jsonl has sequence id \"a\""),
    "no layer number": ({"gate.jsonl": [{"topk_ids": [0, 1]}]}, "no layer number in the file name"),
    "same layer twice": ({"layer_3.jsonl": [{"topk_ids": [0, 1]}], "layer03.jsonl": [{"topk_ids": [0, 1]}]},
                         "layer 3 again"),
}


@pytest.mark.parametrize("files, message", MALFORMED_PER_LAYER.values(), ids=MALFORMED_PER_LAYER.keys())
def test_malformed_per_layer_input_names_the_file(tmp_path, files, message):
    for name, records in files.items():
        write_jsonl(tmp_path / name, records)
    with pytest.raises(TraceError, match=message) as caught:
        run_import("per-layer-files", [tmp_path / name for name in files], tmp_path / "t.h5", num_experts=8)
    assert Path(caught.value.path).name in files
    assert "\n" not in str(caught.value)


def test_per_layer_files_of_different_lengths_name_files_and_counts(tmp_path):
    write_jsonl(tmp_path / "layer_0.jsonl", [{"topk_ids": [[0, 1], [1, 2], [2, 3]]}])
    write_jsonl(tmp_path / "layer_1.jsonl", [{"topk_ids": [[0, 1], [1, 2], [2, 3]]}])
    write_jsonl(tmp_path / "layer_2.jsonl", [{"topk_ids": [[0, 1], [1, 2]]}])
    with pytest.raises(TraceError) as caught:
        run_import("per-layer-files", [tmp_path], tmp_path / "t.h5", num_experts=4)
    assert str(caught.value) == (f"{tmp_path}: layer files hold different numbers of token rows: "
                                 "3 in layer_0.jsonl, layer_1.jsonl; 2 in layer_2.jsonl")


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(TraceError, match="missing.jsonl: cannot read: No such file or directory"):
        run_import("per-step", [path], tmp_path / "t.h5", num_experts=8)


def test_folder_without_jsonl_files_is_named(tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    with pytest.raises(TraceError, match=r"logs: folder holds no \*.jsonl files"):
        run_import("per-layer-files", [folder], tmp_path / "t.h5", num_experts=8)


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(step()).encode() + b"\n" + b'{"problem_id": "caf\xe9"}\n')
    with pytest.raises(TraceError, match="latin1.jsonl: line 2: not UTF-8 text"):
        run_import("per-step", [path], tmp_path / "t.h5", num_experts=8)


def test_a_byte_order_mark_opening_a_log_is_read_past_and_one_elsewhere_is_an_error(tmp_path):
    """A Windows editor's BOM opens the file, as scenario files may; inside a line it is not JSON."""
    records = [step(), step(layer=1, experts=[2, 3])]
    plain = write_jsonl(tmp_path / "plain.jsonl", records)
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    run_import("per-step", [plain], tmp_path / "plain.h5", num_experts=8)
    run_import("per-step", [marked], tmp_path / "marked.h5", num_experts=8)
    plain_trace, marked_trace = read_trace(tmp_path / "plain.h5"), read_trace(tmp_path / "marked.h5")
    plain_trace.pop("attrs"), marked_trace.pop("attrs")  # the source names the file
    assert plain_trace.keys() == marked_trace.keys()
    assert all(np.array_equal(value, marked_trace[name]) for name, value in plain_trace.items())
    inside = tmp_path / "inside.jsonl"
    lines = plain.read_bytes().splitlines(keepends=True)
    inside.write_bytes(lines[0] + b"\xef\xbb\xbf" + lines[1])
    with pytest.raises(TraceError, match="inside.jsonl: line 2: invalid JSON"):
        run_import("per-step", [inside], tmp_path / "inside.h5", num_experts=8)


def test_unknown_format_lists_the_valid_ones(tmp_path):
    with pytest.raises(TraceError, match="unknown import format 'csv'; valid formats: per-layer-files, per-step"):
        run_import("csv", [PER_STEP], tmp_path / "t.h5")


def test_bad_log_leaves_no_output(tmp_path):
    path = write_jsonl(tmp_path / "log.jsonl", [step(), step(layer=1, experts=[2, 2])])
    with pytest.raises(TraceError):
        run_import("per-step", [path], tmp_path / "t.h5", num_experts=8)
    assert not (tmp_path / "t.h5").exists()


def test_failure_while_writing_leaves_neither_output_nor_temporary_file(tmp_path, monkeypatch):
    import tierflow.trace.format as trace_format

    def failing_validation(path):
        raise TraceError(path, "simulated failure")

    monkeypatch.setattr(trace_format, "validate_trace", failing_validation)
    out = tmp_path / "out" / "t.h5"
    with pytest.raises(TraceError, match="simulated failure"):
        run_import("per-step", [PER_STEP], out, num_experts=8)
    assert list(out.parent.iterdir()) == []


def test_fixtures_match_their_generator(tmp_path):
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.main(tmp_path)
    for made in tmp_path.rglob("*.jsonl"):
        assert made.read_bytes() == (FIXTURES / made.relative_to(tmp_path)).read_bytes(), made.name


# ----------------------------------------------------------------------------------------- command line


def test_cli_import_writes_a_trace_and_warns_on_stderr(tmp_path):
    from click.testing import CliRunner

    from tierflow.cli import cli

    out = tmp_path / "t.h5"
    result = CliRunner().invoke(
        cli, ["trace", "import", "--format", "per-step", str(PER_STEP), "--out", str(out), "--num-experts", "8"]
    )
    assert result.exit_code == 0, result.output
    assert "tierflow: warning: dropped 1 incomplete token" in result.output
    assert f"wrote {out}: 9 tokens, 32 layers, top-2" in result.output
    assert read_trace(out)["experts"].shape == (9, 32, 2)


def test_cli_import_per_layer_folder(tmp_path):
    from click.testing import CliRunner

    from tierflow.cli import cli

    out = tmp_path / "t.h5"
    result = CliRunner().invoke(
        cli, ["trace", "import", "--format", "per-layer-files", str(PER_LAYER), "--out", str(out),
              "--num-experts", "64"]
    )
    assert result.exit_code == 0, result.output
    assert read_trace(out)["experts"].shape == (13, 4, 8)


def test_cli_malformed_input_is_one_error_line_and_status_2(tmp_path):
    path = write_jsonl(tmp_path / "log.jsonl", [step(), "{not json"])
    done = subprocess.run(
        [sys.executable, "-m", "tierflow", "trace", "import", "--format", "per-step", str(path),
         "--out", str(tmp_path / "t.h5")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"tierflow: error: {path}: line 2: invalid JSON")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "t.h5").exists()


def test_out_that_is_an_input_is_refused_and_left_alone(tmp_path):
    from conftest import assert_one_line_error, run_cli

    log = tmp_path / "log.jsonl"
    log.write_bytes(PER_STEP.read_bytes())
    result = run_cli("trace", "import", "--format", "per-step", log, "--out", log, "--num-experts", "8")
    assert_one_line_error(result, "is an input file")
    assert log.read_bytes() == PER_STEP.read_bytes()


def test_an_unwritable_out_is_refused_before_the_log_is_parsed(tmp_path):
    from conftest import assert_one_line_error, run_cli

    log = tmp_path / "log.jsonl"
    log.write_text("not json\n")  # parsing it would be the error reported
    (tmp_path / "a_file").write_text("x")
    result = run_cli("trace", "import", "--format", "per-step", log, "--out", tmp_path / "a_file" / "t.h5")
    assert_one_line_error(result, "cannot write", "is a file, not a folder")


@pytest.mark.parametrize(("fmt", "inputs", "kwargs"), [
    ("per-step", [PER_STEP], {"model": "mixtral-8x7b", "num_experts": None}),
    ("per-layer-files", [PER_LAYER], {"model": None, "num_experts": 64})])
def test_progress_hears_of_every_byte_read_once(fmt, inputs, kwargs, tmp_path, monkeypatch):
    """The callback is made for the files left once folders are expanded, and hears of all their bytes (in
    chunks of PROGRESS_LINES lines); the trace is the one an import without progress writes."""
    from tierflow.trace import importers

    monkeypatch.setattr(importers, "PROGRESS_LINES", 7)
    seen, calls = [], []

    def progress(files):
        seen.extend(files)
        return calls.append

    import_trace(fmt, inputs, tmp_path / "a.h5", warn=lambda _: None, progress=progress, **kwargs)
    files = sorted(PER_LAYER.glob("*.jsonl")) if fmt == "per-layer-files" else [PER_STEP]
    assert seen == files and sum(calls) == sum(f.stat().st_size for f in files)
    assert max(calls) < max(f.stat().st_size for f in files)  # in chunks, not once a file
    import_trace(fmt, inputs, tmp_path / "b.h5", warn=lambda _: None, **kwargs)
    first, second = read_trace(tmp_path / "a.h5"), read_trace(tmp_path / "b.h5")
    first_attrs, second_attrs = first.pop("attrs"), second.pop("attrs")
    assert first.keys() == second.keys() and first_attrs.keys() == second_attrs.keys()
    for name in first:
        assert np.array_equal(first[name], second[name]), name
    for name in first_attrs:
        assert np.array_equal(first_attrs[name], second_attrs[name]), name


def test_import_cli_shows_progress_unless_quiet(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from tierflow.cli import cli
    from tierflow.trace import commands

    monkeypatch.setattr(commands, "PROGRESS_MIN_IMPORT_BYTES", 0)
    args = ["trace", "import", "--format", "per-step", str(PER_STEP), "--model", "mixtral-8x7b"]
    shown = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "a.h5")], catch_exceptions=False)
    quiet = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "b.h5"), "--quiet"], catch_exceptions=False)
    assert shown.exit_code == quiet.exit_code == 0
    assert "importing" in shown.stderr and "importing" not in quiet.stderr and "wrote" in quiet.stderr
