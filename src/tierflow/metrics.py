"""Results of a simulation: the summary ``simulate --json`` prints, a readable table, and an HDF5 writer.

Per-token figures follow the decode convention: a step produces one token for each sequence of the batch,
so latency and stall per token are per step (what each sequence waits for its next token), while energy per
token is the step's energy divided by the tokens it produced.
"""

from __future__ import annotations

import json
import math

import attrs
import numpy as np

from tierflow.atomic import H5Output, atomic_write
from tierflow.energy import COMPONENTS, ledger_energy_j, route_energy_j
from tierflow.errors import TierflowError


@attrs.frozen
class Results:
    summary: dict  # exactly the keys of `simulate --json`
    step_latency_s: np.ndarray
    step_stall_s: np.ndarray
    step_hits: np.ndarray
    step_misses: np.ndarray
    scenario_table: dict
    # Per MoE layer, demand lookups summed over GPUs: {"hits", "in_flight", "misses"} -> (layers,) arrays.
    layers: dict | None = None
    # Per link or drive: {"name", "kind", "busy_s", "busy_share", "utilization", "bytes", "preemptions"} (see
    # channel_figures).
    channels: list | None = None
    # Per step, demand lookups that found their expert in flight (a prefetch not yet landed): the summary's hit
    # rate counts them as hits, ``step_hits`` only counts experts already resident.
    step_in_flight: np.ndarray | None = None
    # Per step, the prefetches: "issued", "useful", "late", "wasted_bytes", "on_target" (PREFETCH_SERIES) -> arrays
    # that sum to the summary's figures (prefetched experts still unused when the run ends are wasted on the last
    # step). None: no prefetcher.
    step_prefetch: dict | None = None
    # Background power by device over the deployment, W: "gpu" (with its HBM), "ddr", "ssd" (the static energy's
    # split).
    static_w: dict | None = None
    # Per step, the tokens it decoded (its sequences): fewer than the batch once the trace runs out. The per-token
    # figures weight each step by them.
    step_tokens: np.ndarray | None = None


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def collect_results(sim) -> Results:
    """Figures from a finished :class:`~tierflow.sim.engine.Simulation`."""
    from tierflow.config import scenario_to_table

    records = sim.stream.records
    latency = np.array([r.latency_s for r in records])
    stall = np.array([r.stall_s for r in records])
    tokens = sim.workload.tokens
    # Per token: a step decodes one token of each of its sequences, which all wait its latency. When the trace
    # runs out and steps decode fewer sequences, a step counts once per token it decodes.
    per_token = np.array([len(step.sequence_ids) for step in sim.workload.steps[: len(records)]], dtype=np.int64)
    token_latency, token_stall = np.repeat(latency, per_token), np.repeat(stall, per_token)
    elapsed = sim.elapsed_s
    joules = ledger_energy_j(sim.energy, sim.ledger, elapsed)
    if not all(math.isfinite(value) for value in joules.values()):
        raise TierflowError(f"the energy overflows ({', '.join(k for k, v in joules.items() if not math.isfinite(v))}"
                            f" not finite): the energy.* settings are too large")
    memories = sim.memories
    hbm_caches = [m.hbm for m in memories if m.hbm is not None]
    prefetch = _prefetch_figures(sim, tokens)
    peak_hbm = sim.plan.non_expert_bytes_per_gpu + sim.plan.kv_bytes_per_gpu
    if sim.scenario.placement == "hbm":
        peak_hbm += sim.plan.expert_bytes * -(-sim.spec.num_routed_experts // sim.plan.gpus) * sim.spec.num_moe_layers
    elif hbm_caches:
        peak_hbm += max(m.peak_cache_bytes for m in memories)
    else:  # experts streamed for each layer (with copies queued ahead, many layers' at once)
        peak_hbm += max(m.peak_streamed_bytes for m in memories)
    summary = {
        "scenario": sim.scenario.name,
        "model": sim.spec.name,
        "batch_size": sim.scenario.workload.batch_size,
        "tokens": tokens,
        "latency_s_per_token": {
            "mean": float(token_latency.mean()) if len(token_latency) else 0.0,
            "p50": _percentile(token_latency, 50),
            "p99": _percentile(token_latency, 99),
        },
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "stall_s_per_token": float(token_stall.mean()) if len(token_stall) else 0.0,
        "hit_rate": {"hbm": _hit_rate(hbm_caches), "ddr": _ddr_demand_hit_rate(memories)},
        "bytes_moved": sim.ledger.bytes_moved(),
        "energy_j_per_token": {name: joules[name] / tokens for name in ("total", *COMPONENTS)},
        "prefetch": prefetch,
        "peak_hbm_bytes": int(peak_hbm),
    }
    return Results(
        summary=summary,
        step_latency_s=latency,
        step_stall_s=stall,
        step_hits=np.array([r.hits for r in records]),
        step_misses=np.array([r.misses for r in records]),
        scenario_table=scenario_to_table(sim.scenario),
        layers=None if sim.scenario.placement == "hbm" else {
            name: np.sum([getattr(m, f"{name}_by_layer") for m in memories], axis=0, dtype=np.int64)
            for name in ("hits", "in_flight", "misses")},
        channels=channel_figures(sim.channels, max(elapsed, sim.calendar.now)),
        step_in_flight=np.array([r.in_flight for r in records]),
        step_prefetch=_step_prefetch(records, prefetch) if sim.prefetcher is not None else None,
        static_w=dict(sim.energy.static_w),
        step_tokens=per_token,
    )


def _step_prefetch(records, totals: dict) -> dict:
    """The per-step prefetch series; what the run's end found unused goes to the last step."""
    from tierflow.sim.gpu import PREFETCH_SERIES

    series = {name: np.array([r.prefetch[i] for r in records], dtype=np.int64)
              for i, name in enumerate(PREFETCH_SERIES)}
    if len(records):
        series["wasted_bytes"][-1] += totals["wasted_bytes"] - int(series["wasted_bytes"].sum())
    return series


def channel_figures(channels, horizon_s: float) -> list[dict]:
    """Per link or drive, over the run (until the last transfer landed, which may be after the last token):
    ``busy_s`` and ``busy_share``, the time it held a transfer so that others queued (a link fed by a drive
    holds a transfer only for the part that does not overlap the drive's read); ``utilization``, the share of
    its bandwidth its bytes used; the bytes; and how often a demand miss took it over from a prefetch. ``kind``
    is ``"ssd"`` for a drive, ``"link"`` for a link."""
    share = (lambda seconds: seconds / horizon_s) if horizon_s > 0 else (lambda seconds: 0.0)
    return [{"name": c.name, "kind": c.kind, "busy_s": c.busy_s, "busy_share": share(c.busy_s),
             "utilization": share(c.bytes_carried / c.bandwidth_bytes_per_s), "bytes": c.bytes_carried,
             "preemptions": c.preemptions} for c in channels]


def utilization_by_kind(channels: list[dict], kind=lambda channel: channel["kind"]) -> dict:
    """The share of bandwidth used, ``{"mean", "max"}`` over the GPUs' channels of each kind present (none
    without offloading): by default their drives (``"ssd"``) and links (``"link"``)."""
    kinds: dict[str, list[float]] = {}
    for channel in channels:
        kinds.setdefault(kind(channel), []).append(channel["utilization"])
    return {name: {"mean": sum(values) / len(values), "max": max(values)} for name, values in kinds.items()}


def layer_hit_rates(layers: dict) -> np.ndarray:
    """Each layer's share of demand lookups that found the expert resident or on its way (as the cache counts
    a hit); NaN for a layer never looked up."""
    lookups = layers["hits"] + layers["in_flight"] + layers["misses"]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (layers["hits"] + layers["in_flight"]) / lookups


def _prefetch_figures(sim, tokens: int) -> dict:
    """issued, useful (used before eviction), late (still in flight when needed), wasted bytes; accuracy
    (useful / issued), on-target accuracy (the share of prefetches the step they were proposed for used: a
    useful one may serve a later step instead, kept in the cache since), coverage (the share of would-be demand
    misses a prefetch served: useful / (useful + demand misses)), and energy per token of the prefetched bytes
    and of the wasted ones, apart from the demand misses'."""
    stats = [m.prefetch for m in sim.memories]
    issued, useful = sum(s.issued for s in stats), sum(s.useful for s in stats)
    misses = sum(m.demand_misses for m in sim.memories)
    wasted = {}
    for s in stats:
        for route, size in s.wasted_by_route.items():
            wasted[route] = wasted.get(route, 0) + size
    wasted_j = sum(sum(route_energy_j(sim.energy, route, size).values()) for route, size in wasted.items())
    prefetched_j = sum(sum(route_energy_j(sim.energy, route, size).values())
                       for route, size in sim.ledger.prefetch_bytes.items())
    return {
        "issued": issued,
        "useful": useful,
        "late": sum(s.late for s in stats),
        "wasted_bytes": sum(s.wasted_bytes for s in stats),
        "accuracy": useful / issued if issued else None,
        "on_target": sum(s.on_target for s in stats),
        "on_target_accuracy": sum(s.on_target for s in stats) / issued if issued else None,
        "coverage": useful / (useful + misses) if useful + misses else None,
        "prefetched_bytes": sum(sim.ledger.prefetch_bytes.values()),
        "energy_j_per_token": prefetched_j / tokens if tokens else 0.0,
        "wasted_energy_j_per_token": wasted_j / tokens if tokens else 0.0,
    }


def _ddr_demand_hit_rate(memories) -> float | None:
    """DDR hits over the DDR lookups of demand misses in HBM (prefetches aside, as in the HBM hit rate)."""
    with_ddr = [m for m in memories if m.ddr is not None]
    if not with_ddr:
        return None
    lookups = sum(m.ddr_demand_lookups for m in with_ddr)
    return sum(m.ddr_demand_hits for m in with_ddr) / lookups if lookups else None


def _hit_rate(caches) -> float | None:
    if not caches:
        return None
    hits = sum(c.stats.hits for c in caches)
    requests = sum(c.stats.requests for c in caches)
    return hits / requests if requests else None


def format_table(summary: dict, results: Results | None = None) -> str:
    """A readable summary of :attr:`Results.summary`, with the layers' spread of hit rates and the busiest
    kinds of channel when ``results`` are given."""
    s = summary
    lat = s["latency_s_per_token"]
    rate = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    # At batch B a step gives each of B sequences its next token: a sequence waits a step per token.
    per_sequence = "   (each sequence's time per token: one step)" if s["batch_size"] > 1 else ""
    lines = [
        f"scenario          {s['scenario']}  ({s['model']}, batch {s['batch_size']}, {s['tokens']:,} tokens)",
        f"latency/token     mean {lat['mean'] * 1e3:.3f} ms   p50 {lat['p50'] * 1e3:.3f} ms   p99 {lat['p99'] * 1e3:.3f} ms"
        + per_sequence,
        f"throughput        {s['tokens_per_s']:.1f} tokens/s",
        f"stall/token       {s['stall_s_per_token'] * 1e3:.3f} ms",
        f"hit rate          HBM {rate(s['hit_rate']['hbm'])}   DDR {rate(s['hit_rate']['ddr'])}",
        "bytes moved       " + _bytes_line(s["bytes_moved"], s["tokens"]),
        "energy/token      " + "   ".join(f"{k} {v:.3f} J" for k, v in s["energy_j_per_token"].items()),
        "prefetch          " + _prefetch_line(s["prefetch"]),
        f"peak HBM          {s['peak_hbm_bytes'] / 1e9:.2f} GB per GPU",
    ]
    if results is not None and results.layers is not None and s["hit_rate"]["hbm"] is not None:  # a cache
        rates = layer_hit_rates(results.layers)
        if not np.isnan(rates).all():
            low, high = int(np.nanargmin(rates)), int(np.nanargmax(rates))
            lines.insert(5, f"hit rate by layer lowest {100 * rates[low]:.1f}% (MoE layer {low})   highest "
                            f"{100 * rates[high]:.1f}% (MoE layer {high})")
    if results is not None and results.static_w and sum(results.static_w.values()) > 0:
        # Static energy by device: the deployment's DDR and drives draw power whether or not a run uses them.
        static, watts = s["energy_j_per_token"]["static"], sum(results.static_w.values())
        after_energy = next(i for i, line in enumerate(lines) if line.startswith("energy/token")) + 1
        lines.insert(after_energy, "static by device  " + "   ".join(
            f"{name} {static * w / watts:.3f} J ({w:,.0f} W)" for name, w in results.static_w.items()))
    if results is not None and results.channels and any(c["bytes"] for c in results.channels):
        lines.append("utilization       " + _utilization_line(results.channels))
    return "\n".join(lines)


def _bytes_line(moved: dict, tokens: int) -> str:
    """Each route's bytes per token, as the other lines, and over the whole run."""
    if not moved:
        return "none"
    if not tokens:
        return "   ".join(f"{k} {v / 1e9:.2f} GB" for k, v in moved.items())
    return "   ".join(f"{k} {v / tokens / 1e9:.2f} GB/token ({v / 1e9:.2f} GB in all)" for k, v in moved.items())


def _utilization_line(channels: list[dict]) -> str:
    """Bandwidth used, by kind of channel (the name without its GPU number): mean over the GPUs, and the
    highest."""
    kinds = utilization_by_kind(channels, lambda channel: channel["name"].split(" #")[0])
    return "   ".join(f"{kind} {100 * u['mean']:.1f}% (max {100 * u['max']:.1f}%)" for kind, u in kinds.items())


def _prefetch_line(p: dict) -> str:
    if not p["issued"]:
        return "none issued"
    return (f"issued {p['issued']:,}   useful {p['useful']:,}   late {p['late']:,}   accuracy {100 * p['accuracy']:.1f}%"
            f" (on target {100 * p['on_target_accuracy']:.1f}%)   coverage {100 * (p['coverage'] or 0):.1f}%"
            f"   wasted {p['wasted_bytes'] / 1e9:.2f} GB ({p['wasted_energy_j_per_token']:.3f} J/token)")


def write_results_h5(results: Results, path) -> None:
    """The summary and the scenario (as JSON in the root attributes ``summary_json`` and ``scenario_json``), the
    per-step series and, when known, per-layer lookups and per-channel figures, written atomically."""

    def write(tmp: str) -> None:
        with H5Output(tmp) as f:
            f.attrs["summary_json"] = json.dumps(results.summary)
            f.attrs["scenario_json"] = json.dumps(results.scenario_table)
            steps = f.create_group("steps")
            steps["latency_s"] = results.step_latency_s
            steps["stall_s"] = results.step_stall_s
            steps["hits"] = results.step_hits
            steps["misses"] = results.step_misses
            if results.step_tokens is not None:
                steps["tokens"] = results.step_tokens
            if results.step_in_flight is not None:
                steps["in_flight"] = results.step_in_flight
            for name, series in (results.step_prefetch or {}).items():
                steps[f"prefetch_{name}"] = series
            if results.layers is not None:
                layers = f.create_group("layers")
                for name, counts in results.layers.items():
                    layers[name] = counts
            if results.channels:
                channels = f.create_group("channels")
                channels["name"] = [c["name"] for c in results.channels]
                for field in ("busy_s", "busy_share", "utilization", "bytes", "preemptions"):
                    channels[field] = np.array([c[field] for c in results.channels])

    atomic_write(path, write)
