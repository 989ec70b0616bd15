"""``tierflow simulate``: run one scenario and report its figures."""

from __future__ import annotations

from pathlib import Path

import click

from tierflow.atomic import check_not_an_input, check_writable
from tierflow.catalog import get_profile
from tierflow.config import PLUGIN_SECTIONS, load_scenario, resolve_scenario_path
from tierflow.metrics import format_table, write_results_h5
from tierflow.paths import OutputFile
from tierflow.progress import progress_bar
from tierflow.trace.format import open_trace
from tierflow.trace.stats import label_mismatch


def register(group: click.Group) -> None:
    group.add_command(simulate)


def scenario_inputs(scenario_name: str, scenario, trace=None) -> list[tuple[Path, str]]:
    """The files a run of ``scenario`` reads, each with what it is: the trace, the scenario file, and any file a
    cache policy or prefetcher parameter names (a training trace, learned-policy weights)."""
    source = trace or scenario.workload.trace
    inputs = [(Path(source), "the trace being simulated")] if source else []
    inputs.append((resolve_scenario_path(scenario_name), "the scenario file"))
    for part in PLUGIN_SECTIONS:
        for key, value in getattr(scenario, part).params.items():
            if isinstance(value, str) and value:
                inputs.append((Path(value), f"the file {part}.params.{key} names"))
    return inputs


def run_with_progress(scenario, trace: str | None = None, quiet: bool = False):
    """Simulate a scenario with a progress bar on stderr (for runs of 64 steps or more, unless quiet)."""
    from tierflow.sim.engine import Simulation

    steps = scenario.workload.decode_tokens
    with progress_bar(steps, f"simulating {scenario.name}", quiet or steps < 64) as bar:
        return Simulation(scenario, trace, progress=bar.update).run()


@click.command()
@click.option("--scenario", "scenario_name", default="ssd_prefetch", show_default=True,
              help="A shipped scenario name or a path to a .toml file.")
@click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Trace file; overrides workload.trace.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a scenario key, e.g. --set workload.batch_size=16 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else there.")
@click.option("--out", type=OutputFile(), default=None,
              help="Write the results and per-step series to this HDF5 file (atomically).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def simulate(scenario_name, trace, overrides, as_json, out, quiet):
    """Simulate MoE decode over GPU HBM, host DDR and NVMe SSD for one scenario."""
    scenario = load_scenario(scenario_name, overrides)
    if out is not None:
        check_not_an_input(out, scenario_inputs(scenario_name, scenario, trace))
        check_writable(out)
    results = run_with_progress(scenario, str(trace) if trace else None, quiet)
    steps, asked = len(results.step_latency_s), scenario.workload.decode_tokens
    if steps < asked:
        click.echo(f"tierflow: note: the trace ran out of sequences after {steps} of {asked} decode steps; the "
                   "figures are per token decoded", err=True)
    path = trace or scenario.workload.trace
    if path and scenario.workload.routing == "trace":
        with open_trace(path) as reader:
            mismatch = label_mismatch(reader.meta, scenario.model)
        if mismatch:
            click.echo(f"tierflow: note: {mismatch}", err=True)
    hbm = get_profile(scenario.hardware).gpu.hbm.capacity_bytes
    if results.summary["peak_hbm_bytes"] > hbm:  # copies queued ahead may hold more layers than fit
        click.echo(f"tierflow: note: peak HBM use of {results.summary['peak_hbm_bytes'] / 1e9:.1f} GB per GPU "
                   f"exceeds the GPU's {hbm / 1e9:.1f} GB (expert copies queued ahead of their layers); the timing "
                   "assumes they fit", err=True)
    if out is not None:
        write_results_h5(results, out)
    if as_json:
        from tierflow.cli import echo_json

        echo_json(results.summary)
    else:
        click.echo(format_table(results.summary, results))
