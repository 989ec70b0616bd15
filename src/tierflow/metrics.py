"""Results of a simulation: the summary ``simulate --json`` prints, a readable table, and an HDF5 writer.

Per-token figures follow the decode convention: a step produces one token for each sequence of the batch,
so latency and stall per token are per step (what each sequence waits for its next token), while energy per
token is the step's energy divided by the tokens it produced.
"""

from __future__ import annotations

import json

import attrs
import h5py
import numpy as np

from tierflow.atomic import atomic_write
from tierflow.energy import COMPONENTS, ledger_energy_j, route_energy_j


@attrs.frozen
class Results:
    summary: dict  # exactly the keys of `simulate --json`
    step_latency_s: np.ndarray
    step_stall_s: np.ndarray
    step_hits: np.ndarray
    step_misses: np.ndarray
    scenario_table: dict


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def collect_results(sim) -> Results:
    """Figures from a finished :class:`~tierflow.sim.engine.Simulation`."""
    from tierflow.config import scenario_to_table

    records = sim.stream.records
    latency = np.array([r.latency_s for r in records])
    stall = np.array([r.stall_s for r in records])
    tokens = sim.workload.tokens
    elapsed = sim.elapsed_s
    joules = ledger_energy_j(sim.energy, sim.ledger, elapsed)
    memories = sim.memories
    hbm_caches = [m.hbm for m in memories if m.hbm is not None]
    ddr_caches = [m.ddr for m in memories if m.ddr is not None]
    prefetch = _prefetch_figures(sim, tokens)
    peak_hbm = sim.plan.non_expert_bytes_per_gpu + sim.plan.kv_bytes_per_gpu
    if sim.scenario.placement == "hbm":
        peak_hbm += sim.plan.expert_bytes * -(-sim.spec.num_routed_experts // sim.plan.gpus) * sim.spec.num_moe_layers
    elif hbm_caches:
        peak_hbm += max(m.peak_cache_bytes for m in memories)
    else:
        peak_hbm += sim.plan.working_set_experts * sim.plan.expert_bytes
    summary = {
        "scenario": sim.scenario.name,
        "model": sim.spec.name,
        "batch_size": sim.scenario.workload.batch_size,
        "tokens": tokens,
        "latency_s_per_token": {
            "mean": float(latency.mean()) if len(latency) else 0.0,
            "p50": _percentile(latency, 50),
            "p99": _percentile(latency, 99),
        },
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "stall_s_per_token": float(stall.mean()) if len(stall) else 0.0,
        "hit_rate": {"hbm": _hit_rate(hbm_caches), "ddr": _hit_rate(ddr_caches)},
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
    )


def _prefetch_figures(sim, tokens: int) -> dict:
    """issued, useful (used before eviction), late (still in flight when needed), wasted bytes; accuracy
    (useful / issued), coverage (the share of would-be demand misses a prefetch served: useful / (useful +
    demand misses)), and energy per token of the prefetched bytes and of the wasted ones, apart from the
    demand misses'."""
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
        "coverage": useful / (useful + misses) if useful + misses else None,
        "prefetched_bytes": sum(sim.ledger.prefetch_bytes.values()),
        "energy_j_per_token": prefetched_j / tokens if tokens else 0.0,
        "wasted_energy_j_per_token": wasted_j / tokens if tokens else 0.0,
    }


def _hit_rate(caches) -> float | None:
    if not caches:
        return None
    hits = sum(c.stats.hits for c in caches)
    requests = sum(c.stats.requests for c in caches)
    return hits / requests if requests else None


def format_table(summary: dict) -> str:
    """A readable summary of :attr:`Results.summary`."""
    s = summary
    lat = s["latency_s_per_token"]
    rate = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [
        f"scenario          {s['scenario']}  ({s['model']}, batch {s['batch_size']}, {s['tokens']:,} tokens)",
        f"latency/token     mean {lat['mean'] * 1e3:.3f} ms   p50 {lat['p50'] * 1e3:.3f} ms   p99 {lat['p99'] * 1e3:.3f} ms",
        f"throughput        {s['tokens_per_s']:.1f} tokens/s",
        f"stall/token       {s['stall_s_per_token'] * 1e3:.3f} ms",
        f"hit rate          HBM {rate(s['hit_rate']['hbm'])}   DDR {rate(s['hit_rate']['ddr'])}",
        "bytes moved       " + ("   ".join(f"{k} {v / 1e9:.2f} GB" for k, v in s["bytes_moved"].items()) or "none"),
        "energy/token      " + "   ".join(f"{k} {v:.3f} J" for k, v in s["energy_j_per_token"].items()),
        "prefetch          " + _prefetch_line(s["prefetch"]),
        f"peak HBM          {s['peak_hbm_bytes'] / 1e9:.2f} GB per GPU",
    ]
    return "\n".join(lines)


def _prefetch_line(p: dict) -> str:
    if not p["issued"]:
        return "none issued"
    return (f"issued {p['issued']:,}   useful {p['useful']:,}   late {p['late']:,}   accuracy {100 * p['accuracy']:.1f}%"
            f"   coverage {100 * (p['coverage'] or 0):.1f}%   wasted {p['wasted_bytes'] / 1e9:.2f} GB"
            f" ({p['wasted_energy_j_per_token']:.3f} J/token)")


def write_results_h5(results: Results, path) -> None:
    """The summary (as JSON and as attributes) and the per-step series, written atomically."""

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs["summary_json"] = json.dumps(results.summary)
            f.attrs["scenario_json"] = json.dumps(results.scenario_table)
            steps = f.create_group("steps")
            steps["latency_s"] = results.step_latency_s
            steps["stall_s"] = results.step_stall_s
            steps["hits"] = results.step_hits
            steps["misses"] = results.step_misses

    atomic_write(path, write)
