"""``tierflow paper``: the Kyung et al. reproduction's tables and figures (see :mod:`tierflow.paper`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from tierflow import paper
from tierflow.paths import FolderPath
from tierflow.progress import progress_bar
from tierflow.workers import sigterm_unwinds


def register(group: click.Group) -> None:
    group.add_command(paper_command)


def finite_or_null(value):
    """``value`` with NaN and infinities as None (JSON null), so ``--json`` always prints valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(inner) for key, inner in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(inner) for inner in value]
    return value


@click.command("paper")
@click.option("--out", type=FolderPath(), default=Path("out/paper"), show_default=True,
              help="folder for the tables (CSV and markdown) and figures")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="cells run in parallel (default: the cores)")
@click.option("--beyond/--no-beyond", default=True, show_default=True,
              help="also run the beyond-the-paper variants")
@click.option("--json", "as_json", is_flag=True, help="print the headline figures as JSON on stdout")
@click.option("--quiet", is_flag=True, help="no progress bar")
def paper_command(out, workers, beyond, as_json, quiet):
    """Reproduce Kyung, Yun, Ahn (IEEE CAL 2025): J/token by component and step latency for each model,
    placement and batch size, the SSD read-energy scaling study, and the beyond-the-paper variants.

    Finished cells are kept in OUT/cells, so rerunning after an interruption resumes."""
    cells = paper.paper_cells()
    extra = paper.beyond_cells() if beyond else []
    with sigterm_unwinds(), progress_bar(len(cells) + len(extra), "cells", quiet) as bar:
        rows = paper.run_cells(cells + extra, workers, bar.update, cache_dir=out / "cells")
    paper_rows, beyond_rows = rows[: len(cells)], rows[len(cells):]
    written = paper.write_outputs(paper_rows, beyond_rows, out)
    figures = paper.headline(paper_rows)
    if as_json:
        click.echo(json.dumps(finite_or_null(figures), indent=2, allow_nan=False))
        return
    for model, f in figures.items():
        scales = ", ".join(f"batch {b}: {paper._fmt(s)}" for b, s in f["ssd_scale_matching_ddr"].items())
        click.echo(f"{model}: SSD/HBM peaks at {f['peak_ssd_over_hbm']['ratio']:.1f}x (batch "
                   f"{f['peak_ssd_over_hbm']['batch_size']}), DDR/HBM at {f['peak_ddr_over_hbm']['ratio']:.1f}x; "
                   f"SSD read-energy scale matching DDR: {scales}")
    for path in written:
        click.echo(f"wrote {path}")
