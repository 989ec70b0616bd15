"""The README's table of the five DeepSeek-R1 scenarios, and the ssd_offload -> ssd_prefetch comparison under it.

    python scripts/scenario_table.py [--set KEY=VALUE ...]

Runs ``tierflow simulate --scenario NAME --json`` for each scenario (256 decode tokens each by default; about
30 s on two cores) and prints the Markdown table, then the figures the README quotes about prefetching: stall,
data-movement and static energy of ``ssd_offload`` and ``ssd_prefetch``, and the same with
``prefetch.preempt = false``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SCENARIOS = ("hbm_only", "ddr_offload", "ssd_offload", "ssd_prefetch", "three_tier")
HEADER = ("| scenario | latency/token (ms) | stall/token (ms) | HBM hit rate | DDR hit rate | bytes moved/token (GB) "
          "| energy/token (J): total | compute | data movement | static |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def simulate(name: str, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "tierflow", "simulate", "--scenario", name, "--json", "--quiet"]
    for override in overrides:
        command += ["--set", override]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def data_movement(summary: dict) -> float:
    energy = summary["energy_j_per_token"]
    return energy["hbm"] + energy["ddr"] + energy["ssd"] + energy["link"]


def row(name: str, summary: dict) -> str:
    def pct(value):
        return "—" if value is None else f"{100 * value:.1f}%"

    energy = summary["energy_j_per_token"]
    moved = sum(summary["bytes_moved"].values()) / summary["tokens"] / 1e9
    return (f"| `{name}` | {1e3 * summary['latency_s_per_token']['mean']:.1f} | {1e3 * summary['stall_s_per_token']:.1f} "
            f"| {pct(summary['hit_rate']['hbm'])} | {pct(summary['hit_rate']['ddr'])} | {moved:.2f} "
            f"| {energy['total']:.1f} | {energy['compute']:.2f} | {data_movement(summary):.2f} | {energy['static']:.1f} |")


def prefetching(before: dict, after: dict) -> str:
    def change(a, b):
        return f"{a:.2f} -> {b:.2f} ({100 * (b / a - 1):+.1f}%)"

    return (f"stall/token (ms) {change(1e3 * before['stall_s_per_token'], 1e3 * after['stall_s_per_token'])}; "
            f"energy/token (J) {change(before['energy_j_per_token']['total'], after['energy_j_per_token']['total'])}; "
            f"data movement {change(data_movement(before), data_movement(after))}; "
            f"static {change(before['energy_j_per_token']['static'], after['energy_j_per_token']['static'])}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every scenario, as `simulate --set`")
    args = parser.parse_args(argv)
    summaries = {name: simulate(name, args.overrides) for name in SCENARIOS}
    print(HEADER)
    print("\n".join(row(name, summary) for name, summary in summaries.items()))
    print()
    print("ssd_offload -> ssd_prefetch:", prefetching(summaries["ssd_offload"], summaries["ssd_prefetch"]))
    no_preempt = simulate("ssd_prefetch", [*args.overrides, "prefetch.preempt=false"])
    print("ssd_offload -> ssd_prefetch, prefetch.preempt = false:", prefetching(summaries["ssd_offload"], no_preempt))


if __name__ == "__main__":
    main()
