"""Sweeps: grid expansion, ids and seeds, identical tables from every executor, resume, failing points, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import assert_one_line_error
from tierflow.errors import TierflowError
from tierflow.sweep import derived_seed, load_sweep, parse_sweep, points_dir, read_table, run_sweep
from tierflow.trace.format import write_trace

# Small points: OLMoE on one H100, 8 decode steps; a whole sweep of these takes a second or two.
SMALL = {
    "model": "olmoe-1b-7b", "hardware": "h100-pcie5", "gpus": 1,
    "workload": {"decode_tokens": 8},
}


def small_sweep(grid=None, zips=(), **top):
    return {"name": "small", "scenario": "ssd_offload", "set": SMALL,
            "grid": grid if grid is not None else {"placement": ["ddr", "ssd"],
                                                   "cache.capacity_experts": [64, 128]},
            "zip": list(zips), **top}


def run_tierflow(*args):
    """``tierflow ARGS`` in a subprocess; registers the sweep commands if cli.py does not yet."""
    code = ("import sys\nfrom tierflow import cli, sweep_commands\n"
            "if 'sweep' not in cli.cli.commands:\n    sweep_commands.register(cli.cli)\ncli.main(sys.argv[1:])")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env)


def write_sweep(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ grid and ids


def test_grid_is_the_cartesian_product_crossed_with_each_zip_group():
    sweep = parse_sweep(small_sweep(zips=[{"prefetch.policy": ["none", "transition"],
                                           "prefetch.lookahead": [1, 2]}]))
    assert sweep.axis_keys == ("placement", "cache.capacity_experts", "prefetch.policy", "prefetch.lookahead")
    combos = [tuple(p.axes.values()) for p in sweep.points]
    assert len(combos) == 2 * 2 * 2
    assert combos[0] == ("ddr", 64, "none", 1) and combos[1] == ("ddr", 64, "transition", 2)
    assert combos[-1] == ("ssd", 128, "transition", 2)
    # The fixed settings and the base scenario reach every point.
    assert {p.scenario_table["model"] for p in sweep.points} == {"olmoe-1b-7b"}
    assert {p.scenario_table["cache"]["policy"] for p in sweep.points} == {"lru"}


def test_ids_are_stable_and_change_with_any_setting():
    first, again = parse_sweep(small_sweep()), parse_sweep(small_sweep())
    ids = [p.point_id for p in first.points]
    assert ids == [p.point_id for p in again.points]
    assert len(set(ids)) == len(ids) and all(len(i) == 12 for i in ids)
    longer = parse_sweep({**small_sweep(), "set": {**SMALL, "workload": {"decode_tokens": 9}}})
    assert not set(ids) & {p.point_id for p in longer.points}
    # Labels do not change what is simulated, so they do not change the id.
    renamed = parse_sweep({**small_sweep(), "set": {**SMALL, "description": "another label"}})
    assert ids == [p.point_id for p in renamed.points]


def test_points_are_labelled_by_their_sweep_not_by_the_base_scenario():
    """The base scenario's name and description describe another model and hardware than the points' [set]:
    a point carries the sweep's, naming the base; a [set] label still wins."""
    labels = {(p.scenario_table["name"], p.scenario_table["description"])
              for p in parse_sweep(small_sweep(description="OLMoE on one H100")).points}
    assert labels == {("small", "OLMoE on one H100 (from scenario ssd_offload)")}
    unnamed = parse_sweep(small_sweep()).points[0].scenario_table
    assert unnamed["description"] == "a point of sweep small (from scenario ssd_offload)"
    assert parse_sweep({**small_sweep(), "set": {**SMALL, "name": "mine"}}).points[0].scenario_table["name"] == "mine"


def test_seed_derives_from_the_point_unless_the_sweep_fixes_it():
    derived = parse_sweep(small_sweep())
    seeds = [p.seed for p in derived.points]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [p.seed for p in parse_sweep(small_sweep()).points]
    assert all(0 <= s < 2**31 for s in seeds)
    assert derived_seed("abc") == derived_seed("abc") != derived_seed("abd")
    fixed = parse_sweep(small_sweep(seed=7))
    assert {p.seed for p in fixed.points} == {7}
    replicas = parse_sweep(small_sweep(grid={"seed": [1, 2, 3]}))
    assert [p.seed for p in replicas.points] == [1, 2, 3]


def test_nested_tables_and_quoted_dotted_keys_mean_the_same():
    nested = parse_sweep(small_sweep(grid={"workload": {"batch_size": [1, 2]}}))
    dotted = parse_sweep(small_sweep(grid={"workload.batch_size": [1, 2]}))
    assert [p.point_id for p in nested.points] == [p.point_id for p in dotted.points]


@pytest.mark.parametrize("document, fragments", [
    (small_sweep(grid={"cache.capacity": [1, 2]}), ["unknown scenario key 'cache.capacity'", "cache.capacity_experts"]),
    (small_sweep(grid={"placement": []}), ["grid axis 'placement'", "non-empty list"]),
    (small_sweep(grid={}), ["no axes"]),
    (small_sweep(grid={}, zips=[{"placement": ["ddr", "ssd"], "workload.batch_size": [1]}]),
     ["zip group 1", "different lengths"]),
    (small_sweep(grid={"workload.batch_size": [1, 0]}), ["workload.batch_size=0", "batch_size must be > 0"]),
    (small_sweep(grid={"placement": ["ddr", "tape"]}), ["placement must be one of"]),
    ({**small_sweep(), "axes": {}}, ["unknown sweep key 'axes'"]),
    (small_sweep(grid={"placement": ["ddr", "ddr"]}), ["same scenario"]),
    (small_sweep(grid={"seed": [1, 2]}, seed=3), ["'seed' is set in more than one place"]),
    ({**small_sweep(), "grid": ["placement"]}, ["`grid` must be a table"]),
])
def test_invalid_sweeps_are_one_error(document, fragments):
    with pytest.raises(TierflowError) as caught:
        parse_sweep(document)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_grid_of_millions_of_points_is_refused_before_any_is_made(monkeypatch):
    """A grid over the limit is refused at once from its axes' lengths, not after building (and holding) every
    point's scenario: eight axes of ten values and a zip of two are 2 x 10**8 points."""
    import tierflow.sweep

    grid = {key: list(range(1, 11)) for key in (
        "workload.batch_size", "workload.context_length", "energy.link_pj_per_bit", "energy.hbm_read_pj_per_bit",
        "energy.ddr_read_pj_per_bit", "energy.ssd_read_pj_per_bit", "energy.pj_per_flop", "energy.gpu_static_w")}
    with monkeypatch.context() as patch:
        patch.setattr(tierflow.sweep, "MAX_POINTS", 999, raising=False)
        with pytest.raises(TierflowError, match=r"1,000 points \(10 x 10 x 10\), more than the 999"):
            parse_sweep(small_sweep(grid=dict(list(grid.items())[:3])))
    with pytest.raises(TierflowError) as caught:
        parse_sweep(small_sweep(grid=grid, zips=[{"placement": ["ddr", "ssd"]}]))
    assert "200,000,000 points (10 x 10 x 10 x 10 x 10 x 10 x 10 x 10 x 2)" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_invalid_sweep_file_on_the_command_line(tmp_path):
    bad = write_sweep(tmp_path / "bad.toml", 'scenario = "ssd_offload"\n[grid]\n"cache.size" = [1, 2]\n')
    assert_one_line_error(run_tierflow("sweep", bad, "--out", tmp_path / "out"),
                          "unknown scenario key 'cache.size'", "valid keys:", "workload.batch_size")
    mismatched = write_sweep(tmp_path / "zip.toml",
                             'scenario = "ssd_offload"\n[[zip]]\nplacement = ["ddr", "ssd"]\n"gpus" = [1]\n')
    assert_one_line_error(run_tierflow("sweep", mismatched, "--out", tmp_path / "out"), "different lengths")
    assert_one_line_error(run_tierflow("sweep", tmp_path / "missing.toml", "--out", tmp_path / "out"),
                          "no such file")
    assert_one_line_error(run_tierflow("sweep", "/dev/null", "--out", tmp_path / "out"), "not a regular file")
    assert_one_line_error(run_tierflow("sweep", tmp_path, "--out", tmp_path / "out"), "is a directory")
    good = write_sweep(tmp_path / "good.toml", 'scenario = "ssd_offload"\n[grid]\n"cache.capacity_experts" = [1856]\n')
    for quiet in (["--quiet"], []):  # the progress bar shows once the scheduler is reached, not before
        assert_one_line_error(run_tierflow("sweep", good, "--out", tmp_path / "out2", "--scheduler", "garbage", *quiet),
                              "--scheduler garbage: cannot connect")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ running


def _csv(out: Path) -> str:
    return (out / "results.csv").read_text()


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    outcome = run_sweep(parse_sweep(small_sweep()), out, workers=1)
    return out, outcome


def test_serial_run_writes_a_row_per_point_with_parameters_and_figures(serial_run):
    out, outcome = serial_run
    assert (outcome.total, outcome.ran, outcome.skipped, outcome.errors) == (4, 4, 0, 0)
    table = read_table(out / "results.h5")
    assert list(table["status"]) == ["ok"] * 4
    assert list(table["placement"]) == ["ddr", "ddr", "ssd", "ssd"]
    assert list(table["cache.capacity_experts"]) == [64, 128, 64, 128]
    assert list(table["tokens"]) == [8] * 4
    assert (table["energy_j_per_token.total"] > 0).all()
    # Every figure of `simulate --json` is a column, and the per-point file holds the full output.
    record = json.loads((points_dir(out) / f"{table['point_id'][0]}.json").read_text())
    flat = _flatten_keys(record["summary"]) - {"scenario", "model"}
    assert flat <= set(table)
    with h5py.File(points_dir(out) / f"{table['point_id'][0]}.h5") as f:  # the per-step series of `simulate --out`
        assert set(f["steps"]) == {"latency_s", "stall_s", "tokens", "hits", "misses", "in_flight"}
        assert len(f["steps/in_flight"]) == 8
    header = _csv(out).splitlines()[0].split(",")
    assert header == list(table)


def test_each_row_has_the_bandwidth_its_drives_and_links_used(serial_run):
    """The text table's utilization line, as columns: mean and highest over the GPUs, of drives and of links."""
    from tierflow.config import scenario_from_table
    from tierflow.sim.engine import Simulation

    out, _ = serial_run
    table = read_table(out / "results.h5")
    sweep = parse_sweep(small_sweep())
    for i, point in enumerate(sweep.points):
        channels = Simulation(scenario_from_table(point.scenario_table)).run().channels
        for kind in ("ssd", "link"):
            used = [c["utilization"] for c in channels if c["kind"] == kind]
            if not used:  # experts in DDR: no drive on the path
                assert point.axes["placement"] == "ddr" and np.isnan(table[f"utilization.{kind}.mean"][i])
                continue
            assert table[f"utilization.{kind}.mean"][i] == pytest.approx(np.mean(used), rel=1e-12)
            assert table[f"utilization.{kind}.max"][i] == pytest.approx(max(used), rel=1e-12)
            assert 0 < max(used) <= 1


def test_a_points_output_keeps_the_per_step_prefetch_series(tmp_path):
    sweep = parse_sweep(small_sweep(grid={"prefetch.policy": ["previous_token"], "cache.capacity_experts": [64]}))
    run_sweep(sweep, tmp_path, workers=1)
    point = sweep.points[0].point_id
    record = json.loads((points_dir(tmp_path) / f"{point}.json").read_text())
    with h5py.File(points_dir(tmp_path) / f"{point}.h5") as f:
        for key in ("issued", "useful", "late", "wasted_bytes"):
            assert int(f[f"steps/prefetch_{key}"][:].sum()) == record["summary"]["prefetch"][key]
    assert record["summary"]["prefetch"]["issued"] > 0


def _flatten_keys(value, prefix=""):
    if isinstance(value, dict):
        return set().union(*(_flatten_keys(v, f"{prefix}{k}.") for k, v in value.items()))
    return {prefix[:-1]}


def test_a_point_matches_simulate_json(serial_run):
    out, _ = serial_run
    table = read_table(out / "results.h5")
    result = run_tierflow("simulate", "--scenario", "ssd_offload", "--json", "--set", "model=olmoe-1b-7b",
                          "--set", "hardware=h100-pcie5", "--set", "gpus=1", "--set", "workload.decode_tokens=8",
                          "--set", "placement=ddr", "--set", "cache.capacity_experts=64",
                          "--set", f"seed={table['seed'][0]}")
    summary = json.loads(result.stdout)
    assert table["energy_j_per_token.total"][0] == summary["energy_j_per_token"]["total"]
    assert table["latency_s_per_token.p99"][0] == summary["latency_s_per_token"]["p99"]


def test_parallel_and_dask_give_the_serial_table(serial_run, tmp_path):
    from dask.distributed import Client, LocalCluster  # in the test extra

    out, _ = serial_run
    run_sweep(parse_sweep(small_sweep()), tmp_path / "parallel", workers=2)
    assert _csv(tmp_path / "parallel") == _csv(out)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        outcome = run_sweep(parse_sweep(small_sweep()), tmp_path / "dask", engine="dask", client=client)
    assert outcome.ran == 4
    assert _csv(tmp_path / "dask") == _csv(out)


def test_resume_after_an_interrupted_run(serial_run, tmp_path):
    sweep = parse_sweep(small_sweep())
    finished = []

    def interrupt_after_two(done):
        finished.append(done)
        if sum(finished) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, workers=1, progress=interrupt_after_two)
    records = sorted(points_dir(tmp_path).glob("*.json"))
    assert len(records) == 2
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "results.csv").exists()
    # A kill during a write leaves at most a temporary file, never a record: that point runs again.
    (points_dir(tmp_path) / "stray.json.tmp").write_text("{half")
    records[0].unlink()
    ran = []
    outcome = run_sweep(sweep, tmp_path, workers=1, progress=ran.append)
    assert (outcome.ran, outcome.skipped) == (3, 1) and ran == [0, 1, 1, 1]  # 0: the runs begin (the bar shows)
    assert _csv(tmp_path) == _csv(serial_run[0])
    again = run_sweep(sweep, tmp_path, workers=2)
    assert (again.ran, again.skipped) == (0, 4)


def test_an_interrupted_parallel_run_keeps_what_finished(serial_run, tmp_path):
    sweep = parse_sweep(small_sweep())

    def interrupt(done):
        if done:  # the first point finished
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, workers=2, progress=interrupt)
    saved = len(list(points_dir(tmp_path).glob("*.json")))
    assert saved == 1 and not list(tmp_path.rglob("*.tmp"))
    outcome = run_sweep(sweep, tmp_path, workers=2)
    assert (outcome.ran, outcome.skipped) == (3, 1)
    assert _csv(tmp_path) == _csv(serial_run[0])


def olmoe_trace(path: Path) -> Path:
    """A small OLMoE trace: 4 sequences of 16 decode tokens, random distinct experts per layer."""
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permuted(np.tile(np.arange(64), (16, 1)), axis=1)[:, :8] for _ in range(64)])
    write_trace(path, experts.astype(np.uint16), sequence_id=np.repeat(np.arange(4), 16).astype(np.int64),
                token_index=np.tile(np.arange(16), 4).astype(np.int64), model="olmoe-1b-7b", num_experts=64,
                source="test")
    return path


def test_a_failing_point_is_recorded_and_the_others_finish(tmp_path):
    # A prefetcher trained on the trace it then decodes fails when it is built (the sweep's check before the
    # run cannot see it: it needs the workload).
    trace = str(olmoe_trace(tmp_path / "t.h5"))
    sweep = parse_sweep({**small_sweep(grid={}, zips=[{
        "cache.capacity_experts": [64, 96, 128],
        "prefetch.policy": ["none", "expert_map", "none"],
        "prefetch.params": [{}, {"train_trace": trace}, {}]}]),
        "set": {**SMALL, "workload": {"decode_tokens": 4, "trace": trace}}})
    outcome = run_sweep(sweep, tmp_path, workers=2)
    assert (outcome.ran, outcome.errors) == (3, 1)
    table = read_table(tmp_path / "results.h5")
    assert list(table["status"]) == ["ok", "error", "ok"]
    assert "shares 1 sequence(s)" in table["error"][1] and "\n" not in table["error"][1]
    assert list(table["error"][[0, 2]]) == ["", ""]
    assert (table["energy_j_per_token.total"][[0, 2]] > 0).all()
    import numpy as np

    assert np.isnan(table["energy_j_per_token.total"][1])
    # A failed point is tried again on the next run; finished ones are not.
    rerun = run_sweep(sweep, tmp_path, workers=1)
    assert (rerun.ran, rerun.skipped, rerun.errors) == (1, 2, 1)


def test_sweep_command_end_to_end(tmp_path):
    sweep_file = write_sweep(tmp_path / "two.toml", """
name = "two"
scenario = "ssd_offload"
seed = 3
[set]
model = "olmoe-1b-7b"
hardware = "h100-pcie5"
gpus = 1
workload.decode_tokens = 8
cache.capacity_experts = 128
[grid]
placement = ["ddr", "ssd"]
""")
    result = run_tierflow("sweep", sweep_file, "--out", tmp_path / "out", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "2 points (0 finished before, 2 run now, 0 with errors)" in result.stdout
    assert "sweep two: 2 of 2 points" in result.stderr  # the progress bar's label
    assert load_sweep(sweep_file).points[0].seed == 3
    again = run_tierflow("sweep", sweep_file, "--out", tmp_path / "out", "--quiet")
    assert "2 finished before, 0 run now" in again.stdout and again.stderr == ""
    assert_one_line_error(run_tierflow("sweep", sweep_file, "--out", tmp_path / "o", "--engine", "local",
                                       "--scheduler", "tcp://127.0.0.1:1"), "--scheduler needs --engine dask")


def test_sweep_command_with_a_failed_point_writes_the_table_and_exits_1(tmp_path):
    # A prefetcher trained on the trace it then decodes fails only when it is built (the check needs the
    # workload), so the point runs, fails, and the status says so; a missing training file is bad input (2).
    trace = olmoe_trace(tmp_path / "t.h5")
    body = """
name = "one_fails"
scenario = "ssd_offload"
[set]
model = "olmoe-1b-7b"
hardware = "h100-pcie5"
gpus = 1
workload.trace = "TRACE"
workload.decode_tokens = 4
cache.capacity_experts = 128
[[zip]]
"prefetch.policy" = ["none", "expert_map"]
"prefetch.params" = [{}, {train_trace = "TRAIN"}]
""".replace("TRACE", str(trace))
    sweep_file = write_sweep(tmp_path / "s.toml", body.replace("TRAIN", str(trace)))
    result = run_tierflow("sweep", sweep_file, "--out", tmp_path / "out", "--quiet")
    assert result.returncode == 1, result.stderr
    assert "2 points (0 finished before, 2 run now, 1 with errors)" in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"tierflow: error: 1 point(s) failed; see the error column of {tmp_path / 'out' / 'results.csv'} "
        "(a rerun tries them again)"]
    assert list(read_table(tmp_path / "out" / "results.h5")["status"]) == ["ok", "error"]
    missing = write_sweep(tmp_path / "m.toml", body.replace("TRAIN", str(tmp_path / "missing.h5")))
    assert_one_line_error(run_tierflow("sweep", missing, "--out", tmp_path / "out2"),
                          "point", "train_trace", "missing.h5: no such file")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("grid, fragments", [
    ({"cache.policy": ["lru", "bogus"]}, ["cache.policy='bogus'", "unknown cache policy 'bogus'"]),
    ({"cache.params.foo": [1]}, ["cache.params.foo=1", "unknown parameter(s) foo"]),
    ({"ddr_cache.params.foo": [1]}, ["ddr_cache.params.foo=1", "ddr_cache: cache policy", "unknown parameter(s) foo"]),
    ({"ddr_cache.policy": ["bogus"]}, ["ddr_cache.policy='bogus'", "ddr_cache: unknown cache policy 'bogus'"]),
    ({"workload.trace": ["/nonexistent/trace.h5"]}, ["/nonexistent/trace.h5", "no such file"]),
    ({"workload.trace": ["TEXT"]}, ["not an HDF5 file"]),
    ({"workload.trace": ["TOP2"]}, ["trace has top_k 2 but model 'olmoe-1b-7b' has top_k 8"]),
    ({"cache.capacity_experts": [128, 1]}, ["cache.capacity_experts=1", "working set"]),
    ({"cache.capacity_experts": [128, 100000]}, ["cache.capacity_experts=100000", "HBM"]),
    ({"prefetch.policy": ["oracle"], "prefetch.params.seed": [-1]}, ["seed must be >= 0"]),
    # Checked against the workload the run would build: four tokens need more than 9 distinct experts at a layer,
    # and a trace of one sequence cannot fill a batch of two.
    ({"workload.batch_size": [4], "cache.capacity_experts": [128, 9]}, ["cache.capacity_experts=9", "working set of"]),
    ({"workload.trace": ["ONESEQ"], "workload.batch_size": [1, 2]}, ["batch_size = 2", "1 sequence"]),
])
def test_points_the_simulator_would_reject_stop_the_sweep_before_anything_runs(tmp_path, grid, fragments):
    text = tmp_path / "text.h5"
    text.write_text("not a trace")
    top2 = tmp_path / "top2.h5"  # OLMoE's 16 layers x 64 experts, but two experts a token
    write_trace(top2, np.tile(np.arange(2), (4, 16, 1)), np.zeros(4, dtype=int), model="olmoe-1b-7b",
                num_experts=64, source="test")
    one_sequence = tmp_path / "one.h5"
    write_trace(one_sequence, np.tile(np.arange(8), (12, 16, 1)), np.zeros(12, dtype=int), model="olmoe-1b-7b",
                num_experts=64, source="test")
    files = {"TEXT": str(text), "TOP2": str(top2), "ONESEQ": str(one_sequence)}
    grid = {k: [files.get(v, v) if isinstance(v, str) else v for v in values] for k, values in grid.items()}
    sweep = parse_sweep(small_sweep(grid=grid))
    with pytest.raises(TierflowError) as caught:
        run_sweep(sweep, tmp_path / "out", workers=1)
    for fragment in fragments:
        assert fragment in str(caught.value)
    assert "\n" not in str(caught.value) and "point " in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("document, fragments", [
    (small_sweep(grid={"energy.hbm_read_pj_per_bit": [float("nan"), 1.0]}), ["must be a finite number, got nan"]),
    (small_sweep(grid={"energy.gpu_static_w": [float("inf")]}), ["must be a finite number, got inf"]),
    (small_sweep(grid={"cache.params.half_life": [float("nan")]}), ["cache.params.half_life", "finite"]),
    (small_sweep(seed=-1), ["seed must be >= 0"]),
    (small_sweep(grid={"seed": [1, 2**64]}), ["seed' must be <= 9223372036854775807"]),
    ({**small_sweep(grid={"prefetch.params.x": [1, 2]}), "set": {**SMALL, "prefetch.params": 5}},
     ["key 'prefetch.params.x' is inside 'prefetch.params', which is set as a whole"]),
])
def test_non_finite_values_and_negative_seeds_are_rejected_when_loading(document, fragments):
    with pytest.raises(TierflowError) as caught:
        parse_sweep(document)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_nan_in_a_sweep_file_is_one_error(tmp_path):
    bad = write_sweep(tmp_path / "nan.toml", 'scenario = "ssd_offload"\n[grid]\n"energy.hbm_read_pj_per_bit" = [nan, 1.0]\n')
    assert_one_line_error(run_tierflow("sweep", bad, "--out", tmp_path / "out"), "finite number")
    assert not (tmp_path / "out").exists()


def test_a_garbage_point_output_is_redone_on_resume(tmp_path):
    sweep = parse_sweep(small_sweep(grid={"cache.capacity_experts": [64, 128]}, seed=1))
    run_sweep(sweep, tmp_path, workers=1)
    first = sweep.points[0].point_id
    (points_dir(tmp_path) / f"{first}.h5").write_bytes(b"garbage")
    rerun = run_sweep(sweep, tmp_path, workers=1)
    assert (rerun.ran, rerun.skipped, rerun.errors) == (1, 1, 0)


def test_a_record_filed_under_another_points_name_is_redone(tmp_path):
    """Another point's files copied over a point's own (a hand-made merge of two folders): its record names the
    other point, so it is not finished, and the table gets its own row back."""
    sweep = parse_sweep(small_sweep(grid={"cache.capacity_experts": [64, 128]}, seed=1))
    run_sweep(sweep, tmp_path, workers=1)
    reference = _csv(tmp_path)
    first, second = (p.point_id for p in sweep.points)
    folder = points_dir(tmp_path)
    for suffix in (".json", ".h5"):
        (folder / f"{second}{suffix}").write_bytes((folder / f"{first}{suffix}").read_bytes())
    rerun = run_sweep(sweep, tmp_path, workers=1)
    assert (rerun.ran, rerun.skipped) == (1, 1)
    assert _csv(tmp_path) == reference


def test_a_truncated_point_output_or_a_record_of_the_wrong_shape_is_redone(tmp_path):
    sweep = parse_sweep(small_sweep(grid={"cache.capacity_experts": [64, 96, 128]}, seed=1))
    run_sweep(sweep, tmp_path, workers=1)
    reference = _csv(tmp_path)
    first, second, _ = (p.point_id for p in sweep.points)
    h5 = points_dir(tmp_path) / f"{first}.h5"
    data = h5.read_bytes()
    h5.write_bytes(data[: len(data) // 2])  # the HDF5 signature survives: a look at it alone passes the file
    assert h5py.is_hdf5(h5)
    for shape in ("null", "[1]", json.dumps({"point_id": second}), json.dumps({"point_id": second, "status": "ok",
                                                                                "error": ""})):
        (points_dir(tmp_path) / f"{second}.json").write_text(shape)
        assert run_sweep(sweep, tmp_path, workers=1).ran == 2
        run_sweep(sweep, tmp_path, workers=1)  # nothing to redo: the rows are back
        assert _csv(tmp_path) == reference
        h5.write_bytes(data[: len(data) // 2])


def test_points_made_by_other_tierflow_files_are_run_again(tmp_path):
    sweep = parse_sweep(small_sweep(grid={"cache.capacity_experts": [64, 128]}, seed=1))
    run_sweep(sweep, tmp_path, workers=1)
    record_path = points_dir(tmp_path) / f"{sweep.points[1].point_id}.json"
    record = json.loads(record_path.read_text())
    assert len(record["code"]) == 64
    record_path.write_text(json.dumps({**record, "code": "0" * 64}))
    from tierflow.sweep import STALE, point_state

    assert point_state(tmp_path, sweep.points[1].point_id) == STALE
    sweep_file = tmp_path / "s.toml"
    sweep_file.write_text('name = "s"\nscenario = "ssd_offload"\nseed = 1\n[set]\nmodel = "olmoe-1b-7b"\n'
                          'hardware = "h100-pcie5"\ngpus = 1\n"workload.decode_tokens" = 8\n'
                          '[grid]\n"cache.capacity_experts" = [64, 128]\n')
    result = run_tierflow("sweep", sweep_file, "--out", tmp_path, "--workers", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "1 finished point(s)" in result.stderr and "another version of tierflow" in result.stderr
    assert "(1 finished before, 1 run now" in result.stdout
    assert json.loads(record_path.read_text())["code"] == record["code"]


def test_the_trace_enters_a_points_id_by_its_bytes_not_its_path(tmp_path):
    def trace(path, seed):
        rng = np.random.default_rng(seed)
        experts = np.stack([np.stack([rng.choice(64, 8, replace=False) for _ in range(16)]) for _ in range(40)])
        write_trace(path, experts=experts, sequence_id=np.repeat(np.arange(4), 10), model="olmoe-1b-7b",
                    num_experts=64, source="test")
        return path

    one = trace(tmp_path / "a" / "t.h5", 1)
    copy = tmp_path / "b" / "t.h5"
    copy.parent.mkdir()
    copy.write_bytes(one.read_bytes())
    ids = [parse_sweep(small_sweep(grid={"cache.capacity_experts": [64]}, set={**SMALL, "workload": {
        "decode_tokens": 8, "trace": str(path)}})).points[0].point_id for path in (one, copy)]
    assert ids[0] == ids[1]
    trace(one, 2)  # rewritten with other routing: another point
    changed = parse_sweep(small_sweep(grid={"cache.capacity_experts": [64]}, set={**SMALL, "workload": {
        "decode_tokens": 8, "trace": str(one)}})).points[0].point_id
    assert changed != ids[0]


def test_catalog_names_in_any_case_are_the_same_point():
    lower = parse_sweep(small_sweep(grid={"cache.capacity_experts": [64]}))
    upper = parse_sweep(small_sweep(grid={"cache.capacity_experts": [64]},
                                    set={**SMALL, "model": "OLMoE-1B-7B", "hardware": "H100-PCIe5"}))
    assert lower.points[0].point_id == upper.points[0].point_id


def test_a_base_scenarios_relative_trace_is_found_next_to_it(tmp_path):
    experts = np.tile(np.arange(8), (16, 16, 1))
    write_trace(tmp_path / "t.h5", experts=experts, sequence_id=np.repeat(np.arange(2), 8),
                model="olmoe-1b-7b", num_experts=64, source="test")
    (tmp_path / "base.toml").write_text('model = "olmoe-1b-7b"\nhardware = "h100-pcie5"\ngpus = 1\n'
                                        'placement = "ddr"\n[workload]\ntrace = "t.h5"\ndecode_tokens = 4\n')
    sweep = load_sweep(write_sweep(tmp_path / "s.toml", 'scenario = "base.toml"\n[grid]\n'
                                                        '"cache.capacity_experts" = [16, 32]\n'))
    assert {p.scenario_table["workload"]["trace"] for p in sweep.points} == {str(tmp_path / "t.h5")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-m", "tierflow", "sweep", tmp_path / "s.toml", "--out",
                             tmp_path / "out", "--workers", "1", "--quiet"], capture_output=True, text=True,
                            cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert "0 with errors" in result.stdout


def test_sweep_json_is_written_with_the_table_and_report_refuses_a_table_of_another_sweep(tmp_path):
    sweep = parse_sweep(small_sweep(grid={"cache.capacity_experts": [64, 128]}, seed=1))

    def interrupt(done):
        if done:  # a point is saved, its table not yet written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, workers=1, progress=interrupt)
    assert len(list(points_dir(tmp_path).glob("*.json"))) == 1
    assert not (tmp_path / "sweep.json").exists()  # nothing describes a table that does not exist yet
    run_sweep(sweep, tmp_path, workers=1)
    listed = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert listed == [p.point_id for p in sweep.points]
    other = parse_sweep(small_sweep(grid={"cache.capacity_experts": [96]}, seed=1))
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "other", "axes": ["cache.capacity_experts"],
                                                     "points": [p.point_id for p in other.points]}))
    assert_one_line_error(run_tierflow("report", tmp_path, "--out", tmp_path / "r"), "does not list",
                          "rerun `tierflow sweep")


def test_report_on_a_table_without_columns_is_one_error(tmp_path):
    run_sweep(parse_sweep(small_sweep(grid={"cache.capacity_experts": [64]}, seed=1)), tmp_path, workers=1)
    with h5py.File(tmp_path / "results.h5", "w") as f:
        f.create_group("points").attrs["columns"] = "[]"
    assert_one_line_error(run_tierflow("report", tmp_path, "--out", tmp_path / "r"), "no point_id column")


def test_one_sweep_writes_a_folder_at_a_time_and_clears_what_a_killed_one_left(tmp_path):
    import fcntl

    sweep = parse_sweep(small_sweep(grid={"cache.capacity_experts": [64]}, seed=1))
    run_sweep(sweep, tmp_path, workers=1)
    strays = [tmp_path / "results.h5.abcd1234.tmp",
              points_dir(tmp_path) / f"{sweep.points[0].point_id}.json.x_y9z8w7.tmp"]
    for stray in strays:
        stray.write_text("half")
    with open(tmp_path / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another sweep is writing here
        with pytest.raises(TierflowError, match="another tierflow sweep is writing to this folder"):
            run_sweep(sweep, tmp_path, workers=1)
        assert all(stray.exists() for stray in strays)  # its temporary files are its own
    assert run_sweep(sweep, tmp_path, workers=1).skipped == 1
    assert not any(stray.exists() for stray in strays)


def test_the_code_fingerprint_covers_what_makes_figures_and_not_what_presents_them(tmp_path, monkeypatch):
    import shutil

    from tierflow import resources

    package = tmp_path / "tierflow"
    shutil.copytree(Path(resources.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))

    def fingerprint():
        resources.code_fingerprint.cache_clear()
        monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
        return resources.code_fingerprint()

    try:
        before = fingerprint()
        (package / "report.py").write_text((package / "report.py").read_text() + "\\n# a comment\\n")
        assert fingerprint() == before  # presentation only
        (package / "sim" / "engine.py").write_text((package / "sim" / "engine.py").read_text() + "\\n# x\\n")
        assert fingerprint() != before
    finally:
        resources.code_fingerprint.cache_clear()


# ------------------------------------------------------------------------------ inputs named by parameters


def _learned_sweep(weights: Path) -> dict:
    return small_sweep(grid={"cache.capacity_experts": [64, 128]},
                       set={**SMALL, "cache": {"policy": "learned", "params": {"weights": str(weights)}}})


def test_a_file_a_parameter_names_counts_by_its_bytes_in_a_point_id(tmp_path):
    """Retrained weights are another experiment: the points get new ids (a resumed sweep reruns them instead of
    keeping the old weights' figures); the same bytes under another name are the same points."""
    from tierflow.cache.learned import load_scorer

    default = load_scorer()
    weights = tmp_path / "w.npz"
    default.save(weights)
    first = [p.point_id for p in parse_sweep(_learned_sweep(weights)).points]
    copy = tmp_path / "elsewhere.npz"
    copy.write_bytes(weights.read_bytes())
    assert [p.point_id for p in parse_sweep(_learned_sweep(copy)).points] == first
    changed = default.__class__(default.mean, default.scale * 2, default.w1, default.b1, default.w2, default.b2,
                                default.horizons)
    changed.save(weights)
    assert not set(first) & {p.point_id for p in parse_sweep(_learned_sweep(weights)).points}


def test_bad_weights_are_refused_before_any_point_runs(tmp_path):
    """As simulate refuses them at once: a sweep checks the files its points' parameters name before it runs."""
    not_weights = tmp_path / "w.npz"
    not_weights.write_text("not a weights file")
    with pytest.raises(TierflowError, match="not a learned-policy weights file"):
        run_sweep(parse_sweep(_learned_sweep(not_weights)), tmp_path / "out", workers=1)
    assert not points_dir(tmp_path / "out").exists()


@pytest.mark.parametrize(("prefetch", "decode_tokens", "message"), [
    ({"policy": "speculative_gate", "params": {"history": 17}}, 4, "history = 17 exceeds the model's 16 MoE layers"),
    ({"policy": "speculative_gate"}, 1, "watches all 1 decode step"),
    ({"policy": "speculative_gate", "params": {"train_fraction": 0.0}}, 4, "watches no step"),
    ({"policy": "expert_map", "params": {"capacity": 10**11}}, 4, "a store of 100,000,000,000 expert maps would need"),
])
def test_a_prefetcher_the_run_would_refuse_is_refused_before_any_point_runs(tmp_path, prefetch, decode_tokens,
                                                                             message):
    """A prefetcher's checks of the run's shape (layers, decode steps, memory) run in the sweep's pre-check: the
    point after a good one stops the sweep with status 2 before anything runs, as simulate would refuse it."""
    sweep = small_sweep(zips=[{"prefetch.policy": ["none", prefetch["policy"]],
                               "prefetch.params": [{}, prefetch.get("params", {})]}],
                        set={**SMALL, "workload": {"decode_tokens": decode_tokens}})
    with pytest.raises(TierflowError, match=message):
        run_sweep(parse_sweep(sweep), tmp_path / "out", workers=1)
    assert not points_dir(tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- keys and labels


@pytest.mark.parametrize(("document", "fragment"), [
    ({"grid": {"cache.policy": ["lru", "fifo", "lfu"], "cache": {"policy": ["belady"]}}},
     "key 'cache.policy' is set in more than one place"),
    ({"set": {**SMALL, "workload.decode_tokens": 10}},
     "key 'workload.decode_tokens' is set in more than one place"),
    ({"set": {**SMALL, "cache.params.half_life": 5}, "grid": {"cache.params": [{"keep_history": True}, {}]}},
     "key 'cache.params.half_life' is inside 'cache.params'"),
    ({"description": "a\0b"}, "a NUL character is not allowed in the sweep's description"),
    ({"set": {**SMALL, "cache.params.weights": "w\0.npz"}}, "a NUL character is not allowed"),
])
def test_a_key_given_twice_or_text_with_a_nul_is_refused(document, fragment):
    with pytest.raises(TierflowError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        parse_sweep({**small_sweep(), **document})


def test_a_sweep_file_may_start_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'scenario = "ssd_offload"\n[grid]\n"cache.capacity_experts" = [64, 128]\n')
    assert len(load_sweep(path).points) == 2


# ------------------------------------------------------------------------------------ the output folder


def test_only_the_sweeps_own_temporary_files_are_removed(tmp_path):
    out = tmp_path / "out"
    points = points_dir(out)
    points.mkdir(parents=True)
    mine = [out / "notes.tmp", points / "backup.tmp", out / "results.h5.tmp"]
    stray = [out / "results.csv.ab12cd_9.tmp", points / "0123456789ab.h5.zz99yy00.tmp"]
    for path in mine + stray:
        path.write_text("x")
    run_sweep(parse_sweep(small_sweep(grid={"cache.capacity_experts": [64]})), out, workers=1)
    assert all(path.exists() for path in mine) and not any(path.exists() for path in stray)


def test_a_lock_that_is_not_a_file_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    (out / ".lock").mkdir(parents=True)
    sweep = write_sweep(tmp_path / "s.toml", 'scenario = "ssd_offload"\n[grid]\n"cache.capacity_experts" = [1856]\n')
    assert_one_line_error(run_tierflow("sweep", sweep, "--out", out, "--quiet"), ".lock: not a regular file")
    (out / ".lock").rmdir()
    os.mkfifo(out / ".lock")  # opening it to write would wait for a reader forever
    assert_one_line_error(run_tierflow("sweep", sweep, "--out", out, "--quiet"), ".lock: not a regular file")


@pytest.mark.parametrize("command", [["sweep", "SWEEP"], ["report", "DIR"], ["paper"]])
def test_an_empty_output_folder_is_refused(command, tmp_path):
    sweep = write_sweep(tmp_path / "s.toml", 'scenario = "ssd_offload"\n[grid]\n"cache.capacity_experts" = [1856]\n')
    args = [{"SWEEP": sweep, "DIR": tmp_path}.get(a, a) for a in command]
    assert_one_line_error(run_tierflow(*args, "--out", ""), "an empty path; name a folder")


def test_dask_starts_no_more_workers_than_points_to_run(tmp_path, monkeypatch):
    from tierflow import sweep as sweep_module

    started = []

    def fake_dask(todo, workers, scheduler, client=None):
        started.append(workers)
        yield None
        for point in todo:
            yield sweep_module._run_point(point)

    monkeypatch.setattr(sweep_module, "_run_dask", fake_dask)
    run_sweep(parse_sweep(small_sweep()), tmp_path, workers=12, engine="dask")
    assert started == [4]
