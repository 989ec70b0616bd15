"""``tierflow sweep`` and ``tierflow report``: run a grid of scenarios, then turn its table into figures."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tierflow.errors import TierflowError
from tierflow.paths import FolderPath
from tierflow.progress import progress_bar
from tierflow.workers import sigterm_unwinds


def register(group: click.Group) -> None:
    group.add_command(sweep)
    group.add_command(report)


@click.command()
@click.argument("sweep_file", metavar="SWEEP.toml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=FolderPath(), required=True,
              help="Folder for the per-point outputs and the results table (reused to resume).")
@click.option("--workers", type=int, default=None, help="Parallel points; default: the number of cores.")
@click.option("--engine", type=click.Choice(["local", "dask"]), default=None,
              help="local: a process pool (default); dask: a dask.distributed cluster.")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="A dask scheduler, e.g. tcp://host:8786 (implies --engine dask); none: a LocalCluster.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(sweep_file, out, workers, engine, scheduler, quiet):
    """Run every point of a sweep file; rerunning skips the points already finished."""
    from tierflow.sweep import load_sweep, run_sweep

    if scheduler and engine == "local":
        raise TierflowError("--scheduler needs --engine dask")
    if workers is not None and workers < 1:
        raise TierflowError(f"--workers must be >= 1, got {workers}")
    engine = engine or ("dask" if scheduler else "local")
    spec = load_sweep(sweep_file)
    from tierflow.atomic import output_dir
    from tierflow.sweep import FINISHED, STALE, check_points, point_state

    states = [point_state(out, p.point_id) for p in spec.points]
    todo = [p for p, state in zip(spec.points, states, strict=True) if state != FINISHED]
    check_points(spec, todo)  # bad points and an unwritable folder are errors before the progress bar starts
    output_dir(out)
    if STALE in states:
        click.echo(f"tierflow: note: {states.count(STALE)} finished point(s) in {out} were simulated by another "
                   "version of tierflow; running them again", err=True)
    to_run = len(todo)
    label = f"sweep {spec.name}: {to_run} of {len(spec.points)} points"
    with sigterm_unwinds(), progress_bar(to_run, label, quiet or to_run == 0, show_eta=True, show_pos=True) as bar:
        outcome = run_sweep(spec, out, workers, engine, scheduler, progress=bar.update, checked=True, todo=todo)
    click.echo(f"{outcome.total} points ({outcome.skipped} finished before, {outcome.ran} run now, "
               f"{outcome.errors} with errors): {outcome.table_h5}, {outcome.table_csv}")
    if outcome.errors:  # the table is written; the status tells a script or make that points are missing
        click.echo(f"tierflow: error: {outcome.errors} point(s) failed; see the error column of "
                   f"{outcome.table_csv} (a rerun tries them again)", err=True)
        sys.exit(1)


@click.command()
@click.argument("sweep_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=FolderPath(), default=None,
              help="Folder for the PNG figures and report.md; default: DIR/report.")
def report(sweep_dir, out):
    """Figures (PNG) and report.md from a sweep's results folder."""
    from tierflow.report import build_report

    written = build_report(sweep_dir, out or sweep_dir / "report")
    for path in written:
        click.echo(str(path))
