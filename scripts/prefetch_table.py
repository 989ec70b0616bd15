"""The prefetcher table of issue 5: accuracy, coverage, stall per token and wasted energy of every registered
prefetcher on a synthetic DeepSeek-R1 trace and an imported Mixtral-8x7B fixture, at batch 1 and batch 16, each
on two deployments: one whose expert reads are bandwidth-bound (SSD) and one whose links idle during compute
(host DDR over NVLink-C2C), where prefetching can hide transfers.

    python scripts/prefetch_table.py [--work-dir DIR] [--steps 128] [--batched-steps 32] [--jobs 2] [--json]

Traces (written once into ``--work-dir`` and reused):

* ``deepseek-r1.h5``: ``tierflow trace gen --model deepseek-r1 --tokens 40000 --seed 1``;
* ``mixtral-imported.h5``: synthetic Mixtral-shaped routing written as per-step JSONL and passed through
  ``tierflow trace import --format per-step`` (``scripts/make_mixtral_fixture.py``, 30000 tokens, seed 7).
  It exercises the import path and Mixtral's shape, not real Mixtral routing.

Deployments (the cache sizes are the same on both of a trace's deployments):

* ``ssd``: DeepSeek-R1 as the shipped ``ssd_offload`` scenario (8 x H200, experts on NVMe, an LRU cache of a
  quarter of the experts); Mixtral-8x7B (BF16, 90 GB of experts) on one H100 with an LRU cache of half its
  experts (a quarter, 64, is exactly one decode step of experts at batch 1, where any prefetch breaks the LRU
  cycle). Lookahead 2.
* ``ddr``: the experts in host DDR behind NVLink-C2C (``gh200-c2c``: 450 GB/s per GPU each way). DeepSeek-R1 on
  8 GPUs, lookahead 2; Mixtral-8x7B on 8 GPUs (expert-parallel, a GPU holds one expert of each layer), lookahead
  6. Chosen from link time against compute time (printed by this script with ``--physics``): a deployment
  lets prefetching pay when the demand misses keep each GPU's link busy for less than the compute time, and the
  lookahead covers one expert's transfer: ``lookahead >= transfer time / compute time per layer`` (DeepSeek-R1:
  98 us / 69 us -> 2; Mixtral: 783 us / 131 us -> 6).

Every prefetcher runs with the engine settings of ``ssd_prefetch`` (budget 8 experts per routing event,
prefetch only into an idle queue: ``--max-queued 1``; a larger value lets prefetches queue behind busy drives,
which is the only way any are issued when demand keeps the drives busy, as at batch 16) and the deployment's
lookahead. ``speculative_gate`` and ``expert_map`` learn from the last 10,000 (4,096) decode tokens of the same
file, sequences the runs never decode (the loader checks); on DeepSeek-R1 ``speculative_gate`` reads three
layers of routing (``history=3``, chosen on a validation trace of another seed, see docs/prefetchers.md). The
baseline ``none`` comes from the same run of this script.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEEPSEEK, MIXTRAL = "deepseek-r1 (synthetic)", "mixtral-8x7b (imported)"
MIXTRAL_SHAPE = ["model=mixtral-8x7b", "cache.capacity_experts=128"]
# (trace, deployment) -> overrides of the shipped ssd_offload scenario, and the prefetch lookahead
DEPLOYMENTS: dict[tuple[str, str], tuple[list[str], int]] = {
    (DEEPSEEK, "ssd"): ([], 2),
    (DEEPSEEK, "ddr"): (["placement=ddr", "hardware=gh200-c2c"], 2),
    (MIXTRAL, "ssd"): ([*MIXTRAL_SHAPE, "gpus=1", "hardware=h100-pcie5"], 2),
    (MIXTRAL, "ddr"): ([*MIXTRAL_SHAPE, "gpus=8", "placement=ddr", "hardware=gh200-c2c"], 6),
}
ENGINE = ["prefetch.budget_experts=8"]
LEARNS_FROM_FILE = {"speculative_gate", "expert_map"}
# Prefetcher parameters per trace, chosen on validation traces (other seeds), never on the table's traces.
PARAMS: dict[tuple[str, str], list[str]] = {(DEEPSEEK, "speculative_gate"): ["history=3"]}
# Rows for a prefetcher's other settings: expert_map with FineMoE's cumulative rule beside its default threshold.
VARIANTS = ["expert_map:selection=cumulative"]


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
    return {DEEPSEEK: deepseek, MIXTRAL: mixtral}


def scenario_overrides(job: dict) -> list[str]:
    """The job's ``ssd_offload`` overrides; its prefetcher is a name or ``NAME:KEY=VALUE[:KEY=VALUE...]`` (a
    variant with those parameters)."""
    overrides, lookahead = DEPLOYMENTS[job["label"], job["deployment"]]
    policy, *variant = job["prefetcher"].split(":")
    out = [*overrides, *ENGINE, f"prefetch.lookahead={lookahead}", f"prefetch.max_queued={job['max_queued']}",
           f"prefetch.policy={policy}",
           f"workload.batch_size={job['batch']}", f"workload.decode_tokens={job['steps']}",
           f'workload.trace="{job["trace"]}"']
    if policy in LEARNS_FROM_FILE:
        out.append(f'prefetch.params.train_trace="{job["trace"]}"')
    out += [f"prefetch.params.{item}" for item in [*PARAMS.get((job["label"], policy), []), *variant]]
    return out


def run_one(job: dict) -> dict:
    """Simulate one (trace, deployment, batch, prefetcher) and keep the table's figures."""
    from tierflow.config import load_scenario
    from tierflow.sim.engine import Simulation

    summary = Simulation(load_scenario("ssd_offload", scenario_overrides(job))).run().summary
    p = summary["prefetch"]
    return {
        "trace": job["label"], "deployment": job["deployment"], "batch": job["batch"],
        "prefetcher": job["prefetcher"], "steps": job["steps"], "max_queued": job["max_queued"],
        "accuracy": p["accuracy"], "on_target_accuracy": p["on_target_accuracy"], "coverage": p["coverage"],
        "issued": p["issued"], "late": p["late"],
        "stall_s_per_token": summary["stall_s_per_token"],
        "latency_s_per_token": summary["latency_s_per_token"]["mean"],
        "wasted_energy_j_per_token": p["wasted_energy_j_per_token"],
        "prefetch_energy_j_per_token": p["energy_j_per_token"],
        "energy_j_per_token": summary["energy_j_per_token"]["total"],
        "hbm_hit_rate": summary["hit_rate"]["hbm"],
        "demand_bytes_per_step": (sum(summary["bytes_moved"].values()) - p["prefetched_bytes"])
        / job["steps"],
    }


def physics(rows: list[dict]) -> str:
    """Why a deployment lets prefetching pay or not, from the ``none`` rows: the time one expert takes to
    reach HBM, the compute time per layer (step latency minus stall), and the share of the compute time the
    demand misses alone keep each GPU's link or drive busy (above 100%: bandwidth-bound, no prefetcher can
    hide the misses); the lookahead that covers one transfer is ``ceil(transfer / compute per layer)``."""
    from tierflow.catalog import get_model, get_profile
    from tierflow.config import load_scenario
    from tierflow.sim.engine import offload_bandwidth

    lines = [("| trace | deployment | batch | expert transfer (us) | compute per layer (us) | demand link load "
              "| lookahead needed / used |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["prefetcher"] != "none":
            continue
        job = {"label": r["trace"], "deployment": r["deployment"], "batch": r["batch"], "steps": r["steps"],
               "prefetcher": "none", "max_queued": r["max_queued"], "trace": ""}
        scenario = load_scenario("ssd_offload", [o for o in scenario_overrides(job) if "workload.trace" not in o])
        spec, hardware = get_model(scenario.model), get_profile(scenario.hardware)
        bandwidth = offload_bandwidth(scenario, hardware)
        transfer = spec.expert_bytes / bandwidth
        compute_step = r["latency_s_per_token"] - r["stall_s_per_token"]
        per_layer = compute_step / spec.num_moe_layers
        load = r["demand_bytes_per_step"] / scenario.gpus / bandwidth / compute_step
        lookahead = DEPLOYMENTS[r["trace"], r["deployment"]][1]
        lines.append(f"| {r['trace']} | {r['deployment']} | {r['batch']} | {transfer * 1e6:,.0f} "
                     f"| {per_layer * 1e6:,.0f} | {100 * load:.0f}% "
                     f"| {math.ceil(transfer / per_layer)} / {lookahead} |")
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    none = {(r["trace"], r["deployment"], r["batch"]): r["stall_s_per_token"] for r in rows
            if r["prefetcher"] == "none"}
    queued = sorted({r["max_queued"] for r in rows})
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = [("| trace | deployment | batch | prefetcher | accuracy | on target | coverage | stall/token (ms) "
              "| stall vs none | wasted energy (J/token) | energy/token (J) | issued | late |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = none.get((r["trace"], r["deployment"], r["batch"]))
        cut = "—" if not base else f"{100 * (r['stall_s_per_token'] / base - 1):+.1f}%"
        name = r["prefetcher"].split(":")
        label = f"`{name[0]}`" + (f" ({', '.join(name[1:])})" if len(name) > 1 else "")
        lines.append(f"| {r['trace']} | {r['deployment']} | {r['batch']} | {label} "
                     f"| {pct(r['accuracy'])} | {pct(r['on_target_accuracy'])} | {pct(r['coverage'])} "
                     f"| {r['stall_s_per_token'] * 1e3:.1f} | {cut} "
                     f"| {r['wasted_energy_j_per_token']:.2f} | {r['energy_j_per_token']:.1f} | {r['issued']:,} "
                     f"| {r['late']:,} |")
    lines.append(f"\n(prefetch.max_queued = {', '.join(map(str, queued))}; stall vs none: the same trace, deployment "
                 "and batch)")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    from tierflow.prefetch import PREFETCHERS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("build/prefetch_table"))
    parser.add_argument("--steps", type=int, default=128, help="decode steps at batch 1")
    parser.add_argument("--batched-steps", type=int, default=32, help="decode steps at batch 16")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--deployments", nargs="+", default=["ssd", "ddr"], choices=["ssd", "ddr"])
    parser.add_argument("--max-queued", type=int, default=1,
                        help="prefetch.max_queued: 1 prefetches only into an idle queue (as ssd_prefetch)")
    parser.add_argument("--prefetchers", nargs="+", default=None,
                        help="NAME or NAME:KEY=VALUE[:KEY=VALUE] (a variant); default: every registered one and "
                             "the variants in VARIANTS")
    parser.add_argument("--jobs", type=int, default=2, help="simulations run in parallel")
    parser.add_argument("--physics", action="store_true",
                        help="also print each deployment's transfer time, compute time and demand link load")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of tables")
    args = parser.parse_args(argv)
    traces = make_traces(args.work_dir)
    names = args.prefetchers or ["none", "oracle", *[n for n in PREFETCHERS.names() if n not in ("none", "oracle")],
                                 *VARIANTS]
    jobs = [{"label": label, "trace": str(traces[label]), "deployment": deployment, "batch": batch,
             "steps": args.steps if batch == 1 else args.batched_steps, "prefetcher": name,
             "max_queued": args.max_queued}
            for batch in args.batches for deployment in args.deployments for label in traces for name in names]
    # The batched DeepSeek-R1 runs are the longest: start them first so the last job to finish is a short one.
    slow_first = sorted(range(len(jobs)), reverse=True,
                        key=lambda i: (jobs[i]["batch"] * jobs[i]["steps"], jobs[i]["label"] == DEEPSEEK))
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {i: pool.submit(run_one, jobs[i]) for i in slow_first}
        rows = [futures[i].result() for i in range(len(jobs))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    if args.physics:
        print(physics(rows), end="\n\n")
    for batch in args.batches:
        steps = args.steps if batch == 1 else args.batched_steps
        print(f"Batch {batch} ({steps} decode steps):\n")
        print(format_rows([r for r in rows if r["batch"] == batch]), end="\n\n")
    return rows


if __name__ == "__main__":
    main()
