"""The prefetcher table of issue 5: accuracy, coverage, stall per token and wasted energy of every registered
prefetcher on a synthetic DeepSeek-R1 trace and an imported Mixtral-8x7B fixture, at batch 1 and batch 16.

    python scripts/prefetch_table.py [--work-dir DIR] [--steps 128] [--batched-steps 48] [--jobs 2] [--json]

Traces (written once into ``--work-dir`` and reused):

* ``deepseek-r1.h5``: ``tierflow trace gen --model deepseek-r1 --tokens 40000 --seed 1``;
* ``mixtral-imported.h5``: synthetic Mixtral-shaped routing written as per-step JSONL and passed through
  ``tierflow trace import --format per-step`` (``scripts/make_mixtral_fixture.py``, 30000 tokens, seed 7).
  It exercises the import path and Mixtral's shape, not real Mixtral routing.

Deployments: DeepSeek-R1 as the shipped ``ssd_offload`` scenario (8 x H200, experts on NVMe, an LRU cache of a
quarter of the experts); Mixtral-8x7B (BF16, 90 GB of experts) on one H100 with an LRU cache of half its
experts (a quarter, 64, is exactly one decode step of experts at batch 1, where any prefetch breaks the LRU
cycle).
Every prefetcher runs with the engine settings of ``ssd_prefetch`` (lookahead 2, budget 8 experts per routing
event, prefetch only into an idle SSD queue: ``--max-queued 1``; a larger value lets prefetches queue behind
busy drives, which is the only way any are issued when demand keeps the drives busy, as at batch 16). ``speculative_gate`` and ``expert_map`` learn from the last
10,000 (4,096) decode tokens of the same file, sequences the runs never decode (the loader checks). The
baseline ``none`` comes from the same run of this script.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRACES = {
    # label -> overrides of the shipped ssd_offload scenario
    "deepseek-r1 (synthetic)": [],
    "mixtral-8x7b (imported)": ["model=mixtral-8x7b", "gpus=1", "hardware=h100-pcie5", "cache.capacity_experts=128"],
}
ENGINE = ["prefetch.lookahead=2", "prefetch.budget_experts=8"]
LEARNS_FROM_FILE = {"speculative_gate", "expert_map"}


def make_traces(work_dir: Path) -> dict[str, Path]:
    from tierflow.trace.synth import generate

    work_dir.mkdir(parents=True, exist_ok=True)
    deepseek = work_dir / "deepseek-r1.h5"
    if not deepseek.exists():
        generate("deepseek-r1", 40_000, deepseek, seed=1)
    mixtral = work_dir / "mixtral-imported.h5"
    if not mixtral.exists():
        sys.path.insert(0, str(HERE))
        import make_mixtral_fixture

        make_mixtral_fixture.main([str(work_dir), "--tokens", "30000", "--seed", "7"])
    return {"deepseek-r1 (synthetic)": deepseek, "mixtral-8x7b (imported)": mixtral}


def run_one(job: dict) -> dict:
    """Simulate one (trace, batch, prefetcher) and keep the table's figures."""
    from tierflow.config import load_scenario
    from tierflow.sim.engine import Simulation

    overrides = [*job["overrides"], *ENGINE, f"prefetch.max_queued={job['max_queued']}",
                 f"prefetch.policy={job['prefetcher']}",
                 f"workload.batch_size={job['batch']}", f"workload.decode_tokens={job['steps']}",
                 f'workload.trace="{job["trace"]}"']
    if job["prefetcher"] in LEARNS_FROM_FILE:
        overrides.append(f'prefetch.params.train_trace="{job["trace"]}"')
    summary = Simulation(load_scenario("ssd_offload", overrides)).run().summary
    p = summary["prefetch"]
    return {
        "trace": job["label"], "batch": job["batch"], "prefetcher": job["prefetcher"], "steps": job["steps"],
        "max_queued": job["max_queued"],
        "accuracy": p["accuracy"], "coverage": p["coverage"], "issued": p["issued"], "late": p["late"],
        "stall_s_per_token": summary["stall_s_per_token"],
        "latency_s_per_token": summary["latency_s_per_token"]["mean"],
        "wasted_energy_j_per_token": p["wasted_energy_j_per_token"],
        "prefetch_energy_j_per_token": p["energy_j_per_token"],
        "energy_j_per_token": summary["energy_j_per_token"]["total"],
        "hbm_hit_rate": summary["hit_rate"]["hbm"],
    }


def format_rows(rows: list[dict]) -> str:
    none = {(r["trace"], r["batch"]): r["stall_s_per_token"] for r in rows if r["prefetcher"] == "none"}
    queued = sorted({r["max_queued"] for r in rows})
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = ["| trace | batch | prefetcher | accuracy | coverage | stall/token (ms) | stall vs none | wasted energy "
             "(J/token) | energy/token (J) | issued | late |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = none.get((r["trace"], r["batch"]))
        cut = "—" if not base else f"{100 * (r['stall_s_per_token'] / base - 1):+.1f}%"
        lines.append(f"| {r['trace']} | {r['batch']} | `{r['prefetcher']}` | {pct(r['accuracy'])} "
                     f"| {pct(r['coverage'])} | {r['stall_s_per_token'] * 1e3:.1f} | {cut} "
                     f"| {r['wasted_energy_j_per_token']:.2f} | {r['energy_j_per_token']:.1f} | {r['issued']:,} "
                     f"| {r['late']:,} |")
    lines.append(f"\n(prefetch.max_queued = {', '.join(map(str, queued))}; stall vs none: the same trace and batch)")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    from tierflow.prefetch import PREFETCHERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("build/prefetch_table"))
    parser.add_argument("--steps", type=int, default=128, help="decode steps at batch 1")
    parser.add_argument("--batched-steps", type=int, default=48, help="decode steps at batch 16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-queued", type=int, default=1,
                        help="prefetch.max_queued: 1 prefetches only into an idle SSD queue (as ssd_prefetch)")
    parser.add_argument("--prefetchers", nargs="+", default=None, help="default: every registered one")
    parser.add_argument("--jobs", type=int, default=2, help="simulations run in parallel")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    traces = make_traces(args.work_dir)
    names = args.prefetchers or ["none", "oracle", *[n for n in PREFETCHERS.names() if n not in ("none", "oracle")]]
    jobs = [{"label": label, "trace": str(traces[label]), "overrides": TRACES[label], "batch": batch,
             "steps": args.steps if batch == 1 else args.batched_steps, "prefetcher": name,
             "max_queued": args.max_queued}
            for label in TRACES for batch in args.batches for name in names]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_one, jobs))
    print(json.dumps(rows, indent=2) if args.json else format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
