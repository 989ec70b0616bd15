"""Sweeps: a grid of scenarios run in parallel, with resumable per-point results and one summary table.

A sweep file (TOML) names a base scenario and the axes to vary::

    name = "energy_vs_batch"
    description = "energy per token vs batch size for each placement"
    scenario = "ssd_offload"        # a shipped scenario or a .toml path (relative to the sweep file); its
                                    # relative workload.trace is found as simulate finds it (next to it, then
                                    # in the shipped trace data); one in [set] or [grid], next to the sweep file,
                                    # else in the working directory
    seed = 1                        # optional: every point uses this seed (else one derived from its id)

    [set]                           # fixed overrides for every point
    "workload.decode_tokens" = 32

    [grid]                          # cartesian product over any scenario keys
    placement = ["ddr", "ssd"]
    "workload.batch_size" = [1, 4, 16]

    [[zip]]                         # keys that vary together (equal lengths); crossed with the grid
    "energy.ssd_read_pj_per_bit" = [206.0, 103.0]
    description = ["1x", "0.5x"]

Keys are dotted scenario keys (quoted, or as nested TOML tables). Every point is validated before anything
runs, so a bad key or value is one :class:`TierflowError` line: loading checks each point's scenario, and
:func:`run_sweep` checks, for each point still to run, what the simulator would reject before simulating
(names, plugin parameters, the trace file, capacities; see :func:`check_point`). A point's id is a hash of its full scenario
(name and description aside; a trace file counted by its bytes, catalog names by their catalog spelling), so
resuming into the same folder reruns exactly the points whose settings changed, plus those whose output is
damaged or was simulated by other tierflow files (:func:`point_state`). Output folder::

    DIR/sweep.json          the sweep: axes and the point ids in grid order (written after the table)
    DIR/points/ID.h5        one point's summary and per-step series (``write_results_h5``)
    DIR/points/ID.json      one point's record: parameters, status, error, summary; written last = complete
    DIR/results.h5, .csv    the table: one row per point, rebuilt from the point records

Every file is written to a temporary name and renamed into place, so a killed sweep loses no finished point
and leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from itertools import product
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from tierflow.atomic import H5Output, atomic_write, output_dir
from tierflow.config import (
    PLUGIN_SECTIONS, load_scenario_table, not_a_file, scenario_from_table, scenario_to_table, valid_keys)
from tierflow.errors import TierflowError
from tierflow.resources import code_fingerprint, file_digest
from tierflow.workers import run_parallel, sigint_ignored

ENGINES = ("local", "dask")
STATUS_OK, STATUS_ERROR = "ok", "error"
_SWEEP_KEYS = {"name", "description", "scenario", "seed", "set", "grid", "zip"}
# Scenario fields that label a point but do not change what it simulates: left out of the id.
_LABEL_KEYS = ("name", "description")
# Points in one sweep: each is a simulation of seconds or more, and loading alone builds and checks every one
# (about 0.2 ms a point), so a grid of millions would only stall before the first runs.
MAX_POINTS = 100_000


@attrs.frozen
class Point:
    """One scenario of a sweep."""

    point_id: str  # 12 hex digits of sha256 over the canonical JSON of what it simulates (see _identity_table)
    axes: dict  # dotted key -> value, the values this point takes on the sweep's axes
    scenario_table: dict  # the full nested scenario table, seed included

    @property
    def seed(self) -> int:
        return self.scenario_table["seed"]


@attrs.frozen
class Sweep:
    name: str
    description: str
    axis_keys: tuple  # grid keys then zipped keys, in file order
    points: tuple  # of Point, in grid order


# ---------------------------------------------------------------------------------------------- loading


def _flatten(table: Mapping, prefix: str = "", where: str = "sweep") -> dict:
    """``{"workload": {"batch_size": [1]}}`` -> ``{"workload.batch_size": [1]}``; stops at free ``params`` tables.
    A key spelt twice (``"cache.policy"`` and ``cache = {policy = ...}``) is an error, not a silent overwrite."""
    flat = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and not dotted.endswith(".params") and "." not in key:
            inner = _flatten(value, f"{dotted}.", where)
        else:
            inner = {dotted: value}
        for name, item in inner.items():
            if name in flat:
                raise TierflowError(f"{where}: key {name!r} is set in more than one place")
            flat[name] = item
    return flat


def _check_no_overlap(keys, where: str) -> None:
    """No key may sit inside another that is set as a whole (``cache.params.x`` beside ``cache.params``): which
    one wins would depend on the order they are applied in."""
    for key in keys:
        for other in keys:
            if other.startswith(f"{key}."):
                raise TierflowError(f"{where}: key {other!r} is inside {key!r}, which is set as a whole; set one "
                                    "or the other")


def _check_key(key: str, where: str) -> None:
    keys = valid_keys()
    free = [k for k in keys if k.endswith(".params")]
    if key in keys or any(key.startswith(f"{k}.") for k in free):
        return
    raise TierflowError(f"{where}: unknown scenario key {key!r}; valid keys: {', '.join(keys)}")


def _set_dotted(table: dict, key: str, value: Any, where: str = "sweep") -> None:
    node = table
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TierflowError(f"{where}: {key!r}: {'.'.join(parts[:depth + 1])!r} is set to {node!r}, not a "
                                "table")
    node[parts[-1]] = value


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def point_id(scenario_table: Mapping) -> str:
    """The stable id of a scenario table: sha256 of its canonical JSON, the labels (name, description) aside."""
    content = {k: v for k, v in scenario_table.items() if k not in _LABEL_KEYS}
    return hashlib.sha256(_canonical(content).encode()).hexdigest()[:12]


def _identity_table(table: Mapping, digests: dict[str, str]) -> dict:
    """What a point simulates, for its id: the scenario with every file it reads replaced by the sha256 of its
    bytes (the trace, and a file a plugin parameter names: learned-policy weights, a prefetcher's training
    trace; the same file anywhere has one id, a rewritten one makes new points) and catalog names in the
    catalog's spelling (they are looked up case-insensitively). ``digests`` caches the files' digests by path."""
    from tierflow.catalog import get_model, get_profile

    identity = json.loads(json.dumps(table))
    for key, get in (("model", get_model), ("hardware", get_profile)):
        try:
            identity[key] = get(identity[key]).name
        except (KeyError, TierflowError):
            pass  # check_points reports it
    workload = identity.get("workload", {})
    if workload.get("trace"):
        workload["trace"] = _file_identity(workload["trace"], digests)
    for part in PLUGIN_SECTIONS:
        params = identity.get(part, {}).get("params", {})
        for key, value in params.items():
            if isinstance(value, str) and value:
                params[key] = _file_identity(value, digests)
    return identity


def _file_identity(path: str, digests: dict[str, str]) -> str:
    """``"sha256:..."`` of the file at ``path``; ``path`` itself when it is not a readable regular file (a
    parameter that names no file; a missing or unreadable one check_points reports)."""
    if path not in digests:
        try:  # not a FIFO or device: reading one would block or never end
            is_file = "\0" not in path and Path(path).is_file()
            digests[path] = "sha256:" + file_digest(path) if is_file else path
        except (OSError, ValueError):
            digests[path] = path
    return digests[path]


def derived_seed(identity: str) -> int:
    """A deterministic seed from a point id (31 bits, so any RNG accepts it)."""
    return int(hashlib.sha256(f"seed:{identity}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _axis_combinations(grid: Mapping, zips: list[Mapping], where: str) -> list[dict]:
    axes: list[list[dict]] = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise TierflowError(f"{where}: grid axis {key!r} needs a non-empty list of values, got {values!r}")
        axes.append([{key: v} for v in values])
    for number, group in enumerate(zips, 1):
        lengths = {key: len(v) if isinstance(v, list) else -1 for key, v in group.items()}
        if not group or min(lengths.values()) <= 0:
            raise TierflowError(f"{where}: zip group {number} needs keys with non-empty lists of values")
        if len(set(lengths.values())) != 1:
            shown = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            raise TierflowError(f"{where}: zip group {number} has lists of different lengths ({shown})")
        axes.append([dict(zip(group, values)) for values in zip(*group.values())])
    if not axes:
        raise TierflowError(f"{where}: no axes; give [grid] keys with lists of values or [[zip]] groups")
    count = math.prod(len(axis) for axis in axes)
    if count > MAX_POINTS:  # before the points are made: each is a scenario to build and check
        sizes = " x ".join(str(len(axis)) for axis in axes)
        raise TierflowError(f"{where}: the axes make {count:,} points ({sizes}), more than the {MAX_POINTS:,} a "
                            "sweep runs; split it into several sweeps")
    return [{k: v for part in combo for k, v in part.items()} for combo in product(*axes)]


def parse_sweep(document: Mapping, base_dir: Path = Path("."), where: str = "sweep") -> Sweep:
    """A :class:`Sweep` from a parsed sweep file; every point is validated as a scenario."""
    unknown = sorted(set(document) - _SWEEP_KEYS)
    if unknown:
        raise TierflowError(f"{where}: unknown sweep key {unknown[0]!r}; valid: {', '.join(sorted(_SWEEP_KEYS))}")
    if "scenario" not in document:
        raise TierflowError(f"{where}: missing `scenario` (a shipped scenario name or a .toml path)")
    base_name = str(document["scenario"])
    relative = base_dir / base_name
    base_table = load_scenario_table(str(relative) if relative.suffix == ".toml" and relative.is_file() else base_name)
    # A point is labelled by its sweep, not by the base scenario, whose model or hardware [set] may change (the
    # labels are not part of a point's id); a [set] name or description still wins.
    sweep_name, description = str(document.get("name", where)), str(document.get("description", ""))
    for label, text in (("name", sweep_name), ("description", description)):
        if "\0" in text:  # the table's HDF5 strings cannot hold one
            raise TierflowError(f"{where}: a NUL character is not allowed in the sweep's {label}, got {text!r}")
    base_table["name"] = sweep_name
    base_table["description"] = f"{description or 'a point of sweep ' + sweep_name} (from scenario {base_name})"

    for section in ("set", "grid"):
        if not isinstance(document.get(section, {}), Mapping):
            raise TierflowError(f"{where}: `{section}` must be a table ([{section}]) of scenario keys")
    fixed = _flatten(document.get("set", {}), where=where)
    grid = _flatten(document.get("grid", {}), where=where)
    zips = document.get("zip", [])
    if not isinstance(zips, list) or not all(isinstance(group, Mapping) for group in zips):
        raise TierflowError(f"{where}: `zip` must be an array of tables ([[zip]])")
    zips = [_flatten(group, where=where) for group in zips]
    axis_keys = [*grid, *(k for group in zips for k in group)]
    repeated = {k for k in axis_keys if axis_keys.count(k) > 1} | (set(axis_keys) & set(fixed))
    if repeated:
        raise TierflowError(f"{where}: key {sorted(repeated)[0]!r} is set in more than one place")
    _check_no_overlap([*fixed, *axis_keys], where)
    for key in [*fixed, *axis_keys]:
        _check_key(key, where)
    if "seed" in document:
        if "seed" in fixed or "seed" in axis_keys:
            raise TierflowError(f"{where}: key 'seed' is set in more than one place")
        fixed["seed"] = document["seed"]

    points, seen, digests = [], set(), {}
    for axes in _axis_combinations(grid, zips, where):
        table = json.loads(json.dumps(base_table))  # a deep copy of plain TOML data
        for key, value in {**fixed, **axes}.items():
            if key == "workload.trace" and isinstance(value, str) and value and (base_dir / value).is_file():
                value = str(base_dir / value)  # relative to the sweep file when it is there
            _set_dotted(table, key, value, where)
        seeded = "seed" in fixed or "seed" in axes
        if not seeded:
            table.pop("seed", None)
        try:
            scenario = scenario_from_table(table)
        except TierflowError as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in axes.items())
            raise TierflowError(f"{where}: point {shown}: {error}") from None
        full = scenario_to_table(scenario)
        if not seeded:
            full["seed"] = derived_seed(point_id(_identity_table({k: v for k, v in full.items() if k != "seed"},
                                                                 digests)))
        identity = point_id(_identity_table(full, digests))
        if identity in seen:
            raise TierflowError(f"{where}: two points are the same scenario ({_canonical(axes)}); remove the repeat")
        seen.add(identity)
        points.append(Point(identity, axes, full))
    name = str(document.get("name", where))
    return Sweep(name, str(document.get("description", "")), tuple(axis_keys), tuple(points))


def load_sweep(path) -> Sweep:
    """Read and validate a sweep file."""
    path = Path(path)
    if not path.is_file():
        raise TierflowError(f"sweep file {path}: {not_a_file(path)}")
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is fine
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise TierflowError(f"sweep file {path}: invalid TOML: {error}") from None
    document.setdefault("name", path.stem)
    return parse_sweep(document, path.parent, f"sweep file {path}")


# ---------------------------------------------------------------------------------------------- checking


def check_point(scenario, workloads: dict | None = None) -> None:
    """What a run would reject before simulating: model and hardware names, the trace file (exists, opens as a
    trace, matches the model, holds enough sequences for the batch), capacities against the workload's real
    working set, cache policies and prefetcher with their parameters. The workload is built as the run builds
    it; ``workloads`` keeps what the check needs of those built so far (their length and their layers' experts,
    not the steps), for points that share one. Raises :class:`TierflowError`."""
    from tierflow.cache import make_policy
    from tierflow.catalog import get_model, get_profile
    from tierflow.prefetch import PREFETCHERS
    from tierflow.prefetch.training import check_training_trace
    from tierflow.sim.engine import (
        check_hbm, check_policies, compute_hbm_bandwidth, energy_model, layer_experts, layer_working_sets,
        load_scenario_workload, plan_capacity, prefetch_context)

    spec, hardware = get_model(scenario.model), get_profile(scenario.hardware)
    check_hbm(scenario, spec, hardware)  # a batch whose KV cache cannot fit fails before its steps are built
    w = scenario.workload
    key = (spec.name, w.routing, w.trace, w.batch_size, w.decode_tokens, w.skip_tokens, w.synthetic_sequences,
           scenario.seed)
    workloads = {} if workloads is None else workloads
    if key not in workloads:  # its length, its layers' experts and whether it records predictions, not the steps
        workload = load_scenario_workload(scenario, spec)
        workloads[key] = len(workload.steps), layer_experts(workload), workload.has_predictions
    steps, experts, recorded = workloads[key]
    plan = plan_capacity(scenario, spec, hardware, None, steps=steps,
                         working_sets=layer_working_sets(experts, scenario.gpus, spec.num_moe_layers))
    check_policies(scenario)
    # Built as the run builds them, without a cache behind them: parameters checked, files they name read.
    if plan.hbm_cache_experts is not None:
        make_policy(scenario.cache.policy, scenario.cache.params)
    if plan.ddr_cache_experts is not None:
        make_policy(scenario.ddr_cache.policy, scenario.ddr_cache.params)
    prefetch_params = PREFETCHERS.params(scenario.prefetch.policy, scenario.prefetch.params)
    if getattr(prefetch_params, "train_trace", ""):
        check_training_trace(prefetch_params.train_trace, spec.num_moe_layers, spec.num_routed_experts,
                             scenario.prefetch.policy)
    context = prefetch_context(scenario, spec.num_moe_layers, spec.num_routed_experts, spec.top_k)
    PREFETCHERS.get(scenario.prefetch.policy).check(prefetch_params, context, steps, recorded)
    energy_model(scenario, hardware, plan.gpus)
    compute_hbm_bandwidth(scenario, hardware)


def check_points(sweep: Sweep, points: Iterable[Point] | None = None) -> None:
    """:func:`check_point` for each point (default: all); the first failure names its point."""
    workloads = {}
    for point in sweep.points if points is None else points:
        try:
            check_point(scenario_from_table(point.scenario_table), workloads)
        except TierflowError as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in point.axes.items())
            raise TierflowError(f"sweep {sweep.name}: point {point.point_id} ({shown}): {error}") from None


# ---------------------------------------------------------------------------------------------- one point


@attrs.frozen
class PointOutput:
    """What a worker sends back: the record (parameters, status, summary) and the per-step series."""

    record: dict
    steps: dict | None  # name -> np.ndarray; None for a failed point


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, TierflowError) else f"{type(error).__name__}: {text}"


def run_point(point_id_: str, scenario_table: dict) -> PointOutput:
    """Simulate one point. Never raises: a failure comes back as a record with status ``error``."""
    from tierflow.metrics import utilization_by_kind
    from tierflow.sim.engine import Simulation

    record = {"point_id": point_id_, "status": STATUS_OK, "error": "", "scenario": scenario_table,
              "code": code_fingerprint()}
    started = time.perf_counter()
    try:
        results = Simulation(scenario_from_table(scenario_table)).run()
    except Exception as error:  # noqa: BLE001 - a failing point is recorded, the sweep goes on
        return PointOutput({**record, "status": STATUS_ERROR, "error": _one_line(error),
                            "wall_s": time.perf_counter() - started}, None)
    steps = {"latency_s": results.step_latency_s, "stall_s": results.step_stall_s,
             "hits": results.step_hits, "misses": results.step_misses, "in_flight": results.step_in_flight,
             "prefetch": results.step_prefetch, "tokens": results.step_tokens}
    return PointOutput({**record, "summary": results.summary, "utilization": utilization_by_kind(results.channels),
                        "wall_s": time.perf_counter() - started}, steps)


# ---------------------------------------------------------------------------------------------- files


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def points_dir(out: Path) -> Path:
    return Path(out) / "points"


def save_point(out: Path, point: Point, output: PointOutput) -> None:
    """The point's HDF5 output first, then its JSON record: a record on disk means the point is complete."""
    from tierflow.metrics import Results, write_results_h5

    folder = points_dir(out)
    record = {**output.record, "axes": point.axes}
    if output.steps is not None:
        s = output.steps
        write_results_h5(Results(output.record["summary"], s["latency_s"], s["stall_s"], s["hits"], s["misses"],
                                 point.scenario_table, step_in_flight=s["in_flight"], step_prefetch=s["prefetch"],
                                 step_tokens=s["tokens"]),
                         folder / f"{point.point_id}.h5")
    _write_text(folder / f"{point.point_id}.json", json.dumps(record, indent=1, allow_nan=False))


def load_record(out: Path, identity: str) -> dict | None:
    """A point's record, or None when it has not run (or its file is unreadable or not a record)."""
    path = points_dir(out) / f"{identity}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("point_id") != identity:
        return None
    if not isinstance(record.get("status"), str) or not isinstance(record.get("error"), str):
        return None
    if record["status"] == STATUS_OK and not isinstance(record.get("summary"), dict):
        return None
    return record


FINISHED, STALE, TO_RUN = "finished", "stale", "to run"


def point_state(out: Path, identity: str) -> str:
    """``FINISHED``: the record says ok, was made by these tierflow files, and the HDF5 output reads in full;
    ``STALE``: an ok record made by other tierflow files (another version: its figures may differ);
    ``TO_RUN``: anything else (no record, a failed point, an unreadable or truncated output)."""
    import h5py

    record = load_record(out, identity)
    if record is None or record["status"] != STATUS_OK:
        return TO_RUN
    try:
        with h5py.File(points_dir(out) / f"{identity}.h5", "r") as f:
            json.loads(f.attrs["summary_json"])
            for name in f["steps"]:
                f["steps"][name][()]  # reading every series finds a file cut short
    except Exception:  # noqa: BLE001 - whatever h5py raises for a damaged file: run the point again
        return TO_RUN
    return FINISHED if record.get("code") == code_fingerprint() else STALE


def is_finished(out: Path, identity: str) -> bool:
    """See :func:`point_state`."""
    return point_state(out, identity) == FINISHED


def _flat_columns(prefix: str, value: Any, row: dict) -> None:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            _flat_columns(f"{prefix}.{key}" if prefix else str(key), inner, row)
    else:
        row[prefix] = value


def table_rows(sweep: Sweep, out: Path) -> list[dict]:
    """One row per point in grid order: id, status, error, the axes, every scenario key, every figure.

    Figures are the flattened keys of ``simulate --json`` (``energy_j_per_token.total``, ...), except
    ``scenario`` and ``model``, which repeat the parameters of the same name, then the drives' and links' share
    of bandwidth used (``utilization.ssd.mean``, ``utilization.link.max``, ...). Points not run yet are absent.
    """
    rows = []
    for point in sweep.points:
        record = load_record(out, point.point_id)
        if record is None:
            continue
        row = {"point_id": point.point_id, "status": record["status"], "error": record["error"]}
        row.update(point.axes)
        _flat_columns("", point.scenario_table, row)
        summary = {k: v for k, v in record.get("summary", {}).items() if k not in ("scenario", "model")}
        _flat_columns("", summary, row)
        _flat_columns("utilization", record.get("utilization", {}), row)
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    # Figures that only ok rows have (bytes_moved.*) go where they first appear; that order is stable.
    return list(columns)


def _column_array(values: list) -> np.ndarray:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.array(values, dtype=bool)
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.array(values, dtype=np.int64)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    text = ["" if v is None else v if isinstance(v, str) else _canonical(v) for v in values]
    return np.array(text, dtype=object)


def write_table(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """``results.h5`` (group ``points``: one dataset per column, ``columns`` attribute in order) and ``results.csv``."""
    import h5py

    out = Path(out)
    columns = _columns(rows)

    def write_h5(tmp: str) -> None:
        with H5Output(tmp) as f:
            group = f.create_group("points")
            group.attrs["columns"] = json.dumps(columns)
            for column in columns:
                array = _column_array([row.get(column) for row in rows])
                if array.dtype == object:
                    group.create_dataset(column, data=array.astype(str).tolist(), dtype=h5py.string_dtype())
                else:
                    group[column] = array

    def write_csv(tmp: str) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            cells = [row.get(c) for c in columns]
            writer.writerow(["" if v is None else v if isinstance(v, (str, int, float)) else _canonical(v)
                             for v in cells])
        Path(tmp).write_text(buffer.getvalue())

    h5_path, csv_path = out / "results.h5", out / "results.csv"
    atomic_write(h5_path, write_h5)
    atomic_write(csv_path, write_csv)
    return h5_path, csv_path


def read_table(path) -> dict[str, np.ndarray]:
    """``results.h5`` back as ordered columns (strings as ``str``)."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f["points"]
        columns = json.loads(group.attrs["columns"])
        table = {}
        for column in columns:
            data = group[column]
            table[column] = (np.array(data.asstr()[()], dtype=object) if h5py.check_string_dtype(data.dtype)
                             else data[()])
    return table


# ---------------------------------------------------------------------------------------------- executors


def _run_point(point: Point) -> PointOutput:
    return run_point(point.point_id, point.scenario_table)


def _run_local(todo: list[Point], workers: int) -> Iterable[PointOutput | None]:
    """None (the runs begin), then outputs as points finish. On several workers (see
    :func:`tierflow.workers.run_parallel`) an interruption stops the points running at once (they are not
    saved), and a point whose worker dies is recorded as an error only if it kills its worker again when it
    runs alone."""
    yield None
    if workers == 1:
        for point in todo:
            yield _run_point(point)
        return
    for index, output, error in run_parallel(_run_point, todo, workers):
        yield output if error is None else _error_output(todo[index], error)


def _error_output(point: Point, error: BaseException) -> PointOutput:
    return PointOutput({"point_id": point.point_id, "status": STATUS_ERROR, "error": _one_line(error),
                        "scenario": point.scenario_table, "code": code_fingerprint(), "wall_s": 0.0}, None)


def _result_or_error(future, point: Point) -> PointOutput:
    try:
        return future.result()
    except Exception as error:  # noqa: BLE001 - the worker died (killed, out of memory): record it
        return _error_output(point, error)


def _run_dask(todo: list[Point], workers: int, scheduler: str | None, client=None) -> Iterable[PointOutput | None]:
    """None once the scheduler is reached (or a local cluster started), then outputs as points finish."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise TierflowError("--engine dask needs dask.distributed: pip install 'dask[distributed]'") from None
    cluster = None
    if client is None:
        if scheduler:
            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError, ValueError) as error:  # ValueError: not an address
                raise TierflowError(f"--scheduler {scheduler}: cannot connect: {_one_line(error)}") from None
        else:
            # Ctrl-C stops this process, which closes the cluster: one line, not a traceback from every worker.
            with sigint_ignored():
                cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=50)  # logging.CRITICAL: no shutdown noise
            client = Client(cluster)
        owned = client
    else:
        owned = None
    try:
        yield None
        futures = {client.submit(run_point, p.point_id, p.scenario_table, key=f"tierflow-point-{p.point_id}",
                                 pure=False): p for p in todo}
        try:
            for future in as_completed(futures):
                yield _result_or_error(future, futures[future])
        finally:
            client.cancel(list(futures))
    finally:
        if owned is not None:
            owned.close()
        if cluster is not None:
            cluster.close()


@attrs.frozen
class SweepOutcome:
    total: int
    skipped: int  # finished in an earlier run
    ran: int
    errors: int  # points whose record says error, across the whole table
    table_h5: Path
    table_csv: Path


def run_sweep(sweep: Sweep, out, workers: int | None = None, engine: str = "local", scheduler: str | None = None,
              client=None, progress: Callable[[int], None] | None = None, checked: bool = False,
              todo: list[Point] | None = None) -> SweepOutcome:
    """Run the points not finished yet, saving each as it arrives, then rebuild the table from the records.

    ``client``: an existing ``dask.distributed.Client`` (engine ``dask``); ``progress(n)`` is called with 0 when
    the runs begin (a dask scheduler reached), then with 1 as each point finishes; ``checked``: the caller has
    already run :func:`check_points` on the points to run;
    ``todo``: the points not finished, when the caller has already looked (a look reads every finished output).
    """
    if engine not in ENGINES:
        raise TierflowError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise TierflowError(f"--workers must be >= 1, got {workers}")
    out = Path(out)
    if todo is None:
        todo = [p for p in sweep.points if not is_finished(out, p.point_id)]
    if not checked:
        check_points(sweep, todo)  # before anything runs or is written
    output_dir(out)
    with _writing(out):
        todo = [p for p in todo if not is_finished(out, p.point_id)]  # none, unless a run ended meanwhile
        by_id = {p.point_id: p for p in todo}
        if todo:
            workers = min(workers, len(todo))
            outputs = _run_dask(todo, workers, scheduler, client) if engine == "dask" else _run_local(todo, workers)
            with contextlib.closing(outputs):  # stops the workers at once if saving is interrupted
                for output in outputs:
                    if output is None:  # the runs begin (a scheduler was reached): a progress bar may show now
                        if progress is not None:
                            progress(0)
                        continue
                    save_point(out, by_id[output.record["point_id"]], output)
                    if progress is not None:
                        progress(1)
        rows = table_rows(sweep, out)
        h5_path, csv_path = write_table(rows, out)
        # Last, beside the table it describes: an interrupted run of a changed sweep leaves the old pair.
        _write_text(out / "sweep.json", json.dumps(
            {"name": sweep.name, "description": sweep.description, "axes": list(sweep.axis_keys),
             "points": [p.point_id for p in sweep.points]}, indent=1))
    errors = sum(row["status"] == STATUS_ERROR for row in rows)
    return SweepOutcome(len(sweep.points), len(sweep.points) - len(todo), len(todo), errors, h5_path, csv_path)


@contextlib.contextmanager
def _writing(out: Path):
    """Hold ``out/.lock`` while this sweep writes ``out``: a second sweep into the same folder is an error
    (it would redo the same points), and the temporary files a killed run left there can be removed."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock, and temporary files are left alone
        yield
        return
    lock = out / ".lock"
    if lock.is_symlink() or (lock.exists() and not lock.is_file()):  # a FIFO would block the open below
        raise TierflowError(f"{lock}: not a regular file; a sweep locks its folder with it (remove it)")
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TierflowError(f"{out}: another tierflow sweep is writing to this folder; wait for it to end "
                                "or choose another --out") from None
        for folder, pattern in ((out, _OWN_TEMPORARY), (points_dir(out), _POINT_TEMPORARY)):
            for stray in folder.glob("*.tmp"):
                if pattern.fullmatch(stray.name) and stray.is_file():
                    stray.unlink(missing_ok=True)
        yield


# The temporary files a killed sweep can leave (see tierflow.atomic: NAME.XXXXXXXX.tmp beside NAME); only these are
# removed, never another file that happens to end in .tmp.
_OWN_TEMPORARY = re.compile(r"(results\.h5|results\.csv|sweep\.json)\.[a-z0-9_]{8}\.tmp")
_POINT_TEMPORARY = re.compile(r"[0-9a-f]{12}\.(h5|json)\.[a-z0-9_]{8}\.tmp")
