#!/usr/bin/env python3
"""Sweep scaling: wall time of one 16-point sweep on 1 worker against 2 (and more), same run, fresh folders.

Points: OLMoE-1B-7B on one H100, experts in DDR, 4 cache policies x 4 capacities, 128 decode steps each
(about half a second per point). Goal (issue 7): at least 1.7x faster with 2 workers than with 1 on a 2-core
machine. ``--engine dask`` times a dask LocalCluster of the same sizes instead of the process pool.

The baseline from the same run is the machine's own ceiling: 16 CPU-bound pure-Python tasks of about the same
length on a process pool of the same sizes. On a shared virtual machine two vCPUs need not give two cores'
worth of work; the sweep's efficiency is its speed-up over that ceiling.

    python benchmarks/bench_sweep.py [--workers 1 2] [--engine local|dask] [--tokens 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from tierflow.sweep import parse_sweep, read_table, run_sweep


def sweep_document(tokens: int) -> dict:
    return {
        "name": "bench", "scenario": "ddr_offload", "seed": 1,
        "set": {"model": "olmoe-1b-7b", "hardware": "h100-pcie5", "gpus": 1, "workload.decode_tokens": tokens},
        "grid": {"cache.policy": ["lru", "fifo", "lfu", "lfu_aging"], "cache.capacity_experts": [128, 256, 384, 512]},
    }


def _burn(_: int) -> int:
    total = 0
    for i in range(6_000_000):
        total += i
    return total


def ceiling_run(workers: int) -> float:
    """Wall time of 16 CPU-bound tasks on ``workers`` processes (1: in this process)."""
    import concurrent.futures

    start = time.perf_counter()
    if workers == 1:
        [_burn(i) for i in range(16)]
    else:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            list(pool.map(_burn, range(16)))
    return time.perf_counter() - start


def timed_run(workers: int, engine: str, tokens: int) -> tuple[float, bytes]:
    sweep = parse_sweep(sweep_document(tokens))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        outcome = run_sweep(sweep, out, workers=workers, engine=engine)
        elapsed = time.perf_counter() - start
        assert outcome.ran == len(sweep.points) == 16 and outcome.errors == 0, outcome
        table = read_table(outcome.table_h5)
        return elapsed, bytes(str(sorted((k, v.tolist()) for k, v in table.items())), "utf-8")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engine", choices=["local", "dask"], default="local")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    print(f"16-point sweep, {args.tokens} decode steps per point, engine {args.engine}, {os.cpu_count()} cores")
    baseline = baseline_table = ceiling_base = None
    for workers in args.workers:
        ceiling = ceiling_run(workers)
        elapsed, table = timed_run(workers, args.engine, args.tokens)
        if baseline is None:
            baseline, baseline_table, ceiling_base = elapsed, table, ceiling
            print(f"workers {workers}: sweep {elapsed:.2f} s; machine ceiling (16 CPU-bound tasks) {ceiling:.2f} s "
                  "(baselines)")
            continue
        same = "identical table" if table == baseline_table else "TABLE DIFFERS"
        speedup, ceiling_speedup = baseline / elapsed, ceiling_base / ceiling
        print(f"workers {workers}: sweep {elapsed:.2f} s, speed-up {speedup:.2f}x over {args.workers[0]} worker(s) "
              f"(goal >= 1.7x at 2 workers); machine ceiling {ceiling:.2f} s, speed-up {ceiling_speedup:.2f}x; "
              f"sweep efficiency {speedup / ceiling_speedup:.0%} of the ceiling; {same}")


if __name__ == "__main__":
    main()
