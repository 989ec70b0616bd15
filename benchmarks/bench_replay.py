"""Replay throughput: tierflow's LRU fast path against libCacheSim's own ``process_trace`` on the same trace, in
one run, and the one-pass miss-ratio curve against libCacheSim run at five capacities.

    python benchmarks/bench_replay.py [--trace T.h5] [--accesses 2000000] [--repeat 3]

Without ``--trace`` it generates a synthetic DeepSeek-R1 trace of about ``--accesses`` accesses (58 MoE layers
x top-8 = 464 per token). libCacheSim reads the same requests from an oracleGeneral binary file (object id
``layer * num_experts + expert``, size 1, next access index), written before the clock starts. Both sides' hit
counts are checked equal before any figure is printed. Each time is the best of ``--repeat`` runs.

Goals (issue 4): LRU replay at >= 1/3 of libCacheSim's speed; ``--mrc`` (every capacity) cheaper than
libCacheSim at five capacities.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from tierflow.replay import lru_hits, lru_mrc, next_use, read_requests, replay


def best_time(function, repeat):
    best, value = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - start)
    return best, value


def write_oracle_general(path: Path, keys: np.ndarray) -> None:
    """libCacheSim's oracleGeneral records: uint32 time, uint64 id, uint32 size, int64 next access (-1: none)."""
    record = np.dtype([("time", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    records = np.zeros(len(keys), dtype=record)
    records["time"] = np.arange(len(keys))
    records["id"] = keys + 1  # id 0 is reserved in some libCacheSim readers
    records["size"] = 1
    records["next"] = next_use(keys)
    records.tofile(path)


def libcachesim_lru(path: Path, capacity: int) -> int:
    import libcachesim

    reader = libcachesim.TraceReader(str(path), libcachesim.TraceType.ORACLE_GENERAL_TRACE)
    miss_ratio, _ = libcachesim.LRU(capacity).process_trace(reader)
    return reader.get_num_of_req() - round(miss_ratio * reader.get_num_of_req())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=None)
    parser.add_argument("--accesses", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        trace = args.trace
        if trace is None:
            from tierflow.trace.synth import generate

            trace = Path(tmp) / "deepseek-r1.h5"
            generate("deepseek-r1", math.ceil(args.accesses / 464), trace, seed=0)
        read_s, requests = best_time(lambda: read_requests(trace), 1)
        keys = requests.keys[: args.accesses]
        requests = type(requests)(keys, requests.steps[: len(keys)], requests.num_layers, requests.num_experts,
                                  requests.top_k)
        oracle = Path(tmp) / "trace.oracleGeneral.bin"
        write_oracle_general(oracle, keys)
        n = len(keys)
        capacity = max(requests.top_k, round(0.1 * requests.num_objects))
        print(f"trace: {n:,} accesses, {requests.num_layers} layers x {requests.num_experts} experts, "
              f"top-{requests.top_k}; LRU capacity {capacity} experts (10% of all)")

        ours_s, ours = best_time(lambda: replay(requests, "lru", [capacity])[0].hits, args.repeat)
        theirs_s, theirs = best_time(lambda: libcachesim_lru(oracle, capacity), args.repeat)
        assert ours == theirs, (ours, theirs)
        print(f"hits at {capacity}: {ours:,} (tierflow) == {theirs:,} (libCacheSim)")
        print(f"tierflow lru replay (stack distances):  {ours_s:7.3f} s  {n / ours_s / 1e6:6.2f} M accesses/s"
              f"  (+{read_s:.3f} s reading the HDF5 trace)")
        print(f"libCacheSim LRU process_trace:          {theirs_s:7.3f} s  {n / theirs_s / 1e6:6.2f} M accesses/s")
        print(f"ratio tierflow / libCacheSim throughput: {theirs_s / ours_s:.2f}  (goal >= 0.33)")

        fractions = (0.02, 0.05, 0.1, 0.25, 0.5)
        five = [max(requests.top_k, round(f * requests.num_objects)) for f in fractions]
        mrc_s, (capacities, hits) = best_time(lambda: lru_mrc(requests), args.repeat)
        five_s, five_hits = best_time(lambda: [libcachesim_lru(oracle, c) for c in five], args.repeat)
        ours_five = [int(hits[c - capacities[0]]) if c <= capacities[-1] else int(hits[-1]) for c in five]
        assert ours_five == five_hits == lru_hits(requests, five), (ours_five, five_hits)
        print(f"tierflow --mrc ({len(capacities):,} capacities, one pass): {mrc_s:7.3f} s")
        print(f"libCacheSim LRU at 5 capacities {five}: {five_s:7.3f} s")
        print(f"ratio mrc / libCacheSim x5 time: {mrc_s / five_s:.2f}  (goal < 1)")


if __name__ == "__main__":
    main()
