#!/usr/bin/env python3
"""Trace benchmarks: synthetic generation time and `trace info` peak memory on a DeepSeek-R1 trace.

Targets (issue: foundation): `trace gen --model deepseek-r1 --tokens 100000` under 10 s; `trace info` of
it under 300 MB peak resident memory. Baselines measured in the same run: writing the same number of
random expert ids with the same writer (the cost of the file alone), and the peak memory of a Python
process that only imports tierflow.

    python benchmarks/bench_trace.py [--tokens N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(args) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - start


def peak_rss_mb(args) -> float:
    """Peak resident memory of a child process (ru_maxrss of the waited child, in MB)."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) / 1024


def write_random(path: Path, tokens: int) -> float:
    from tierflow.trace.format import TraceWriter

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with TraceWriter(path, model="random", num_layers=58, num_experts=256, top_k=8, source="bench",
                     with_gate_scores=True) as writer:
        for lo in range(0, tokens, 32768):
            n = min(32768, tokens - lo)
            # Eight distinct ids per row from a random offset: the cost of the file, not of drawing routing.
            experts = (rng.integers(0, 248, (n, 58, 1)) + np.arange(8)).astype(np.uint8)
            writer.append(experts, np.zeros(n, dtype=np.int64), gate_scores=rng.random((n, 58, 8)))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    args = parser.parse_args()
    tierflow = [sys.executable, "-m", "tierflow"]
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "ds.h5"
        gen_s = timed([*tierflow, "trace", "gen", "--model", "deepseek-r1", "--tokens", str(args.tokens),
                       "--out", str(trace)])
        write_s = write_random(Path(tmp) / "random.h5", args.tokens)
        info_mb = peak_rss_mb([*tierflow, "trace", "info", str(trace)])
        import_mb = peak_rss_mb([sys.executable, "-c", "import tierflow.cli"])
        info_s = timed([*tierflow, "trace", "info", str(trace)])
    print(f"trace gen deepseek-r1 {args.tokens:,} tokens: {gen_s:.2f} s (target < 10 s); "
          f"writing random ids of the same shape: {write_s:.2f} s; ratio {gen_s / write_s:.2f}")
    print(f"trace info: {info_s:.2f} s, peak {info_mb:.0f} MB (target < 300 MB); "
          f"importing tierflow alone: {import_mb:.0f} MB; ratio {info_mb / import_mb:.2f}")


if __name__ == "__main__":
    main()
