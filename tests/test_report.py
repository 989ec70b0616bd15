"""The report: every figure is a real PNG of the expected size, and report.md embeds them with the figures."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from conftest import assert_one_line_error
from test_sweep import SMALL, olmoe_trace, run_tierflow, small_sweep
from tierflow.errors import TierflowError
from tierflow.report import FIGURE_DPI, FIGURE_SIZE_IN, build_report, pareto_front
from tierflow.sweep import parse_sweep, read_table, run_sweep

EXPECTED_PIXELS = (round(FIGURE_SIZE_IN[0] * FIGURE_DPI), round(FIGURE_SIZE_IN[1] * FIGURE_DPI))


def failing_sweep(capacities, folder):
    """A sweep over capacity whose last point fails at run time (its prefetcher trains on the trace it decodes,
    which only the run can tell)."""
    n = len(capacities)
    trace = str(olmoe_trace(folder / "decoded.h5"))
    return {**small_sweep(grid={}, zips=[{
        "cache.capacity_experts": capacities,
        "prefetch.policy": ["none"] * (n - 1) + ["expert_map"],
        "prefetch.params": [{}] * (n - 1) + [{"train_trace": trace}]}]),
        "set": {**SMALL, "workload": {"decode_tokens": 4, "trace": trace}}}


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A small sweep over placement, batch size and capacity, with one point that fails."""
    out = tmp_path_factory.mktemp("sweep")
    document = small_sweep(grid={"placement": ["ddr", "ssd"], "workload.batch_size": [1, 2],
                                 "cache.capacity_experts": [64, 160]}, seed=1)
    run_sweep(parse_sweep(document), out, workers=2)
    run_sweep(parse_sweep(failing_sweep([64], out)), out / "failing", workers=1)
    return out


def test_report_renders_every_figure_as_a_png_of_the_expected_size(swept, tmp_path):
    written = build_report(swept, tmp_path)
    names = [p.name for p in written]
    assert names == ["energy_per_token.png", "hit_rate_vs_capacity.png", "stall_vs_energy.png", "latency_cdf.png",
                     "report.md"]
    for path in written[:-1]:
        assert png_size(path) == EXPECTED_PIXELS
        assert path.stat().st_size > 10_000  # drawn, not blank
    assert not list(tmp_path.glob("*.tmp"))


def test_report_md_embeds_the_figures_and_tabulates_every_point(swept, tmp_path):
    build_report(swept, tmp_path)
    text = (tmp_path / "report.md").read_text()
    for name in ("energy_per_token.png", "hit_rate_vs_capacity.png", "stall_vs_energy.png", "latency_cdf.png"):
        assert f"]({name})" in text
    table = read_table(swept / "results.h5")
    rows = [line for line in text.splitlines() if line.startswith(("| ddr", "| ssd"))]
    assert len(rows) == len(table["point_id"]) == 8
    first = table["energy_j_per_token.total"][0]
    assert f"| ddr, batch 1, capacity 64 | {first:.3f} |" in text


def test_hit_rate_curves_only_when_capacity_varies(swept, tmp_path):
    run_sweep(parse_sweep(small_sweep(grid={"placement": ["ddr", "ssd"]})), tmp_path / "sweep", workers=1)
    names = [p.name for p in build_report(tmp_path / "sweep", tmp_path / "report")]
    assert "hit_rate_vs_capacity.png" not in names and "energy_per_token.png" in names


def test_failed_points_are_listed_and_a_sweep_without_results_is_an_error(swept, tmp_path):
    sweep = parse_sweep(failing_sweep([64, 96], tmp_path))
    run_sweep(sweep, tmp_path / "sweep", workers=1)
    build_report(tmp_path / "sweep", tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "2 points: 1 ok, 1 failed" in text
    assert f"| `{sweep.points[1].point_id}` | capacity 96, " in text and "shares 1 sequence(s)" in text
    with pytest.raises(TierflowError, match="no point finished without error"):
        build_report(swept / "failing", tmp_path / "none")


def test_report_command(swept, tmp_path):
    result = run_tierflow("report", swept, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "report" / n) for n in (
        "energy_per_token.png", "hit_rate_vs_capacity.png", "stall_vs_energy.png", "latency_cdf.png", "report.md")]
    assert_one_line_error(run_tierflow("report", tmp_path / "nothing", "--out", tmp_path / "r"), "not a sweep folder")


def test_pareto_front_keeps_the_points_nothing_beats_on_both():
    stall = np.array([1.0, 2.0, 3.0, 1.5, 4.0])
    energy = np.array([5.0, 3.0, 1.0, 6.0, 0.5])
    assert pareto_front(stall, energy) == [0, 1, 2, 4]


def test_garbage_results_or_point_files_are_one_error_naming_the_file(swept, tmp_path):
    import shutil

    table_broken = tmp_path / "table"
    shutil.copytree(swept, table_broken, ignore=shutil.ignore_patterns("failing"))
    (table_broken / "results.h5").write_bytes(b"not hdf5 at all")
    assert_one_line_error(run_tierflow("report", table_broken, "--out", tmp_path / "r1"),
                          str(table_broken / "results.h5"), "not a readable results table")
    point_broken = tmp_path / "point"
    shutil.copytree(swept, point_broken, ignore=shutil.ignore_patterns("failing"))
    victim = sorted((point_broken / "points").glob("*.h5"))[0]
    victim.write_bytes(b"garbage")
    assert_one_line_error(run_tierflow("report", point_broken, "--out", tmp_path / "r2"),
                          str(victim), "redoes the point")
    (point_broken / "sweep.json").write_text("{not json")
    assert_one_line_error(run_tierflow("report", point_broken, "--out", tmp_path / "r3"), "sweep.json")
    listed = json.loads((swept / "sweep.json").read_text())
    for damaged, reason in [({**listed, "axes": [["a"]]}, "an axis is not a scenario key"),
                            ({**listed, "axes": [{"a": 1}]}, "an axis is not a scenario key"),
                            ({**listed, "description": ["x"]}, "its description is not text"),
                            ({**listed, "points": "abc"}, "no list of point ids"),
                            ({k: v for k, v in listed.items() if k != "points"}, "no list of point ids")]:
        (point_broken / "sweep.json").write_text(json.dumps(damaged))
        assert_one_line_error(run_tierflow("report", point_broken, "--out", tmp_path / "r4"),
                              "not a sweep description", reason)


def test_a_figure_null_at_every_point_is_reported_as_not_available(tmp_path):
    # Experts in HBM: no expert cache, so every point's HBM hit rate is null (a text column of the table).
    run_sweep(parse_sweep(small_sweep(grid={"workload.batch_size": [1, 2]},
                                      set={**SMALL, "placement": "hbm"})), tmp_path / "sweep", workers=1)
    assert read_table(tmp_path / "sweep" / "results.h5")["hit_rate.hbm"].tolist() == ["", ""]
    build_report(tmp_path / "sweep", tmp_path / "report")
    rows = [line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
            if line.startswith("| batch ")]
    assert len(rows) == 2 and all(" | n/a | " in row for row in rows)


def test_points_are_labelled_by_their_settings_when_one_axis_varies_or_one_point_is_ok(tmp_path):
    from tierflow.report import SweepTable, _groups

    run_sweep(parse_sweep(small_sweep(grid={"cache.capacity_experts": [64, 128]})), tmp_path / "curve", workers=1)
    # The hit-rate figure draws one curve over capacity, not one unconnected point per point id.
    assert _groups(SweepTable(tmp_path / "curve"), ("cache.capacity_experts",)) == {"all points": [0, 1]}
    run_sweep(parse_sweep(small_sweep(grid={"cache.capacity_experts": [64]})), tmp_path / "one", workers=1)
    build_report(tmp_path / "one", tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "\n| capacity 64 | " in text and "\n1 point: 1 ok, 0 failed." in text
