"""``tierflow compare``: the same runs as ``simulate``, side by side, as a table and as JSON."""

from __future__ import annotations

import json

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
