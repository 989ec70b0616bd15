"""``tierflow compare``: the same runs as ``simulate``, side by side, as a table and as JSON."""

from __future__ import annotations

import json
import re

import click
import pytest
from click.testing import CliRunner

from tierflow import compare as compare_module
from tierflow.config import load_scenario
from tierflow.errors import TierflowError
from tierflow.sim.engine import Simulation

SMALL_TOML = """
model = "olmoe-1b-7b"
hardware = "h100-pcie5"
placement = "ssd"
[workload]
batch_size = 1
decode_tokens = 6
context_length = 128
[cache]
capacity_experts = 100
"""


@pytest.fixture
def scenarios(tmp_path):
    plain = tmp_path / "plain.toml"
    plain.write_text(SMALL_TOML)
    prefetching = tmp_path / "prefetching.toml"
    prefetching.write_text(SMALL_TOML + '[prefetch]\npolicy = "oracle"\nlookahead = 2\nmax_queued = 100\n')
    return str(plain), str(prefetching)


def group():
    @click.group()
    def cli():
        pass

    compare_module.register(cli)
    return cli


def invoke(*args):
    return CliRunner().invoke(group(), ["compare", *args], catch_exceptions=False)


def test_json_holds_each_scenario_exactly_as_simulate_reports_it(scenarios):
    result = invoke("--scenario", scenarios[0], "--scenario", scenarios[1], "--set", "seed=2", "--json", "--quiet")
    assert result.exit_code == 0
    payload = json.loads(result.stdout)
    assert [s["scenario"] for s in payload["scenarios"]] == ["plain", "prefetching"]
    for name, summary in zip(scenarios, payload["scenarios"], strict=True):
        expected = Simulation(load_scenario(name, ["seed=2"])).run().summary
        assert summary == json.loads(json.dumps(expected))


def test_table_has_one_column_per_scenario_and_the_main_figures(scenarios):
    result = invoke("--scenario", scenarios[0], "--scenario", scenarios[1], "--quiet")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["plain", "prefetching"]
    labels = {line[:26].strip() for line in lines[2:]}
    for label in ("latency/token mean (ms)", "stall/token (ms)", "HBM hit rate", "DDR hit rate",
                  "bytes moved/token (GB)", "energy/token total (J)", "compute (J)", "ssd (J)", "static (J)",
                  "wasted prefetches (J)", "prefetch accuracy", "SSD utilization", "link utilization"):
        assert label in labels, label
    stall = next(line for line in lines if line.startswith("stall/token")).split()[-2:]
    assert float(stall[1]) < float(stall[0])  # the oracle hides some of the plain run's stall


def test_format_comparison_matches_the_summaries():
    summaries = [Simulation(load_scenario("ssd_offload", ["workload.decode_tokens=2"])).run().summary]
    table = compare_module.format_comparison(summaries)
    stall_ms = summaries[0]["stall_s_per_token"] * 1e3
    assert f"{stall_ms:.2f}" in next(line for line in table.splitlines() if line.startswith("stall/token"))
    energy = summaries[0]["energy_j_per_token"]
    moved = energy["total"] - energy["compute"] - energy["static"]  # everything but compute and background power
    line = next(line for line in table.splitlines() if line.strip().startswith("data movement (J)"))
    assert line.split()[-1] == f"{moved:.2f}" and moved > 0


def test_utilization_rows_are_the_mean_over_each_kind_of_channel():
    runs = [Simulation(load_scenario(name, ["workload.decode_tokens=2"])).run() for name in ("hbm_only", "ssd_offload")]
    table = compare_module.format_comparison([r.summary for r in runs], [r.channels for r in runs])
    drives = [c["utilization"] for c in runs[1].channels if c["kind"] == "ssd"]
    assert len(drives) == 8 and all(c["kind"] == "link" for c in runs[0].channels)
    row = next(line for line in table.splitlines() if line.startswith("SSD utilization")).split()
    assert row[-2:] == ["—", f"{100 * sum(drives) / len(drives):.1f}%"]  # hbm_only moves nothing


def test_a_bad_scenario_fails_before_anything_runs(scenarios):
    with pytest.raises(TierflowError, match="unknown scenario"):
        invoke("--scenario", scenarios[0], "--scenario", "no_such_scenario", "--quiet")
    with pytest.raises(TierflowError, match="valid keys"):
        invoke("--scenario", scenarios[0], "--set", "cache.size=3", "--quiet")


def test_at_least_one_scenario_is_required():
    result = CliRunner().invoke(group(), ["compare"])
    assert result.exit_code != 0 and "--scenario" in result.output


def test_the_command_line_runs_compare(scenarios):
    from conftest import run_cli

    result = run_cli("compare", "--scenario", scenarios[0], "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["scenarios"][0]["scenario"] == "plain"


def test_every_scenario_is_checked_before_any_runs_and_errors_name_it(scenarios, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr("tierflow.sim.commands.run_with_progress", lambda *a, **k: ran.append(a) or None)
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(SMALL_TOML.replace("capacity_experts = 100", "capacity_experts = 1"))
    with pytest.raises(TierflowError, match=f"scenario {tiny}: .*working set"):
        invoke("--scenario", scenarios[0], "--scenario", str(tiny), "--quiet")
    with pytest.raises(TierflowError, match="scenario no_such_scenario: unknown scenario"):
        invoke("--scenario", scenarios[0], "--scenario", "no_such_scenario", "--quiet")
    with pytest.raises(TierflowError, match="must be a finite number"):
        invoke("--scenario", scenarios[0], "--set", "energy.gpu_static_w=inf", "--json", "--quiet")
    assert ran == []


# Two shipped scenarios, short enough to run in about a second each, long enough for the prefetcher to issue.
SHIPPED = ("--scenario", "ssd_offload", "--scenario", "ssd_prefetch", "--set", "workload.decode_tokens=32",
           "--quiet")


@pytest.fixture(scope="module")
def shipped_comparison():
    """``compare``'s table and its ``--json`` for :data:`SHIPPED` (two invocations, same seed), with the
    :class:`~tierflow.metrics.Results` behind the table (for its channels, which the JSON leaves out)."""
    import tierflow.sim.commands as sim_commands

    runs, run = [], sim_commands.run_with_progress

    def recorded(*args, **kwargs):
        runs.append(run(*args, **kwargs))
        return runs[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sim_commands, "run_with_progress", recorded)
        table = invoke(*SHIPPED)
    payload = invoke(*SHIPPED, "--json")
    assert (table.exit_code, payload.exit_code) == (0, 0)
    return table.stdout, json.loads(payload.stdout)["scenarios"], runs


def _table_cells(text: str) -> list[list[str]]:
    """The table's rows as cells, cut at the columns its rule of dashes marks (a label keeps its indent)."""
    lines = text.splitlines()
    spans = [(m.start(), m.end()) for m in re.finditer("-+", lines[1])]
    assert lines[1] == "  ".join("-" * (end - start) for start, end in spans)
    rows = []
    for line in lines[:1] + lines[2:]:
        assert len(line) <= spans[-1][1], line  # nothing beyond the last column
        rows.append([line[: spans[0][1]].rstrip()] + [line[start:end].strip() for start, end in spans[1:]])
    return rows


def _expected_column(s: dict, channels: list[dict]) -> list[tuple[str, str]]:
    """Each row's label and the figure it shows for the summary ``s`` (and the run's ``channels``), formatted
    here from the summary's own figures."""
    per_token_gb = lambda total: f"{total / s['tokens'] / 1e9:.2f}"  # noqa: E731
    rate = lambda value: "—" if value is None else f"{100 * value:.1f}%"  # noqa: E731
    energy, p = s["energy_j_per_token"], s["prefetch"]

    def utilization(kind):
        used = [c["utilization"] for c in channels if c["kind"] == kind]
        return rate(sum(used) / len(used))

    return [
        ("", s["scenario"]),
        ("model / batch", f"{s['model']} / {s['batch_size']}"),
        ("latency/token mean (ms)", f"{s['latency_s_per_token']['mean'] * 1e3:.2f}"),
        ("latency/token p99 (ms)", f"{s['latency_s_per_token']['p99'] * 1e3:.2f}"),
        ("stall/token (ms)", f"{s['stall_s_per_token'] * 1e3:.2f}"),
        ("tokens/s", f"{s['tokens_per_s']:.1f}"),
        ("HBM hit rate", rate(s["hit_rate"]["hbm"])),
        ("DDR hit rate", rate(s["hit_rate"]["ddr"])),
        ("bytes moved/token (GB)", per_token_gb(sum(s["bytes_moved"].values()))),
        ("  of which prefetched (GB)", per_token_gb(p["prefetched_bytes"])),
        ("  of which wasted (GB)", per_token_gb(p["wasted_bytes"])),
        ("energy/token total (J)", f"{energy['total']:.2f}"),
        *[(f"  {name} (J)", f"{joules:.2f}") for name, joules in energy.items() if name != "total"],
        ("  data movement (J)", f"{energy['hbm'] + energy['ddr'] + energy['ssd'] + energy['link']:.2f}"),
        ("  prefetched bytes (J)", f"{p['energy_j_per_token']:.2f}"),
        ("  wasted prefetches (J)", f"{p['wasted_energy_j_per_token']:.2f}"),
        ("prefetches issued", f"{p['issued']:,}"),
        ("prefetch accuracy", rate(p["accuracy"])),
        ("  on target", rate(p["on_target_accuracy"])),
        ("prefetch coverage", rate(p["coverage"])),
        ("late prefetches", f"{p['late']:,}"),
        ("SSD utilization", utilization("ssd")),
        ("link utilization", utilization("link")),
    ]


def test_the_shipped_prefetching_run_tells_its_figures_apart(shipped_comparison):
    """In the short ssd_prefetch run the figures a row could show in another's place differ (prefetched and
    wasted bytes, useful and late prefetches, accuracy and on-target accuracy, energy of prefetched and wasted
    bytes), so the table and simulate tests below catch a row that reads the wrong one; ssd_offload issues
    none."""
    _, (plain, prefetching), _ = shipped_comparison
    p = prefetching["prefetch"]
    assert plain["prefetch"]["issued"] == 0 and p["issued"] > 0
    tokens = prefetching["tokens"]
    assert f"{p['wasted_bytes'] / tokens / 1e9:.2f}" != f"{p['prefetched_bytes'] / tokens / 1e9:.2f}"
    assert len({p["issued"], p["useful"], p["late"], p["on_target"]}) == 4
    assert len({f"{p[name]:.3f}" for name in ("accuracy", "on_target_accuracy", "coverage")}) == 3
    assert f"{p['energy_j_per_token']:.2f}" != f"{p['wasted_energy_j_per_token']:.2f}"


def test_every_row_of_the_table_shows_the_figure_of_the_json(shipped_comparison):
    """The text table of compare, row by row and in order, equals the figures of the same runs' ``--json``
    formatted here (ms to 2 decimals, rates to 0.1% or —, bytes per token in GB, J to 2 decimals, counts with
    thousands separators), the utilization rows the mean over each kind of channel of the runs behind the
    table; those runs' summaries equal the JSON's (the runs are deterministic)."""
    table, summaries, runs = shipped_comparison
    assert [json.loads(json.dumps(run.summary)) for run in runs] == summaries
    columns = [_expected_column(summary, run.channels) for summary, run in zip(summaries, runs, strict=True)]
    expected = [[label, *[column[n][1] for column in columns]] for n, (label, _) in enumerate(columns[0])]
    assert all([label for label, _ in column] == [row[0] for row in expected] for column in columns)
    assert _table_cells(table) == expected


def test_simulate_prints_the_prefetch_figures_of_its_json():
    """The prefetch line of ``simulate``'s text summary shows exactly the figures of ``simulate --json`` for the
    same run: issued, useful and late counts, accuracy and on-target accuracy, coverage, wasted GB and the
    wasted bytes' J per token."""
    from tierflow.cli import cli

    args = ["simulate", "--scenario", "ssd_prefetch", "--set", "workload.decode_tokens=32", "--quiet"]
    text = CliRunner().invoke(cli, args, catch_exceptions=False)
    payload = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert (text.exit_code, payload.exit_code) == (0, 0)
    p = json.loads(payload.stdout)["prefetch"]
    assert p["issued"] > 0
    lines = [line for line in text.stdout.splitlines() if line.startswith("prefetch ")]
    assert lines == [f"prefetch          issued {p['issued']:,}   useful {p['useful']:,}   late {p['late']:,}   "
                     f"accuracy {100 * p['accuracy']:.1f}% (on target {100 * p['on_target_accuracy']:.1f}%)   "
                     f"coverage {100 * p['coverage']:.1f}%   wasted {p['wasted_bytes'] / 1e9:.2f} GB "
                     f"({p['wasted_energy_j_per_token']:.3f} J/token)"]
