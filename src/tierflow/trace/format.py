"""tierflow-trace v1: the HDF5 schema for expert-activation traces, its writer, streaming reader and validator.

Layout (the README's "Traces" section):

- root attributes ``format="tierflow-trace"``, ``version=1``, ``model``, ``num_layers`` (MoE layers in the
  file), ``num_experts``, ``top_k``, ``source`` (what produced the file);
- ``experts``: integer ``(num_tokens, num_layers, top_k)``, expert ids in router-score order;
- ``sequence_id``: integer ``(num_tokens,)``, the request each token belongs to;
- optional ``gate_scores``: float ``(num_tokens, num_layers, top_k)``;
- optional ``phase``: uint8 ``(num_tokens,)``, 0 prefill, 1 decode;
- optional ``token_index``: integer ``(num_tokens,)``, the token's position in its sequence; where present, each
  sequence's positions must increase in file order;
- optional ``/sequences/embedding``: float ``(num_sequences, d)``, row ``i`` for sequence id ``i``;
- optional ``predicted_experts``: integer ``(num_tokens, num_layers, top_k)``, row ``[t, l]`` the experts a
  speculative gate predicted for layer ``l + 1`` of token ``t`` while at layer ``l`` (the last layer's row is
  unused), for prefetchers that replay a serving system's own predictions.

Readers stream the file in chunks of tokens, so a reader's own memory stays bounded whatever the trace's length
(what a command keeps of the chunks is its own affair: see the README).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import attrs
import h5py
import numpy as np

from tierflow.atomic import H5Output, discard, new_temporary, publish
from tierflow.errors import TraceError

FORMAT_NAME = "tierflow-trace"
FORMAT_VERSION = 1
# Bounds on a trace's shape: far beyond any MoE (DeepSeek-R1: 58 MoE layers of 256 experts, 14,848 (layer,
# expert) pairs), and small enough that per-(layer, expert) statistics fit in memory: 2**24 pairs are 128 MiB of
# int64 counts (a num_experts of 2**40 asked `trace info` for 128 TiB; 2**16 layers of 2**20 experts for 512 GiB).
MAX_LAYERS = 2**16
MAX_EXPERTS = 2**20
MAX_KEYS = 2**24
# A chunk read holds at most this many routing decisions (tokens x layers x top_k): 16,384 tokens of any catalog
# model (at most 464 a token), fewer of a wider trace, so that a chunk's arrays stay a few tens of MB.
MAX_CHUNK_DECISIONS = 2**24
REQUIRED_ATTRS = ("format", "version", "model", "num_layers", "num_experts", "top_k", "source")
DEFAULT_CHUNK_TOKENS = 16384
# gzip level 1: readable by any HDF5 tool. Higher levels cost several times more for a few percent. Router weights are near-random half floats that gzip shrinks by a fifth at a high CPU cost;
# they take h5py's LZF filter instead (four times faster, about the same size).
# Every chunk carries a Fletcher-32 checksum: LZF has none of its own, so damaged router weights read back as
# wrong numbers instead of an error.
_COMPRESSION = {"compression": "gzip", "compression_opts": 1, "fletcher32": True}
_FLOAT_COMPRESSION = {"compression": "lzf", "shuffle": True, "fletcher32": True}
# Router weights need three significant digits, not seven: half precision halves the file.
GATE_SCORE_DTYPE = np.float16


def expert_dtype(num_experts: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids in [0, num_experts)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_experts - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@attrs.frozen
class TraceMeta:
    """What a trace file says about itself (root attributes plus dataset shapes)."""

    path: str
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    source: str
    num_tokens: int
    has_gate_scores: bool
    has_phase: bool
    has_token_index: bool
    embedding_dim: int | None
    has_predicted_experts: bool = False


@attrs.frozen
class TraceChunk:
    """A run of consecutive tokens: ``start`` is the file index of the first one."""

    start: int
    experts: np.ndarray
    sequence_id: np.ndarray
    gate_scores: np.ndarray | None = None
    phase: np.ndarray | None = None
    token_index: np.ndarray | None = None
    predicted_experts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sequence_id)


# ----------------------------------------------------------------------------------------------- writing


class TraceWriter:
    """Appends tokens to a new trace file; the file appears under its name only when closed cleanly.

    Use as a context manager. Data goes to a temporary file beside ``path`` that is renamed over it on
    success and removed on error, so a reader never sees a half-written trace. With ``validate=True`` the
    finished file is also checked value by value before the rename, so an invalid one never appears.
    ``extra_attrs`` are further root attributes (provenance such as the original layer ids).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model: str,
        num_layers: int,
        num_experts: int,
        top_k: int,
        source: str,
        with_gate_scores: bool = False,
        with_phase: bool = False,
        with_token_index: bool = False,
        with_predicted_experts: bool = False,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        extra_attrs: dict | None = None,
        validate: bool = False,
    ):
        check_shape(path, num_layers, num_experts, top_k)
        self.path = Path(path)
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.num_tokens = 0
        self._validate = validate
        self._tmp = new_temporary(self.path)
        try:
            self._output = H5Output(self._tmp)  # a full disk is a plain OSError, raised once
        except BaseException:  # a full disk, an interrupt: no temporary file is left behind
            discard(self._tmp)
            raise
        self._file = self._output.file
        self._file.attrs.update(
            format=FORMAT_NAME,
            version=FORMAT_VERSION,
            model=model,
            num_layers=num_layers,
            num_experts=num_experts,
            top_k=top_k,
            source=source,
        )
        self._file.attrs.update(extra_attrs or {})
        rows = (num_layers, top_k)
        chunk = max(1, min(chunk_tokens, (1 << 20) // (num_layers * top_k)))
        self._datasets: dict[str, h5py.Dataset] = {
            "experts": self._create("experts", expert_dtype(num_experts), rows, chunk),
            "sequence_id": self._create("sequence_id", np.int64, (), chunk * 8),
        }
        if with_gate_scores:
            self._datasets["gate_scores"] = self._create("gate_scores", GATE_SCORE_DTYPE, rows, chunk,
                                                         _FLOAT_COMPRESSION)
        if with_phase:
            self._datasets["phase"] = self._create("phase", np.uint8, (), chunk * 8)
        if with_token_index:
            self._datasets["token_index"] = self._create("token_index", np.int64, (), chunk * 8)
        if with_predicted_experts:
            self._datasets["predicted_experts"] = self._create("predicted_experts", expert_dtype(num_experts), rows,
                                                               chunk)

    def _create(self, name, dtype, row_shape, chunk_tokens, compression=None) -> h5py.Dataset:
        return self._file.create_dataset(
            name,
            shape=(0, *row_shape),
            maxshape=(None, *row_shape),
            dtype=dtype,
            chunks=(chunk_tokens, *row_shape),
            **(compression or _COMPRESSION),
        )

    def append(self, experts, sequence_id, gate_scores=None, phase=None, token_index=None,
               predicted_experts=None) -> None:
        """Add ``len(sequence_id)`` tokens. Optional fields must be given exactly when the writer has them."""
        fields = {
            "experts": experts,
            "sequence_id": sequence_id,
            "gate_scores": gate_scores,
            "phase": phase,
            "token_index": token_index,
            "predicted_experts": predicted_experts,
        }
        n = len(sequence_id)
        for name, values in fields.items():
            dataset = self._datasets.get(name)
            if (values is None) != (dataset is None):
                state = "was not" if dataset is None else "was"
                raise ValueError(f"{name}: the writer {state} opened with this field")
            if dataset is None:
                continue
            values = np.asarray(values)
            if values.shape != (n, *dataset.shape[1:]):
                raise ValueError(f"{name}: shape {values.shape}, expected {(n, *dataset.shape[1:])}")
            if (name in ("experts", "predicted_experts") and values.size
                    and (values.min() < 0 or values.max() > np.iinfo(dataset.dtype).max)):
                # HDF5 would saturate such ids on the way to the narrow stored type, hiding the error.
                raise ValueError(f"{name}: ids must be in [0, {self.num_experts}) to be stored as {dataset.dtype}")
            dataset.resize(self.num_tokens + n, axis=0)
            dataset[self.num_tokens :] = values
        self.num_tokens += n
        self._output.check()  # a write failed (a full disk): stop now

    def set_embeddings(self, embedding) -> None:
        """Store one row per sequence id for semantic-hint prefetchers."""
        embedding = np.asarray(embedding, dtype=np.float32)
        if embedding.ndim != 2:
            raise ValueError(f"embedding must be 2-D (num_sequences, d), got shape {embedding.shape}")
        self._file.create_dataset("sequences/embedding", data=embedding, **_COMPRESSION)

    def close(self) -> None:
        try:
            self._output.close()  # flushes: a full disk shows here
        except BaseException:
            discard(self._tmp)
            raise
        if self._validate:
            try:
                validate_trace(self._tmp)
            except TraceError as error:
                discard(self._tmp)
                raise TraceError(self.path, error.problem) from None
        publish(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._output.close()
        except OSError:  # the error being handled may be the reason (a full disk): the file goes anyway
            pass
        finally:
            discard(self._tmp)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self.abort()
        if self._output.error is not None and exc is not self._output.error:
            raise self._output.error from None  # a failed write (a full disk) caused the error being handled


def write_trace(
    path,
    experts,
    sequence_id,
    *,
    model: str,
    num_experts: int,
    source: str,
    gate_scores=None,
    phase=None,
    token_index=None,
    embedding=None,
    predicted_experts=None,
    extra_attrs: dict | None = None,
    validate: bool = False,
) -> None:
    """Write a whole in-memory trace at once (small traces, tests, importers); see :class:`TraceWriter`."""
    experts = np.asarray(experts)
    if experts.ndim != 3:
        raise ValueError(f"experts must be (num_tokens, num_layers, top_k), got shape {experts.shape}")
    _, num_layers, top_k = experts.shape
    with TraceWriter(
        path,
        model=model,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        source=source,
        with_gate_scores=gate_scores is not None,
        with_phase=phase is not None,
        with_token_index=token_index is not None,
        with_predicted_experts=predicted_experts is not None,
        extra_attrs=extra_attrs,
        validate=validate,
    ) as writer:
        writer.append(experts, sequence_id, gate_scores, phase, token_index, predicted_experts)
        if embedding is not None:
            writer.set_embeddings(embedding)


# ----------------------------------------------------------------------------------------------- reading


def check_shape(path, num_layers: int, num_experts: int, top_k: int) -> None:
    """A trace's shape within the bounds tierflow handles (:data:`MAX_LAYERS`, :data:`MAX_EXPERTS`,
    :data:`MAX_KEYS`), with ``1 <= top_k <= num_experts``; raises :class:`TraceError`."""
    for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("top_k", top_k)):
        if value < 1:
            raise TraceError(path, f"attribute {name!r} must be >= 1, got {value}")
    for name, value, limit in (("num_layers", num_layers, MAX_LAYERS), ("num_experts", num_experts, MAX_EXPERTS)):
        if value > limit:
            raise TraceError(path, f"attribute {name!r} is {value:,}, beyond the {limit:,} tierflow handles")
    if num_layers * num_experts > MAX_KEYS:
        raise TraceError(path, f"{num_layers:,} layers x {num_experts:,} experts are {num_layers * num_experts:,} "
                               f"(layer, expert) pairs, beyond the {MAX_KEYS:,} tierflow handles")
    if top_k > num_experts:
        raise TraceError(path, f"top_k {top_k} exceeds num_experts {num_experts}")


def _attr(path, attrs_, name, kind):
    value = attrs_[name]
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise TraceError(path, f"attribute {name!r} is not UTF-8 text") from None
    if kind is str:
        if not isinstance(value, str):
            raise TraceError(path, f"attribute {name!r} must be a string, got {type(value).__name__}")
        return value
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TraceError(path, f"attribute {name!r} must be an integer, got {value!r}")
    return int(value)


def _member(path, group, name):
    """``group[name]``, None when absent; a link to nothing (soft, or to a missing file) is a TraceError."""
    if name not in group:
        return None
    try:
        return group[name]
    except (KeyError, OSError):
        raise TraceError(path, f"{name!r} cannot be opened (a link to nothing)") from None


def _check_dataset(path, file, name, *, kind, shape, required=True):
    dataset = _member(path, file, name)
    if dataset is None:
        if required:
            raise TraceError(path, f"missing required dataset {name!r}")
        return None
    if not isinstance(dataset, h5py.Dataset):
        raise TraceError(path, f"{name!r} must be a dataset, found a group")
    if not np.issubdtype(dataset.dtype, kind):
        expected = "an integer" if kind is np.integer else "a floating-point"
        raise TraceError(path, f"dataset {name!r} must have {expected} dtype, got {dataset.dtype}")
    if dataset.shape != shape:
        raise TraceError(path, f"dataset {name!r} has shape {dataset.shape}, expected {_shape_text(shape)}")
    return dataset


def _shape_text(shape) -> str:
    """A shape as the user should read it: an unknown token count (-1) is written ``tokens``."""
    parts = ["tokens" if size == -1 else str(size) for size in shape]
    return f"({parts[0]},)" if len(parts) == 1 else f"({', '.join(parts)})"


def _read_meta(path: Path, file: h5py.File) -> TraceMeta:
    missing = [name for name in REQUIRED_ATTRS if name not in file.attrs]
    if missing:
        raise TraceError(path, f"missing required attribute(s) {', '.join(missing)}")
    fmt = _attr(path, file.attrs, "format", str)
    if fmt != FORMAT_NAME:
        raise TraceError(path, f"attribute 'format' is {fmt!r}, expected {FORMAT_NAME!r}")
    version = _attr(path, file.attrs, "version", int)
    if version != FORMAT_VERSION:
        raise TraceError(path, f"unsupported version {version} (this tierflow reads version {FORMAT_VERSION})")
    num_layers = _attr(path, file.attrs, "num_layers", int)
    num_experts = _attr(path, file.attrs, "num_experts", int)
    top_k = _attr(path, file.attrs, "top_k", int)
    check_shape(path, num_layers, num_experts, top_k)
    model = _attr(path, file.attrs, "model", str)
    if not model.isprintable():  # a name, printed in tables and one-line messages
        raise TraceError(path, f"attribute 'model' holds control characters: {model!r}")
    experts = _member(path, file, "experts")
    if experts is None:
        raise TraceError(path, "missing required dataset 'experts'")
    if not isinstance(experts, h5py.Dataset):
        raise TraceError(path, "'experts' must be a dataset, found a group")
    num_tokens = experts.shape[0] if experts.ndim == 3 else -1
    rows = (num_tokens, num_layers, top_k)
    _check_dataset(path, file, "experts", kind=np.integer, shape=rows)
    _check_dataset(path, file, "sequence_id", kind=np.integer, shape=(num_tokens,))
    gate = _check_dataset(path, file, "gate_scores", kind=np.floating, shape=rows, required=False)
    phase = _check_dataset(path, file, "phase", kind=np.integer, shape=(num_tokens,), required=False)
    index = _check_dataset(path, file, "token_index", kind=np.integer, shape=(num_tokens,), required=False)
    predicted = _check_dataset(path, file, "predicted_experts", kind=np.integer, shape=rows, required=False)
    embedding_dim = None
    sequences = _member(path, file, "sequences")
    if sequences is not None and not isinstance(sequences, h5py.Group):
        raise TraceError(path, "'/sequences' must be a group (holding 'embedding')")
    embedding = None if sequences is None else _member(path, sequences, "embedding")
    if embedding is not None:
        if not isinstance(embedding, h5py.Dataset) or embedding.ndim != 2:
            raise TraceError(path, "'/sequences/embedding' must be a 2-D dataset (num_sequences, d)")
        if not np.issubdtype(embedding.dtype, np.floating):
            raise TraceError(path, f"'/sequences/embedding' must be floating-point, got {embedding.dtype}")
        if embedding.shape[1] < 1:
            raise TraceError(path, "'/sequences/embedding' has no columns: (num_sequences, d) with d >= 1")
        embedding_dim = int(embedding.shape[1])
    return TraceMeta(
        path=str(path),
        model=model,
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        source=_attr(path, file.attrs, "source", str),
        num_tokens=num_tokens,
        has_gate_scores=gate is not None,
        has_phase=phase is not None,
        has_token_index=index is not None,
        embedding_dim=embedding_dim,
        has_predicted_experts=predicted is not None,
    )


class TraceReader:
    """Opens a trace, checks its schema (attributes, dtypes, shapes) and streams its tokens in chunks.

    Opening is cheap: it reads no token data. :meth:`chunks` yields :class:`TraceChunk` objects of at most
    ``chunk_tokens`` tokens and checks the values of each as it is read (see :func:`check_chunk`), so every
    consumer gets a :class:`TraceError` for a bad value rather than a wrong result; :func:`validate_trace`
    reads every field of the whole file that way.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise TraceError(self.path, "no such file")
        if self.path.is_dir():
            raise TraceError(self.path, "is a directory, not a trace file")
        if not self.path.is_file():  # a FIFO would block the read forever
            raise TraceError(self.path, "not a regular file")
        if not os.access(self.path, os.R_OK):
            raise TraceError(self.path, "cannot be read: permission denied")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as error:
            problem = ("cut short (a truncated HDF5 file)" if "truncated file" in str(error)
                       else "not an HDF5 file (tierflow-trace v1 is HDF5)")
            raise TraceError(self.path, problem) from None
        try:
            self.meta = _read_meta(self.path, self._file)
        except BaseException:
            self._file.close()
            raise
        # The largest sequence id read so far: the embedding must have a row for each.
        self._max_sequence = -1

    def _read(self, name: str, lo: int, hi: int | None = None) -> np.ndarray:
        """Tokens ``[lo, hi)`` of a dataset (the whole dataset when ``hi`` is None); a read failure (a
        corrupted or truncated chunk) becomes a :class:`TraceError`."""
        try:
            return self._file[name][()] if hi is None else self._file[name][lo:hi]
        except OSError as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            where = "" if hi is None else f" (tokens {lo} to {hi - 1})"
            raise TraceError(self.path, f"cannot read dataset {name!r}{where}, the file is damaged: {reason}") from None

    def chunks(self, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, *, start: int = 0, stop: int | None = None,
               gate_scores: bool = False, phase: bool = False, token_index: bool = False,
               predicted_experts: bool = False) -> Iterator[TraceChunk]:
        """Yield tokens ``[start, stop)`` in file order; optional fields only when asked for and present.

        Each chunk's values are checked before it is yielded: expert ids, sequence ids and the per-token
        ``phase`` and ``token_index`` (read for the check even when not asked for: they are small) always,
        ``gate_scores`` and ``predicted_experts`` when asked for.
        """
        meta = self.meta
        stop = meta.num_tokens if stop is None else min(stop, meta.num_tokens)
        wanted = {
            "gate_scores": gate_scores and meta.has_gate_scores,
            "phase": phase and meta.has_phase,
            "token_index": token_index and meta.has_token_index,
            "predicted_experts": predicted_experts and meta.has_predicted_experts,
        }
        # Read for the checks only, then dropped from the chunk.
        hidden = [name for name, has in (("phase", meta.has_phase), ("token_index", meta.has_token_index))
                  if has and not wanted[name]]
        read = [name for name, want in wanted.items() if want] + hidden
        order = _SequenceOrder(meta.path) if meta.has_token_index else None
        chunk_tokens = min(chunk_tokens, max(1, MAX_CHUNK_DECISIONS // (meta.num_layers * meta.top_k)))
        for lo in range(start, stop, chunk_tokens):
            hi = min(lo + chunk_tokens, stop)
            extra = {name: self._read(name, lo, hi) for name in read}
            chunk = TraceChunk(lo, self._read("experts", lo, hi), self._read("sequence_id", lo, hi), **extra)
            check_chunk(meta, chunk)
            if order is not None:
                order.update(chunk)
            if len(chunk):
                self._max_sequence = max(self._max_sequence, int(chunk.sequence_id.max()))
            yield attrs.evolve(chunk, **dict.fromkeys(hidden)) if hidden else chunk

    def phases(self) -> np.ndarray | None:
        """The whole ``phase`` dataset (one byte a token, checked as :meth:`chunks` checks it), or None when the
        trace has none (every token is a decode token)."""
        if not self.meta.has_phase:
            return None
        phase = self._read("phase", 0, self.meta.num_tokens)
        _check_phase(self.meta, 0, phase)
        return phase

    def embedding(self) -> np.ndarray | None:
        """The per-sequence embeddings, or None when the file has none. Checked to have a row for every
        sequence id read so far."""
        if self.meta.embedding_dim is None:
            return None
        from tierflow.workload import check_fits_memory  # imported here: the workload module reads traces

        dataset = self._file["sequences/embedding"]
        rows = dataset.shape[0]
        if rows <= self._max_sequence:
            raise TraceError(self.meta.path,
                             f"/sequences/embedding has {rows} rows but sequence ids reach {self._max_sequence}")
        # A sparse dataset may declare billions of rows in a file of a few kB.
        check_fits_memory(rows * dataset.shape[1] * dataset.dtype.itemsize,
                          f"/sequences/embedding ({rows:,} x {dataset.shape[1]:,})", self.meta.path)
        embedding = self._read("sequences/embedding", 0)
        finite = np.isfinite(embedding).all(axis=1)
        if not finite.all():
            raise TraceError(self.meta.path, f"/sequences/embedding has NaN or infinite values in row "
                                             f"{int(np.argmin(finite))}")
        return embedding

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_trace(path) -> TraceReader:
    """Open a trace for streaming; raises :class:`TraceError` with a one-line reason if it is not one."""
    return TraceReader(path)


# ----------------------------------------------------------------------------------------------- validating


def _check_ids(meta: TraceMeta, start: int, ids: np.ndarray, label: str) -> None:
    """Expert ids of a ``(tokens, layers, k)`` block in ``[0, num_experts)``; the first bad one is named."""
    if not ids.size:
        return
    lo, hi = ids.min(), ids.max()
    if lo < 0 or hi >= meta.num_experts:
        bad = lo if lo < 0 else hi
        where = np.argwhere(ids == bad)[0]
        raise TraceError(
            meta.path,
            f"{label} id {int(bad)} outside [0, {meta.num_experts}) at token {start + int(where[0])}, "
            f"layer {int(where[1])}",
        )


_PAIRWISE_TOP_K = 16
_SHOWN_IDS = 16  # a row an error message prints whole; a wider one is named by the id that repeats
_INT64_MAX = np.iinfo(np.int64).max


def _repeated_rows(experts: np.ndarray) -> np.ndarray | None:
    """A ``(tokens, layers)`` mask of the routing rows that name an expert twice, or None if none does.

    Up to top-16, compares each pair of columns over contiguous copies: several times faster than sorting every
    row. Beyond that the pairs grow as k squared (top-4096 took 47 s for one token), and sorting wins.
    """
    k = experts.shape[2]
    if k > _PAIRWISE_TOP_K:
        ordered = np.sort(experts, axis=2)
        repeated = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)
        return repeated if repeated.any() else None
    columns = np.ascontiguousarray(np.moveaxis(experts, 2, 0)).reshape(k, -1)
    repeated = np.zeros(columns.shape[1], dtype=bool)
    same = np.empty_like(repeated)
    for i in range(k - 1):
        for j in range(i + 1, k):
            np.equal(columns[i], columns[j], out=same)
            repeated |= same
    return repeated.reshape(experts.shape[:2]) if repeated.any() else None


def _all_finite(values: np.ndarray) -> bool:
    """No NaN or infinity. Half floats are tested on their exponent bits (all ones), a fraction of the cost."""
    if values.dtype == np.float16:
        return not ((values.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(values).all())


def _check_phase(meta: TraceMeta, start: int, phase: np.ndarray) -> None:
    if phase.size and (phase.max() > 1 or phase.min() < 0):
        bad = phase.max() if phase.max() > 1 else phase.min()
        raise TraceError(meta.path, f"phase values must be 0 (prefill) or 1 (decode), found {int(bad)} "
                                    f"at token {start + int(np.argmax(phase == bad))}")


def _check_distinct(meta: TraceMeta, start: int, ids: np.ndarray, label: str) -> None:
    """No id twice within a (token, layer) row of a ``(tokens, layers, k)`` block."""
    if not ids.size or ids.shape[2] < 2:
        return
    repeated = _repeated_rows(ids)
    if repeated is not None:
        token, layer = np.argwhere(repeated)[0]
        row = ids[token, layer]
        if len(row) <= _SHOWN_IDS:
            shown = str(row.tolist())
        else:  # a wide row: the id that repeats, not the row
            ordered = np.sort(row)
            shown = f"id {int(ordered[np.argmax(ordered[1:] == ordered[:-1])])} twice among {len(row):,}"
        raise TraceError(meta.path, f"{label} repeated within token {start + int(token)}, layer {int(layer)}: {shown}")


def _check_gate_scores(meta: TraceMeta, start: int, scores: np.ndarray) -> None:
    """Router weights: finite and not negative (weights, not logits). A row need not descend: DeepSeek-V3's
    router selects by score plus a bias it leaves out of the weights, and some top-k kernels do not sort."""
    if not _all_finite(scores):
        token, layer, _ = np.argwhere(~np.isfinite(scores))[0]
        raise TraceError(meta.path, f"gate_scores contains NaN or infinite values (first at token "
                                    f"{start + int(token)}, layer {int(layer)})")
    if scores.size and scores.min() < 0:
        token, layer, _ = np.argwhere(scores < 0)[0]
        raise TraceError(meta.path, f"gate_scores holds a negative router weight at token {start + int(token)}, "
                                    f"layer {int(layer)}: weights (softmax or sigmoid outputs) are >= 0, not logits")


def check_chunk(meta: TraceMeta, chunk: TraceChunk) -> None:
    """Value checks on one chunk: expert ids in range, no repeat inside a (token, layer) row, sane phase."""
    _check_ids(meta, chunk.start, chunk.experts, "expert")
    _check_distinct(meta, chunk.start, chunk.experts, "expert")
    if chunk.phase is not None:
        _check_phase(meta, chunk.start, chunk.phase)
    if chunk.predicted_experts is not None:
        _check_ids(meta, chunk.start, chunk.predicted_experts, "predicted_experts")
        _check_distinct(meta, chunk.start, chunk.predicted_experts, "predicted_experts")
    if chunk.gate_scores is not None:
        _check_gate_scores(meta, chunk.start, chunk.gate_scores)
    for name in ("sequence_id", "token_index"):
        values = getattr(chunk, name)
        if values is None or not values.size:
            continue
        if values.min() < 0:
            lowest = values.min()
            raise TraceError(meta.path, f"negative {name} {int(lowest)} at token "
                                        f"{chunk.start + int(np.argmax(values == lowest))}")
        if values.dtype == np.uint64 and values.max() > _INT64_MAX:  # read as signed 64-bit numbers everywhere
            raise TraceError(meta.path, f"{name} {int(values.max())} at token "
                                        f"{chunk.start + int(np.argmax(values))} is beyond 2**63 - 1")


class _SequenceOrder:
    """Checks across chunks that each sequence's ``token_index`` increases in file order."""

    def __init__(self, path: str):
        self.path = path
        self.last: dict[int, int] = {}

    def update(self, chunk: TraceChunk) -> None:
        seq, pos = chunk.sequence_id, chunk.token_index
        order = np.argsort(seq, kind="stable")
        seq_sorted, pos_sorted = seq[order], pos[order]
        same = seq_sorted[1:] == seq_sorted[:-1]
        bad = np.flatnonzero(same & (pos_sorted[1:] <= pos_sorted[:-1]))
        if bad.size:
            i = order[bad[0] + 1]
            self._fail(int(seq[i]), chunk.start + int(i))
        firsts = np.flatnonzero(np.r_[True, ~same])
        lasts = np.r_[firsts[1:] - 1, len(seq_sorted) - 1]
        for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True):
            sequence = int(seq_sorted[first])
            previous = self.last.get(sequence)
            if previous is not None and pos_sorted[first] <= previous:
                self._fail(sequence, chunk.start + int(order[first]))
            self.last[sequence] = int(pos_sorted[last])

    def _fail(self, sequence: int, token: int):
        raise TraceError(self.path, f"sequence {sequence} tokens out of order at token {token} (token_index)")


def validate_trace(path, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, on_chunk=None) -> TraceMeta:
    """Read the whole file once and check every value; returns its metadata or raises :class:`TraceError`.

    ``on_chunk(meta, chunk)``, when given, sees every checked chunk, so callers that summarise a trace
    need no second pass over the file.
    """
    with open_trace(path) as reader:
        meta = reader.meta
        for chunk in reader.chunks(chunk_tokens, gate_scores=True, phase=True, token_index=True,
                                   predicted_experts=True):
            if on_chunk is not None:
                on_chunk(meta, chunk)
        reader.embedding()
    return meta
