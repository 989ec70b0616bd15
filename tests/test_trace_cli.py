"""`tierflow trace gen` and `tierflow trace info`: the documented outputs and their closed forms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from tierflow.trace import stats
from tierflow.trace.format import validate_trace, write_trace

INFO_KEYS = ["model", "num_tokens", "num_sequences", "num_layers", "num_experts", "top_k", "source",
             "per_layer_popularity_entropy", "consecutive_token_reuse_rate"]


def test_gen_then_info_json_has_exactly_the_documented_keys(tmp_path):
    out = tmp_path / "t.h5"
    run_cli("trace", "gen", "--model", "qwen3-30b-a3b", "--tokens", "3000", "--sequences", "5", "--seed", "4",
            "--out", out, check_status=0)
    info = json.loads(run_cli("trace", "info", out, "--json", check_status=0).stdout)
    assert list(info) == INFO_KEYS
    assert (info["model"], info["num_tokens"], info["num_sequences"]) == ("qwen3-30b-a3b", 3000, 5)
    assert (info["num_layers"], info["num_experts"], info["top_k"]) == (48, 128, 8)
    assert len(info["per_layer_popularity_entropy"]) == 48
    assert all(0 < h <= 7.0 for h in info["per_layer_popularity_entropy"])
    assert 0 < info["consecutive_token_reuse_rate"] < 1
    text = run_cli("trace", "info", out, check_status=0).stdout
    assert "qwen3-30b-a3b" in text and "3,000" in text


def test_gen_is_deterministic_per_seed(tmp_path):
    paths = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        paths.append(tmp_path / f"{name}.h5")
        run_cli("trace", "gen", "--model", "olmoe-1b-7b", "--tokens", "2000", "--seed", seed, "--out", paths[-1],
                check_status=0)
    import h5py

    data = [h5py.File(p)["experts"][()] for p in paths]
    assert np.array_equal(data[0], data[1]) and not np.array_equal(data[0], data[2])


def test_gen_shows_progress_on_stderr_unless_quiet(tmp_path, monkeypatch):
    """A bar counting tokens on stderr (here for any size), none with --quiet; the file is the same."""
    import h5py
    from click.testing import CliRunner

    from tierflow.cli import cli
    from tierflow.trace import commands

    monkeypatch.setattr(commands, "PROGRESS_MIN_DECISIONS", 0)
    runs = {}
    for name, extra in (("bar", []), ("quiet", ["--quiet"])):
        out = tmp_path / f"{name}.h5"
        runs[name] = CliRunner().invoke(cli, ["trace", "gen", "--model", "olmoe-1b-7b", "--tokens", "700", "--seed",
                                              "3", "--out", str(out), *extra], catch_exceptions=False)
        assert runs[name].exit_code == 0 and runs[name].stdout == ""
    assert "generating olmoe-1b-7b" in runs["bar"].stderr and "generating" not in runs["quiet"].stderr
    with h5py.File(tmp_path / "bar.h5") as a, h5py.File(tmp_path / "quiet.h5") as b:
        assert np.array_equal(a["experts"][()], b["experts"][()])


def test_gen_progress_counts_every_token(tmp_path):
    from tierflow.trace import synth

    calls = []
    synth.generate("olmoe-1b-7b", 1500, tmp_path / "t.h5", sequences=7, seed=2, workers=1, progress=calls.append)
    assert sum(calls) == 1500 and all(c > 0 for c in calls)


def test_gen_overrides_are_applied_and_recorded(tmp_path):
    out = tmp_path / "t.h5"
    run_cli("trace", "gen", "--model", "olmoe-1b-7b", "--tokens", "500", "--set", "reuse=1.0", "--out", out,
            check_status=0)
    meta = validate_trace(out)
    assert "reuse=1.0" in meta.source
    acc, _ = stats.validate_and_accumulate(out)
    assert acc.reuse_rate == pytest.approx(1.0)


@pytest.mark.parametrize("args, fragment", [
    (["--model", "gpt-9", "--tokens", "10"], "valid models"),
    (["--model", "olmoe-1b-7b", "--tokens", "0"], "--tokens"),
    (["--model", "olmoe-1b-7b", "--tokens", "10", "--sequences", "11"], "exceeds"),
    (["--model", "olmoe-1b-7b", "--tokens", "10", "--set", "bogus=1"], "valid: num_topics"),
    (["--model", "olmoe-1b-7b", "--tokens", "10", "--seed", "-1"], "-1 is not in the range x>=0"),
    # Logits over a temperature this small overflow double precision (the gate scores are computed in it).
    (["--model", "mixtral-8x7b", "--tokens", "4", "--set", "gate_temperature=1e-308"], "gate_temperature=1e-308"),
    (["--model", "olmoe-1b-7b", "--tokens", "10", "--set", "gate_temperature=inf"], "must be a finite number"),
    (["--model", "olmoe-1b-7b", "--tokens", "10", "--set", "tokens_per_sequence=5.5"], "is not a whole number"),
    (["--model", "olmoe-1b-7b", "--tokens", "10", "--set", "reuse=abc"], "'abc' is not a number"),
])
def test_gen_bad_input(tmp_path, args, fragment):
    assert_one_line_error(run_cli("trace", "gen", *args, "--out", tmp_path / "t.h5"), fragment)
    assert not (tmp_path / "t.h5").exists()
    assert not list(tmp_path.iterdir())  # no temporary file either


def test_gen_reads_set_values_as_simulate_does():
    """TOML numbers, as `simulate --set` reads them: 5e0 is the whole number 5."""
    from tierflow.trace.synth import SynthParams

    params = SynthParams.for_model("olmoe-1b-7b").with_overrides(["tokens_per_sequence=5e0", "reuse=1"])
    assert (params.tokens_per_sequence, params.reuse) == (5, 1.0)
    assert SynthParams.for_model("olmoe-1b-7b").with_overrides(["reuse=.5"]).reuse == 0.5  # as Python reads it
    assert isinstance(params.tokens_per_sequence, int) and isinstance(params.reuse, float)


def test_gen_help_names_the_generator_parameters():
    text = run_cli("trace", "gen", "--help", check_status=0).stdout
    assert "trace params" not in text
    assert "gate_temperature" in " ".join(text.split())


def test_gen_stopped_by_sigterm_leaves_no_file_and_no_workers(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "big.h5"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    gen = subprocess.Popen([sys.executable, "-m", "tierflow", "trace", "gen", "--model", "olmoe-1b-7b", "--tokens",
                            "400000", "--out", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("big.h5.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("big.h5.*.tmp")), "the temporary file never appeared"
    time.sleep(1.0)  # the worker processes are routing by now
    children = Path(f"/proc/{gen.pid}/task/{gen.pid}/children")
    workers = [int(pid) for pid in children.read_text().split()] if children.exists() else []
    if (os.cpu_count() or 1) > 1:  # one worker process per core; with one core the routing runs inline
        assert workers, "no worker processes to check"
    gen.send_signal(signal.SIGTERM)
    _, stderr = gen.communicate(timeout=60)
    assert gen.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert not list(tmp_path.iterdir())
    time.sleep(0.5)
    for pid in workers:
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "State:\tZ" in status.read_text(), f"worker {pid} still running"


def test_info_statistics_match_a_hand_computed_trace(tmp_path):
    # Two sequences interleaved; one layer, top-2 of 4 experts.
    experts = np.array([[[0, 1]], [[2, 3]], [[1, 2]], [[3, 0]], [[1, 0]]])
    sequence = np.array([0, 1, 0, 1, 0])
    path = tmp_path / "t.h5"
    write_trace(path, experts, sequence, model="m", num_experts=4, source="hand")
    summary = stats.summarize(path)
    # Sequence 0: {0,1} -> {1,2} (1 of 2) -> {1,0} (1 of 2); sequence 1: {2,3} -> {3,0} (1 of 2).
    assert summary["consecutive_token_reuse_rate"] == pytest.approx(3 / 6)
    counts = np.bincount(experts.ravel(), minlength=4)
    p = counts / counts.sum()
    assert summary["per_layer_popularity_entropy"] == [pytest.approx(-(p * np.log2(p)).sum(), abs=1e-6)]
    assert summary["num_sequences"] == 2


def test_reuse_carries_across_chunks():
    acc = stats.RoutingAccumulator(1, 4, 2)
    acc.update(np.array([[[0, 1]]]), np.array([7]))
    acc.update(np.array([[[1, 2]]]), np.array([7]))
    assert acc.reuse_rate == pytest.approx(0.5)


def test_the_pass_keeps_one_row_per_sequence_not_the_blocks_they_came_from():
    """Memory stays bounded: the row kept for each sequence's next token owns its data (a view would hold the
    whole block of rows it came from until the pass ends)."""
    acc = stats.RoutingAccumulator(2, 8, 2)
    rng = np.random.default_rng(0)
    for start in range(0, 4000, 1000):
        rows = np.stack([rng.permutation(8)[:2] for _ in range(2000)]).reshape(1000, 2, 2)
        acc.update(rows, np.arange(start, start + 1000) % 7)
    assert len(acc._last_row) == 7 and all(row.base is None for row, _ in acc._last_row.values())


def test_reuse_pairs_only_tokens_one_position_apart():
    """With token positions, a token whose predecessor is missing (an import dropped it) pairs with nothing,
    within a chunk and across chunks."""
    acc = stats.RoutingAccumulator(1, 4, 2)
    acc.update(np.array([[[0, 1]], [[0, 1]], [[0, 3]]]), np.array([7, 7, 7]), np.array([0, 2, 3]))
    assert acc.reuse_rate == pytest.approx(0.5)  # only 2 -> 3
    acc.update(np.array([[[0, 3]]]), np.array([7]), np.array([5]))
    assert acc.reuse_rate == pytest.approx(0.5)  # 3 -> 5 is no pair
    acc.update(np.array([[[2, 3]]]), np.array([7]), np.array([6]))
    assert acc.reuse_rate == pytest.approx(2 / 4)  # 2 -> 3 and 5 -> 6: one of two experts each


def test_predicted_experts_round_trip_and_bad_ids_are_one_line(tmp_path):
    from tierflow.trace.format import open_trace

    experts = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]]])
    good = tmp_path / "good.h5"
    write_trace(good, experts, [0, 0], model="m", num_experts=4, source="t", predicted_experts=experts[:, ::-1])
    with open_trace(good) as reader:
        assert reader.meta.has_predicted_experts
        (chunk,) = reader.chunks(predicted_experts=True)
        assert np.array_equal(chunk.predicted_experts, experts[:, ::-1])
    bad = tmp_path / "bad.h5"
    write_trace(bad, experts, [0, 0], model="m", num_experts=4, source="t",
                predicted_experts=np.where(experts == 3, 9, experts))
    assert_one_line_error(run_cli("trace", "info", bad), "predicted_experts id 9 outside [0, 4)")


def test_info_of_an_empty_trace_has_no_entropy(tmp_path):
    """No selections, no popularity: null per layer (0 bits would read as every token on one expert), as the
    reuse rate is null; the table says n/a."""
    path = tmp_path / "empty.h5"
    write_trace(path, np.zeros((0, 2, 2), dtype=int), np.zeros(0, dtype=int), model="m", num_experts=4, source="s")
    info = json.loads(run_cli("trace", "info", path, "--json", check_status=0).stdout)
    assert info["per_layer_popularity_entropy"] == [None, None]
    assert info["consecutive_token_reuse_rate"] is None
    assert "popularity entropy    n/a (no tokens)" in run_cli("trace", "info", path, check_status=0).stdout
