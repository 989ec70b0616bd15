#!/usr/bin/env python3
"""Simulator throughput: simulated expert accesses per second against SimPy's raw event rate, same process.

The raw rate is a bare SimPy process yielding timeouts, measured just before and just after each run (the
higher counts, since the machine may be shared). The simulation is DeepSeek-R1 at batch 1 (58 MoE
layers x 8 experts = 464 expert accesses per token) in the given scenario. Goal (issue: simulator): the
ratio of accesses per second to raw events per second is at least 0.5, and 2,000 decode tokens finish in
under 30 s.

    python benchmarks/bench_sim.py [--scenario NAME] [--tokens N] [--repeat N] [--costs]

``--costs`` also splits the run time of ``ssd_offload`` into a cost per expert access and a cost per miss: it
runs the scenario with three HBM cache sizes (so three miss counts) and fits ``run time = a * accesses + b *
misses`` by least squares. ``a`` includes a layer's compute model and SimPy events spread over its accesses;
``b`` is everything a miss adds (admission, eviction, the transfer's hops on the calendar, the wait). It also
times ``ssd_prefetch``'s prefetcher on its own (its ``on_routing`` calls, with the simulator's handling of the
proposals left out), per routing event and per expert access.
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


def measure(name: str, tokens: int) -> dict:
    """One build and run of a scenario, with SimPy's raw event rate measured just before and just after it
    (the higher of the two is the baseline: on a shared machine that is the conservative choice)."""
    scenario = load_scenario(name, [f"workload.decode_tokens={tokens}"])
    raw_before = raw_event_rate()
    start = time.perf_counter()
    sim = Simulation(scenario)
    built = time.perf_counter()
    results = sim.run()
    done = time.perf_counter()
    raw = max(raw_before, raw_event_rate())
    accesses = sum(len(e) for step in sim.workload.steps for e in step.experts)
    return {"raw": raw, "build_s": built - start, "run_s": done - built, "accesses": accesses,
            "rate": accesses / (done - built), "simpy_events": next(sim.env._eid),
            "calendar_events": sim.calendar.events_run, "hit_rate": results.summary["hit_rate"]["hbm"]}


def cost_split(tokens: int) -> str:
    """Seconds per access and per miss of ``ssd_offload`` from runs at three cache sizes (see the docstring)."""
    import numpy as np

    rows = []
    for capacity in (1856, 3712, 14848):  # an eighth, a quarter and all of DeepSeek-R1's 58 x 256 experts
        scenario = load_scenario("ssd_offload", [f"workload.decode_tokens={tokens}",
                                                 f"cache.capacity_experts={capacity}"])
        sim = Simulation(scenario)
        start = time.perf_counter()
        results = sim.run()
        run_s = time.perf_counter() - start
        accesses = sum(len(e) for step in sim.workload.steps for e in step.experts)
        rows.append((capacity, accesses, int(results.step_misses.sum()), run_s))
    design = np.array([[a, m] for _, a, m, _ in rows], dtype=float)
    (per_access, per_miss), *_ = np.linalg.lstsq(design, np.array([r[3] for r in rows]), rcond=None)
    raw = raw_event_rate()
    lines = [f"  {c:,} experts cached: {a:,} accesses, {m:,} misses, {t:.2f} s" for c, a, m, t in rows]
    return "\n".join([
        f"ssd_offload cost split ({tokens} tokens, three cache sizes):", *lines,
        (f"  per access {per_access * 1e6:.2f} us, per miss {per_miss * 1e6:.2f} us; SimPy raw event "
         f"{1e6 / raw:.2f} us; a ratio of 0.5 allows {2e6 / raw:.2f} us per access, misses included"),
    ])


def prefetcher_cost(tokens: int) -> str:
    """The time ``ssd_prefetch``'s prefetcher takes to answer the routing events, against the whole run."""
    sim = Simulation(load_scenario("ssd_prefetch", [f"workload.decode_tokens={tokens}"]))
    prefetcher, spent, calls = sim.prefetcher, [0.0], [0]
    on_routing = prefetcher.on_routing

    def timed(event):
        start = time.perf_counter()
        proposals = on_routing(event)
        spent[0] += time.perf_counter() - start
        calls[0] += 1
        return proposals

    prefetcher.on_routing = timed
    start = time.perf_counter()
    sim.run()
    run_s = time.perf_counter() - start
    accesses = sum(len(e) for step in sim.workload.steps for e in step.experts)
    return (f"ssd_prefetch's {prefetcher.name} prefetcher ({tokens} tokens): {spent[0]:.2f} s of the run's "
            f"{run_s:.2f} s, {spent[0] / calls[0] * 1e6:.1f} us per routing event, "
            f"{spent[0] / accesses * 1e6:.2f} us per expert access")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", default=None)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per scenario; the best ratio is shown")
    parser.add_argument("--costs", action="store_true", help="also split ssd_offload's time per access and miss")
    args = parser.parse_args()
    for name in args.scenario or ["ssd_prefetch", "ssd_offload", "hbm_only"]:
        runs = [measure(name, args.tokens) for _ in range(args.repeat)]
        m = max(runs, key=lambda r: r["rate"] / r["raw"])
        print(f"{name}: {m['accesses']:,} expert accesses in {m['build_s'] + m['run_s']:.2f} s "
              f"({m['build_s']:.2f} s to build, {m['run_s']:.2f} s to run; {m['simpy_events']:,} SimPy events, "
              f"{m['calendar_events']:,} data-path events): {m['rate']:,.0f} accesses/s; SimPy raw "
              f"{m['raw']:,.0f} events/s; ratio {m['rate'] / m['raw']:.2f} (goal >= 0.5); "
              f"hit rate {m['hit_rate']}")
        if args.repeat > 1:
            print(f"  run s over {args.repeat} runs: " + ", ".join(f"{r['run_s']:.2f}" for r in runs)
                  + "; ratios: " + ", ".join(f"{r['rate'] / r['raw']:.2f}" for r in runs))
    if args.costs:
        print(cost_split(min(args.tokens, 500)))
        print(prefetcher_cost(min(args.tokens, 500)))


if __name__ == "__main__":
    main()
