#!/usr/bin/env python3
"""Simulator throughput: simulated expert accesses per second against SimPy's raw event rate, same process.

The raw rate is a bare SimPy process yielding timeouts. The simulation is DeepSeek-R1 at batch 1 (58 MoE
layers x 8 experts = 464 expert accesses per token) in the given scenario. Goal (issue: simulator): the
ratio of accesses per second to raw events per second is at least 0.5, and 2,000 decode tokens finish in
under 30 s.

    python benchmarks/bench_sim.py [--scenario NAME] [--tokens N]
"""

from __future__ import annotations

import argparse
import time

import simpy

from tierflow.config import load_scenario
from tierflow.sim.engine import Simulation


def raw_event_rate(events: int = 500_000) -> float:
    env = simpy.Environment()

    def ticker(env):
        while True:
            yield env.timeout(1)

    env.process(ticker(env))
    start = time.perf_counter()
    env.run(until=events)
    return events / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", default=None)
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    raw = raw_event_rate()
    print(f"SimPy raw event rate: {raw:,.0f} events/s")
    for name in args.scenario or ["ssd_prefetch", "ssd_offload", "hbm_only"]:
        scenario = load_scenario(name, [f"workload.decode_tokens={args.tokens}"])
        start = time.perf_counter()
        sim = Simulation(scenario)
        built = time.perf_counter()
        results = sim.run()
        done = time.perf_counter()
        accesses = sum(len(e) for step in sim.workload.steps for e in step.experts)
        rate = accesses / (done - built)
        print(f"{name}: {accesses:,} expert accesses in {done - start:.2f} s ({built - start:.2f} s to build, "
              f"{done - built:.2f} s to run, {next(sim.env._eid):,} SimPy events, {sim.calendar.events_run:,} data-path events): {rate:,.0f} accesses/s, "
              f"ratio to raw events {rate / raw:.2f} (goal >= 0.5); hit rate {results.summary['hit_rate']['hbm']}")


if __name__ == "__main__":
    main()
