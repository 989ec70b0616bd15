"""``tierflow simulate``: run one scenario and report its figures."""

from __future__ import annotations

from pathlib import Path

import click

from tierflow.config import load_scenario
from tierflow.metrics import format_table, write_results_h5


def register(group: click.Group) -> None:
    group.add_command(simulate)


@click.command()
@click.option("--scenario", "scenario_name", default="ssd_prefetch", show_default=True,
              help="A shipped scenario name or a path to a .toml file.")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Trace file; overrides workload.trace.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a scenario key, e.g. --set workload.batch_size=16 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else there.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results and per-step series to this HDF5 file (atomically).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def simulate(scenario_name, trace, overrides, as_json, out, quiet):
    """Simulate MoE decode over GPU HBM, host DDR and NVMe SSD for one scenario."""
    from tierflow.sim.engine import Simulation

    scenario = load_scenario(scenario_name, overrides)
    steps = scenario.workload.decode_tokens
    show = not quiet and steps >= 64
    with click.progressbar(length=steps, label=f"simulating {scenario.name}", file=click.get_text_stream("stderr"),
                           hidden=not show) as bar:
        results = Simulation(scenario, str(trace) if trace else None, progress=bar.update).run()
    if out is not None:
        write_results_h5(results, out)
    if as_json:
        from tierflow.cli import echo_json

        echo_json(results.summary)
    else:
        click.echo(format_table(results.summary))
