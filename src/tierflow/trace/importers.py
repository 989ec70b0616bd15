"""Importers: routing logs written by inference-engine hooks (JSONL) into tierflow-trace v1 files.

Two log shapes are understood, named in :data:`IMPORT_FORMATS`:

``per-step``
    One record per (request, layer, decode step), as vLLM routing hooks commonly write them::

        {"problem_id": "q17", "layer": 3, "token_idx": 57, "experts": [5, 1], "gating_probs": [0.61, 0.22]}

    A token (problem_id, token_idx) is kept only when every layer seen in the inputs has a record for it.
    Tokens are stored in the order the log first shows them, requests interleaved as the engine ran them
    (cache-only replay follows file order), each request's tokens in token_idx order; token_idx is stored as
    ``token_index``.
``per-layer-files``
    One file per layer, the layer being the last integer in the file name (``layer_3.jsonl``,
    ``expert_trace_layer_12.jsonl``, ``3.jsonl``); one record per token row of each forward pass::

        {"topk_ids": [12, 40, ...], "topk_weights": [0.31, 0.12, ...], "request_id": 7, "phase": "decode"}

    or lists of such rows in one record for a batch. Row ``i`` of every file is token ``i``.

In both shapes the layer numbers of the log (often only the MoE layers, by the model's layer index) become
columns ``0..L-1`` in sorted order, and the original numbers are kept in the root attribute ``layer_ids``.

An importer parses its inputs line by line into a :class:`RoutingLog` of compact numpy arrays; then
:func:`import_trace` settles ``num_experts``, checks the log against the catalog model, and writes and
validates the trace before it appears under its name.
"""

from __future__ import annotations

import json
import math
import re
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import numpy as np

from tierflow.atomic import check_not_an_input, check_writable
from tierflow.errors import TierflowError, TraceError
from tierflow.trace.format import (
    GATE_SCORE_DTYPE, MAX_EXPERTS, MAX_LAYERS, TraceMeta, check_shape, open_trace, write_trace)

Warn = Callable[[str], None]
Progress = Callable[[int], None]  # told the bytes of input read since its last call

UNKNOWN_MODEL = "unknown"
SEQUENCE_FIELDS = ("request_id", "seq_id", "problem_id")
PHASE_FIELDS = ("phase", "is_prefill")
PHASE_CODES = {"prefill": 0, "decode": 1}
# Ids, layers and positions are stored in 32- and 64-bit arrays; a larger number in a log is a corrupt
# record, not a real model.
_MAX_INDEX = 2**31 - 1
_MAX_LAYER = MAX_LAYERS - 1  # the largest layer number a trace holds
_MAX_SCORE = float(np.finfo(GATE_SCORE_DTYPE).max)  # gate_scores are stored in half precision


@attrs.frozen
class RoutingLog:
    """Routing parsed from logs, in output token order, ready to write.

    ``experts`` is ``(num_tokens, num_layers, top_k)``; column ``j`` holds layer ``layer_ids[j]`` of the log.
    """

    experts: np.ndarray
    sequence_id: np.ndarray
    layer_ids: np.ndarray
    gate_scores: np.ndarray | None = None
    phase: np.ndarray | None = None
    token_index: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]


# ----------------------------------------------------------------------------------------- reading JSONL


@attrs.frozen
class _Line:
    """Where a record came from, so that an error can name the file and line."""

    path: Path
    number: int

    def error(self, problem: str) -> TraceError:
        return TraceError(self.path, f"line {self.number}: {problem}")


def _expand_folders(inputs: list[Path]) -> list[Path]:
    """A folder given as input stands for the ``*.jsonl`` files in it."""
    files = []
    for path in inputs:
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(path.glob("*.jsonl"))
        if not found:
            raise TraceError(path, "folder holds no *.jsonl files")
        files.extend(found)
    return files


PROGRESS_LINES = 4096  # lines between two calls of an import's progress callback


def _json_records(path: Path, progress: Progress | None = None) -> Iterator[tuple[_Line, dict]]:
    """Yield every non-blank line of a JSONL file as a JSON object, holding one line in memory at a time;
    ``progress`` (if given) hears of the bytes read, every :data:`PROGRESS_LINES` lines and at the end."""
    try:
        # Bytes, decoded line by line: a text-mode file decodes ahead in blocks, so a bad byte would be
        # reported against the wrong line.
        with open(path, "rb") as file:
            unreported = 0
            for number, raw in enumerate(file, start=1):
                if progress is not None:
                    unreported += len(raw)
                    if number % PROGRESS_LINES == 0:
                        progress(unreported)
                        unreported = 0
                line = _Line(path, number)
                try:
                    # The first line may open with a byte-order mark (Windows editors), as a scenario file may.
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise line.error("not UTF-8 text") from None
                if text.strip():
                    yield line, _parse_object(line, text)
            if progress is not None and unreported:
                progress(unreported)
    except OSError as error:
        raise TraceError(path, f"cannot read: {error.strerror or error}") from None


def _parse_object(line: _Line, text: str) -> dict:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise line.error(f"invalid JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        raise line.error("invalid JSON (arrays or objects nested too deep)") from None
    except ValueError:  # Python's limit on the digits of an integer
        raise line.error("invalid JSON (a number of thousands of digits)") from None
    if not isinstance(record, dict):
        raise line.error(f"expected a JSON object, got {_json_type(record)}")
    return record


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), "null")


def _show(value) -> str:
    """A value as it looked in the log, cut short so that the error stays one readable line."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------- checking fields


def _field(line: _Line, record: dict, name: str):
    try:
        return record[name]
    except KeyError:
        raise line.error(f"missing field {name!r}") from None


def _index(line: _Line, name: str, value) -> int:
    """A layer number or token position: a non-negative JSON integer."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INDEX:
        raise line.error(f"{name!r} must be a non-negative integer, got {_show(value)}")
    return value


def _scalar_id(line: _Line, name: str, value) -> tuple[str, object]:
    """A request id: any JSON scalar (string, number, boolean or null), as a key with its JSON type (Python
    counts ``true``, ``1`` and ``1.0`` as one dictionary key; in a log they name different requests)."""
    if isinstance(value, (dict, list)):
        raise line.error(f"{name!r} must be a JSON scalar (string or number), got {_json_type(value)}")
    return type(value).__name__, value


def _expert_row(line: _Line, name: str, value, expert_limit: int | None) -> list[int]:
    """One (token, layer) row of expert ids: non-empty, distinct, in ``[0, expert_limit)`` when it is known."""
    if not isinstance(value, list) or not value:
        raise line.error(f"{name!r} must be a non-empty list of expert ids, got {_show(value)}")
    for expert in value:
        if not isinstance(expert, int) or isinstance(expert, bool) or expert < 0:
            raise line.error(f"{name!r} holds {_show(expert)}, not a non-negative integer expert id")
        if expert >= MAX_EXPERTS:
            raise line.error(f"expert id {expert} in {name!r} is beyond the {MAX_EXPERTS:,} experts per layer "
                             "tierflow handles")
        if expert_limit is not None and expert >= expert_limit:
            raise line.error(f"expert id {expert} in {name!r} is out of range [0, {expert_limit})")
    if len(set(value)) != len(value):
        raise line.error(f"expert id repeated within one row of {name!r}: {_show(value)}")
    return value


def _score_row(line: _Line, name: str, value, top_k: int) -> list[float]:
    """Router scores of one row's experts, in the same order: ``top_k`` finite numbers."""
    if not isinstance(value, list):
        raise line.error(f"{name!r} must be a list of numbers, got {_show(value)}")
    if len(value) != top_k:
        raise line.error(f"{name!r} has {len(value)} values for {top_k} experts")
    for score in value:
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise line.error(f"{name!r} holds {_show(score)}, not a finite number")
        if score < 0:
            raise line.error(f"{name!r} holds {_show(score)}: router weights (softmax or sigmoid outputs) are >= 0, "
                             "not logits")
        if score > _MAX_SCORE:
            raise line.error(f"{name!r} holds {_show(score)}, beyond the {_MAX_SCORE:g} a trace stores (half "
                             "precision); router weights are probabilities")
    return value


def _per_row(line: _Line, name: str, value, num_rows: int) -> list:
    """A record-level value for each of its rows: a list with one per row, or one scalar shared by all."""
    if not isinstance(value, list):
        return [value] * num_rows
    if len(value) != num_rows:
        raise line.error(f"{name!r} has {len(value)} values for {num_rows} token rows")
    return value


def _phase_code(line: _Line, name: str, value) -> int:
    """0 for prefill, 1 for decode, from ``phase`` ("prefill"/"decode") or ``is_prefill`` (boolean)."""
    if name == "is_prefill":
        if not isinstance(value, bool):
            raise line.error(f"'is_prefill' must be true or false, got {_show(value)}")
        return 0 if value else 1
    if not isinstance(value, str) or value not in PHASE_CODES:
        raise line.error(f"'phase' must be one of {', '.join(map(repr, PHASE_CODES))}, got {_show(value)}")
    return PHASE_CODES[value]


class _Consistency:
    """The first record fixes the top-k and which optional fields are present; every later one must agree.

    One instance spans all the input files, because their rows end up in one array.
    """

    def __init__(self):
        self.top_k: int | None = None
        self.present: dict[str, tuple[bool, _Line]] = {}

    def check_top_k(self, line: _Line, row: list[int]) -> None:
        if self.top_k is None:
            self.top_k = len(row)
        elif len(row) != self.top_k:
            raise line.error(f"ragged top-k: {len(row)} experts in a row, but earlier rows have {self.top_k}")

    def optional(self, line: _Line, record: dict, names: tuple[str, ...]) -> str | None:
        """The first of ``names`` the record carries, or None; presence must match the first record's."""
        found = next((name for name in names if name in record), None)
        expected, first = self.present.setdefault(names[0], (found is not None, line))
        if expected != (found is not None):
            described = "/".join(repr(name) for name in names)
            where = f"{first.path.name} line {first.number}"
            if expected:
                raise line.error(f"missing field {described}, which the first record ({where}) has")
            raise line.error(f"unexpected field {described}: the first record ({where}) has none")
        return found


def _describe(paths: list[Path]) -> str:
    """How an error names several inputs: their common folder when they share one."""
    if len(paths) == 1:
        return str(paths[0])
    parents = {path.parent for path in paths}
    return str(parents.pop()) if len(parents) == 1 else ", ".join(map(str, paths))


# ----------------------------------------------------------------------------------------- per-step


class _StepColumns:
    """Every per-step record read so far, one compact growable array per field."""

    def __init__(self):
        self.sequence, self.token_idx, self.layer = array("q"), array("q"), array("q")
        self.file, self.line = array("q"), array("q")
        self.experts, self.gate_scores = array("i"), array("f")

    def __len__(self) -> int:
        return len(self.sequence)

    def add(self, file_number: int, line: _Line, record: dict, shape: _Consistency, request_ids: dict,
            expert_limit: int | None) -> None:
        """Check one record and append its fields; ``request_ids`` maps problem ids to sequence ids."""
        request = _scalar_id(line, "problem_id", _field(line, record, "problem_id"))
        layer = _index(line, "layer", _field(line, record, "layer"))
        token_idx = _index(line, "token_idx", _field(line, record, "token_idx"))
        experts = _expert_row(line, "experts", _field(line, record, "experts"), expert_limit)
        shape.check_top_k(line, experts)
        if shape.optional(line, record, ("gating_probs",)):
            self.gate_scores.extend(_score_row(line, "gating_probs", record["gating_probs"], len(experts)))
        self.sequence.append(request_ids.setdefault(request, len(request_ids)))
        self.layer.append(layer)
        self.token_idx.append(token_idx)
        self.experts.extend(experts)
        self.file.append(file_number)
        self.line.append(line.number)

    def numpy(self, name: str) -> np.ndarray:
        """A read-only view of one column (call once reading is over: a viewed array cannot grow)."""
        column = getattr(self, name)
        return np.frombuffer(column, dtype=column.typecode)


def _read_per_step(inputs: list[Path], expert_limit: int | None,
                   progress: Progress | None = None) -> tuple[_StepColumns, list, _Consistency]:
    """Parse every record of every file; returns the columns, the request ids by sequence id, and the shape."""
    columns, shape, request_ids = _StepColumns(), _Consistency(), {}
    for file_number, path in enumerate(inputs):
        records_before = len(columns)
        for line, record in _json_records(path, progress):
            columns.add(file_number, line, record, shape, request_ids, expert_limit)
        if len(columns) == records_before:
            raise TraceError(path, "no records: the file is empty")
    return columns, list(request_ids), shape


def _reject_duplicates(columns: _StepColumns, order, layer_column, inputs, request_ids) -> None:
    """Two records for one (request, token, layer) mean the logs overlap, and neither can be trusted."""
    keys = [columns.numpy("sequence")[order], columns.numpy("token_idx")[order], layer_column[order]]
    same = np.logical_and.reduce([key[1:] == key[:-1] for key in keys])
    if not same.any():
        return
    position = int(np.flatnonzero(same)[0])
    first, again = int(order[position]), int(order[position + 1])
    files, lines = columns.numpy("file"), columns.numpy("line")
    _, request = request_ids[columns.sequence[first]]
    raise TraceError(
        inputs[files[again]],
        f"line {lines[again]}: second record for problem_id {_show(request)}, "
        f"token_idx {columns.token_idx[first]}, layer {columns.layer[first]} "
        f"(the first is {inputs[files[first]].name} line {lines[first]})",
    )


def import_per_step(inputs: list[Path], expert_limit: int | None, warn: Warn,
                    progress: Progress | None = None) -> RoutingLog:
    """Read per-step JSONL files (concatenated) into a routing log of their complete tokens."""
    columns, request_ids, shape = _read_per_step(inputs, expert_limit, progress)
    layer_ids, layer_column = np.unique(columns.numpy("layer"), return_inverse=True)
    sequence, token_idx = columns.numpy("sequence"), columns.numpy("token_idx")
    # Sequence ids follow first appearance, so sorting by them orders requests as the log met them.
    order = np.lexsort((layer_column, token_idx, sequence))
    _reject_duplicates(columns, order, layer_column, inputs, request_ids)
    starts, complete = _token_starts(sequence[order], token_idx[order], len(layer_ids))
    if not complete.any():
        raise TraceError(
            _describe(inputs),
            f"no complete tokens: no (problem_id, token_idx) has records for all {len(layer_ids)} layers seen",
        )
    if not complete.all():
        warn(
            f"dropped {int((~complete).sum())} incomplete token(s) without records for all {len(layer_ids)} "
            f"layers (typically the last decode step, cut off when logging stopped)"
        )
    # With no duplicates, a complete token's records are its layers 0..L-1, consecutive in sorted order.
    records = order[starts[complete][:, None] + np.arange(len(layer_ids))]
    records = records[_engine_order(sequence[records[:, 0]], records.min(axis=1))]
    first_records = records[:, 0]
    gate_scores = columns.numpy("gate_scores").reshape(-1, shape.top_k) if len(columns.gate_scores) else None
    return RoutingLog(
        experts=columns.numpy("experts").reshape(-1, shape.top_k)[records],
        sequence_id=sequence[first_records],
        layer_ids=layer_ids,
        gate_scores=None if gate_scores is None else gate_scores[records],
        token_index=token_idx[first_records],
    )


def _engine_order(sequence: np.ndarray, first_record: np.ndarray) -> np.ndarray:
    """The order to store tokens in, given in (request, token_idx) order with the position of each one's first
    record in the log: the log's order (requests interleaved as the engine ran them), each request keeping its
    tokens in token_idx order: its tokens take its first-record positions in ascending order."""
    positions = first_record[np.lexsort((first_record, sequence))]
    return np.argsort(positions, kind="stable")


def _token_starts(sequence: np.ndarray, token_idx: np.ndarray, num_layers: int):
    """Where each (sequence, token_idx) run starts in sorted records, and whether it has all the layers."""
    new_token = np.r_[True, (sequence[1:] != sequence[:-1]) | (token_idx[1:] != token_idx[:-1])]
    starts = np.flatnonzero(new_token)
    records_per_token = np.diff(np.r_[starts, len(sequence)])
    return starts, records_per_token == num_layers


# ----------------------------------------------------------------------------------------- per-layer-files


@attrs.frozen
class _LayerLog:
    """One per-layer file's token rows; optional fields are None when its records do not carry them."""

    path: Path
    layer_id: int
    experts: np.ndarray
    gate_scores: np.ndarray | None
    sequence_id: np.ndarray | None
    phase: np.ndarray | None

    @property
    def num_rows(self) -> int:
        return len(self.experts)


def layer_from_file_name(path: Path) -> int:
    """The layer a per-layer log holds: the last integer in its file stem (``expert_trace_layer_12`` -> 12)."""
    numbers = re.findall(r"\d+", Path(path).stem)
    if not numbers:
        raise TraceError(path, "no layer number in the file name (expected e.g. layer_3.jsonl)")
    layer = int(numbers[-1])
    if layer > _MAX_LAYER:
        raise TraceError(path, f"layer {layer} in the file name is beyond {_MAX_LAYER:,}")
    return layer


def _token_rows(line: _Line, record: dict) -> tuple[list, bool]:
    """The record's ``topk_ids`` rows, and whether it is batched (a list of rows rather than one row)."""
    ids = _field(line, record, "topk_ids")
    batched = isinstance(ids, list) and bool(ids) and all(isinstance(row, list) for row in ids)
    return (ids if batched else [ids]), batched


class _LayerColumns:
    """One per-layer file's token rows read so far, one compact growable array per field."""

    def __init__(self):
        self.experts, self.gate_scores = array("i"), array("f")
        self.sequence_id, self.phase = array("q"), array("B")

    def add(self, line: _Line, record: dict, shape: _Consistency, request_ids: dict,
            expert_limit: int | None) -> None:
        """Check one record (one token row, or a batch of them) and append its rows."""
        rows, batched = _token_rows(line, record)
        for row in rows:
            self.experts.extend(_expert_row(line, "topk_ids", row, expert_limit))
            shape.check_top_k(line, row)
        if shape.optional(line, record, ("topk_weights",)):
            # A batched record holds one list of weights per row; a plain record holds one list.
            weights = record["topk_weights"]
            weights = _per_row(line, "topk_weights", weights, len(rows)) if batched else [weights]
            for row, scores in zip(rows, weights, strict=True):
                self.gate_scores.extend(_score_row(line, "topk_weights", scores, len(row)))
        if name := shape.optional(line, record, SEQUENCE_FIELDS):
            for request in _per_row(line, name, record[name], len(rows)):
                request = _scalar_id(line, name, request)
                self.sequence_id.append(request_ids.setdefault(request, len(request_ids)))
        if name := shape.optional(line, record, PHASE_FIELDS):
            for value in _per_row(line, name, record[name], len(rows)):
                self.phase.append(_phase_code(line, name, value))

    def numpy(self, name: str, top_k: int) -> np.ndarray | None:
        """One column as an array (rows of ``top_k`` for ids and scores), or None when no record had it."""
        column = getattr(self, name)
        if not column:
            return None
        values = np.frombuffer(column, dtype=column.typecode)
        return values.reshape(-1, top_k) if name in ("experts", "gate_scores") else values


def _read_layer_file(path: Path, shape: _Consistency, request_ids: dict, expert_limit: int | None,
                     progress: Progress | None = None) -> _LayerLog:
    """Parse one per-layer file; ``request_ids``, shared by all files, maps request ids to sequence ids."""
    layer_id = layer_from_file_name(path)
    columns = _LayerColumns()
    for line, record in _json_records(path, progress):
        columns.add(line, record, shape, request_ids, expert_limit)
    if not columns.experts:
        raise TraceError(path, "no records: the file is empty")
    fields = ("experts", "gate_scores", "sequence_id", "phase")
    return _LayerLog(path, layer_id, **{name: columns.numpy(name, shape.top_k) for name in fields})


def _check_layers_align(logs: list[_LayerLog], inputs: list[Path]) -> None:
    """Every file must name a distinct layer and hold the same token rows."""
    by_layer: dict[int, Path] = {}
    for log in logs:
        if log.layer_id in by_layer:
            raise TraceError(log.path, f"layer {log.layer_id} again: {by_layer[log.layer_id].name} has it too")
        by_layer[log.layer_id] = log.path
    rows = {log.num_rows for log in logs}
    if len(rows) > 1:
        counts = "; ".join(
            f"{count} in {', '.join(log.path.name for log in logs if log.num_rows == count)}"
            for count in sorted(rows, reverse=True)
        )
        raise TraceError(_describe(inputs), f"layer files hold different numbers of token rows: {counts}")


def _shared_column(logs: list[_LayerLog], name: str, describe: Callable[[int], str]) -> np.ndarray | None:
    """A per-token field that every layer file repeats: it must agree across files, row by row."""
    first = getattr(logs[0], name)
    for log in logs[1:]:
        values = getattr(log, name)
        if first is None or np.array_equal(values, first):
            continue
        row = int(np.flatnonzero(values != first)[0])
        raise TraceError(
            log.path,
            f"token row {row} has {describe(values[row])} but {logs[0].path.name} has {describe(first[row])}",
        )
    return first


def import_per_layer_files(inputs: list[Path], expert_limit: int | None, warn: Warn,
                           progress: Progress | None = None) -> RoutingLog:
    """Read one JSONL file per layer; row ``i`` of every file is token ``i``."""
    shape, request_ids = _Consistency(), {}
    logs = sorted(
        (_read_layer_file(path, shape, request_ids, expert_limit, progress) for path in inputs),
        key=lambda log: log.layer_id,
    )
    _check_layers_align(logs, inputs)
    requests = list(request_ids)
    sequence_id = _shared_column(logs, "sequence_id", lambda seq: f"sequence id {_show(requests[seq][1])}")
    phase = _shared_column(logs, "phase", lambda code: f"phase {list(PHASE_CODES)[code]}")
    gate_scores = None if logs[0].gate_scores is None else np.stack([log.gate_scores for log in logs], axis=1)
    return RoutingLog(
        experts=np.stack([log.experts for log in logs], axis=1),
        # Without request ids there is no way to tell requests apart: the whole log is one sequence.
        sequence_id=np.zeros(logs[0].num_rows, dtype=np.int64) if sequence_id is None else sequence_id,
        layer_ids=np.array([log.layer_id for log in logs], dtype=np.int64),
        gate_scores=gate_scores,
        phase=phase,
    )


# Each is called as importer(inputs, expert_limit, warn, progress).
IMPORT_FORMATS: dict[str, Callable[..., RoutingLog]] = {
    "per-step": import_per_step,
    "per-layer-files": import_per_layer_files,
}


# ----------------------------------------------------------------------------------------- writing


def import_trace(
    fmt: str,
    inputs: list[Path],
    out: Path,
    *,
    model: str | None,
    num_experts: int | None,
    warn: Warn,
    progress: Callable[[list[Path]], Progress | None] | None = None,
) -> TraceMeta:
    """Convert routing logs in format ``fmt`` into a validated tierflow-trace v1 file at ``out``.

    ``num_experts`` comes from the catalog ``model`` when given (which also fixes the expected top-k and
    MoE layer count), else from the argument, else from the largest expert id seen (with a warning). A folder
    among ``inputs`` stands for the ``*.jsonl`` files in it, in name order. ``progress``, if given, is called
    with the input files once they are known and returns a callback for the bytes read (or None).
    """
    if not inputs:
        raise TierflowError("no input files given")
    inputs = [Path(path) for path in inputs]
    importer = _importer(fmt, _describe(inputs))
    inputs = _expand_folders(inputs)
    check_not_an_input(out, inputs)
    spec = _catalog_model(model)
    expert_limit = _expert_limit(spec, model, num_experts)
    check_writable(out)  # before parsing a log that may be large
    log = importer(inputs, expert_limit, warn, progress(inputs) if progress is not None else None)
    if spec is not None:
        _check_against_model(log, spec, model, _describe(inputs))
    if expert_limit is None:
        expert_limit = int(log.experts.max()) + 1
        warn(f"num_experts not given: inferred {expert_limit} from the largest expert id seen")
    check_shape(_describe(inputs), log.num_layers, expert_limit, log.top_k)
    source = f"tierflow trace import --format {fmt}: {', '.join(path.name for path in inputs)}"
    model_name = model or UNKNOWN_MODEL
    return _write_atomically(Path(out), log, model=model_name, num_experts=expert_limit, source=source)


def _importer(fmt: str, label: str):
    try:
        return IMPORT_FORMATS[fmt]
    except KeyError:
        valid = ", ".join(sorted(IMPORT_FORMATS))
        raise TraceError(label, f"unknown import format {fmt!r}; valid formats: {valid}") from None


def _catalog_model(model: str | None):
    if model is None:
        return None
    # Imported here, not at the top: only an import that names a model needs the catalog.
    from tierflow import catalog

    return catalog.get_model(model)


def _expert_limit(spec, model: str | None, num_experts: int | None) -> int | None:
    """Experts per layer when known before reading: the catalog model's, else the caller's."""
    if spec is None:
        return num_experts
    if num_experts is not None and num_experts != spec.num_routed_experts:
        raise TierflowError(
            f"num_experts {num_experts} contradicts model {model!r}, "
            f"which has {spec.num_routed_experts} routed experts"
        )
    return spec.num_routed_experts


def _check_against_model(log: RoutingLog, spec, model: str, label: str) -> None:
    """The log must route like the catalog model: same top-k and one column per MoE layer."""
    if log.top_k != spec.top_k:
        raise TraceError(label, f"top-{log.top_k} routing in the log, but model {model!r} is top-{spec.top_k}")
    if log.num_layers != spec.num_moe_layers:
        raise TraceError(
            label, f"{log.num_layers} layers in the log, but model {model!r} has {spec.num_moe_layers} MoE layers",
        )


def _write_atomically(out: Path, log: RoutingLog, *, model: str, num_experts: int, source: str) -> TraceMeta:
    """Write and validate before the rename: ``out`` is never seen half-made or invalid."""
    write_trace(
        out, log.experts, log.sequence_id, model=model, num_experts=num_experts, source=source,
        gate_scores=log.gate_scores, phase=log.phase, token_index=log.token_index,
        extra_attrs={"layer_ids": log.layer_ids.astype(np.int64)}, validate=True,
    )
    with open_trace(out) as reader:
        return reader.meta
