"""``tierflow compare``: run several scenarios and print their main figures side by side.

Each scenario is simulated exactly as ``tierflow simulate`` would (same loading, same ``--set`` overrides,
applied to every scenario); the table shows one column per scenario, and ``--json`` prints the same runs as
``{"scenarios": [summary, ...]}`` where each summary is what ``simulate --json`` prints for that scenario.
"""

from __future__ import annotations

from pathlib import Path

import click

from tierflow.energy import COMPONENTS
from tierflow.errors import TierflowError


def register(group: click.Group) -> None:
    group.add_command(compare)


def _ms(value):
    return f"{value * 1e3:.2f}"


def _rate(value):
    return "—" if value is None else f"{100 * value:.1f}%"


def _gb(value):
    return f"{value / 1e9:.2f}"


def _j(value):
    return f"{value:.2f}"


DATA_MOVEMENT = ("hbm", "ddr", "ssd", "link")  # the energy components of bytes read, carried and written

# (label, how to read the figure from a summary). Bytes are per token, like energy, so runs of different
# lengths or batch sizes compare.
FIGURES = [
    ("latency/token mean (ms)", lambda s: _ms(s["latency_s_per_token"]["mean"])),
    ("latency/token p99 (ms)", lambda s: _ms(s["latency_s_per_token"]["p99"])),
    ("stall/token (ms)", lambda s: _ms(s["stall_s_per_token"])),
    ("tokens/s", lambda s: f"{s['tokens_per_s']:.1f}"),
    ("HBM hit rate", lambda s: _rate(s["hit_rate"]["hbm"])),
    ("DDR hit rate", lambda s: _rate(s["hit_rate"]["ddr"])),
    ("bytes moved/token (GB)", lambda s: _gb(sum(s["bytes_moved"].values()) / max(s["tokens"], 1))),
    ("  of which prefetched (GB)", lambda s: _gb(s["prefetch"]["prefetched_bytes"] / max(s["tokens"], 1))),
    ("  of which wasted (GB)", lambda s: _gb(s["prefetch"]["wasted_bytes"] / max(s["tokens"], 1))),
    ("energy/token total (J)", lambda s: _j(s["energy_j_per_token"]["total"])),
    *[(f"  {name} (J)", lambda s, name=name: _j(s["energy_j_per_token"][name])) for name in COMPONENTS],
    # Every byte read, carried and written (experts' copies, compute's HBM reads, collectives), apart from
    # arithmetic and the background power over the run's length: the part prefetching cannot save (it may
    # shorten the run, and with it the static energy).
    ("  data movement (J)", lambda s: _j(sum(s["energy_j_per_token"][name] for name in DATA_MOVEMENT))),
    ("  prefetched bytes (J)", lambda s: _j(s["prefetch"]["energy_j_per_token"])),
    ("  wasted prefetches (J)", lambda s: _j(s["prefetch"]["wasted_energy_j_per_token"])),
    ("prefetches issued", lambda s: f"{s['prefetch']['issued']:,}"),
    ("prefetch accuracy", lambda s: _rate(s["prefetch"]["accuracy"])),
    ("  on target", lambda s: _rate(s["prefetch"]["on_target_accuracy"])),
    ("prefetch coverage", lambda s: _rate(s["prefetch"]["coverage"])),
    ("late prefetches", lambda s: f"{s['prefetch']['late']:,}"),
]


def _utilization(channels: list[dict] | None, kind: str) -> str:
    """Mean bandwidth used by the channels of a kind (over GPUs); "—" when the run has none that carried bytes."""
    used = [c["utilization"] for c in channels or () if c["kind"] == kind]
    return _rate(sum(used) / len(used)) if used and any(c["bytes"] for c in channels) else "—"


def format_comparison(summaries: list[dict], channels: list[list[dict] | None] | None = None) -> str:
    """One row per figure, one column per scenario (the figures of :data:`FIGURES`), and with ``channels`` (each
    run's :func:`~tierflow.metrics.channel_figures`) the mean utilization of its drives and links."""
    header = ["", *[s["scenario"] for s in summaries]]
    rows = [header, ["model / batch", *[f"{s['model']} / {s['batch_size']}" for s in summaries]]]
    rows += [[label, *[read(s) for s in summaries]] for label, read in FIGURES]
    if channels is not None:
        rows += [[label, *[_utilization(c, kind) for c in channels]]
                 for label, kind in (("SSD utilization", "ssd"), ("link utilization", "link"))]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def run_scenarios(names, overrides=(), trace: str | None = None, quiet: bool = True) -> list:
    """Simulate each scenario (with the same overrides) and return their :class:`~tierflow.metrics.Results` in
    order.

    Every scenario is loaded and checked (:func:`tierflow.sweep.check_point`) before any runs; an error names
    the scenario it comes from."""
    import attrs

    from tierflow.config import load_scenario
    from tierflow.sim.commands import run_with_progress
    from tierflow.sweep import check_point

    scenarios = []
    for name in names:
        try:
            scenario = load_scenario(name, overrides)
            check_point(attrs.evolve(scenario, workload=attrs.evolve(scenario.workload, trace=trace))
                        if trace else scenario)
        except TierflowError as error:
            raise TierflowError(f"scenario {name}: {error}") from None
        scenarios.append(scenario)
    results = []
    for name, scenario in zip(names, scenarios, strict=True):
        try:
            results.append(run_with_progress(scenario, trace, quiet))
        except TierflowError as error:
            raise TierflowError(f"scenario {name}: {error}") from None
    return results


@click.command()
@click.option("--scenario", "scenario_names", multiple=True, required=True,
              help="A shipped scenario name or a .toml path; repeat for each column (at least one).")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Trace file for every scenario; overrides workload.trace.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a scenario key in every scenario, e.g. --set workload.decode_tokens=64 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else there.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def compare(scenario_names, trace, overrides, as_json, quiet):
    """Simulate several scenarios and print latency, stall, hit rates, bytes and energy side by side."""
    results = run_scenarios(scenario_names, overrides, str(trace) if trace else None, quiet)
    if as_json:
        from tierflow.cli import echo_json

        echo_json({"scenarios": [r.summary for r in results]})
    else:
        click.echo(format_comparison([r.summary for r in results], [r.channels for r in results]))
