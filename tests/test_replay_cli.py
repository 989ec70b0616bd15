"""``tierflow replay``, ``tierflow plugins`` and ``tierflow train-policy`` end to end, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from tierflow.replay import Requests, lru_hits, replay
from tierflow.trace.format import write_trace
from tierflow.trace.synth import generate_arrays

NUM_LAYERS, NUM_EXPERTS, TOP_K, TOKENS = 4, 16, 2, 300


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    arrays = generate_arrays(NUM_LAYERS, NUM_EXPERTS, TOP_K, TOKENS, seed=3)
    path = tmp_path_factory.mktemp("replay") / "small.h5"
    write_trace(path, arrays["experts"], arrays["sequence_id"], model="test", num_experts=NUM_EXPERTS,
                source="test", gate_scores=arrays["gate_scores"])
    return path, Requests.from_experts(arrays["experts"], NUM_EXPERTS, arrays["gate_scores"])


def replay_json(*args):
    result = run_cli("replay", *args, "--json", check_status=0)
    return json.loads(result.stdout)


def test_replay_json_is_one_object_per_capacity_with_the_agreed_keys(trace):
    path, requests = trace
    rows = replay_json(path, "--policy", "lfu", "--capacity", "4,16,40")
    assert [set(row) for row in rows] == [{"policy", "capacity", "scope", "requests", "hits", "misses",
                                           "hit_rate"}] * 3
    assert [row["capacity"] for row in rows] == [4, 16, 40]
    expected = replay(requests, "lfu", [4, 16, 40])
    for row, result in zip(rows, expected, strict=True):
        assert (row["policy"], row["scope"], row["requests"]) == ("lfu", "global", TOKENS * NUM_LAYERS * TOP_K)
        assert row["hits"] == result.hits and row["hits"] + row["misses"] == row["requests"]
        assert row["hit_rate"] == pytest.approx(row["hits"] / row["requests"])


def test_replay_per_layer_scope_and_parameters(trace):
    path, requests = trace
    rows = replay_json(path, "--policy", "lfu_aging", "--param", "half_life=8", "--param", "keep_history=false",
                       "--capacity", "3", "--scope", "per-layer")
    expected = replay(requests, "lfu_aging", [3], "per-layer", {"half_life": 8, "keep_history": False})
    assert rows[0]["hits"] == expected[0].hits and rows[0]["scope"] == "per-layer"


def test_layer_slots_give_each_layer_its_own_budget(trace):
    """``--layer-slots``: one replay with a budget per layer. LRU's hits equal per-layer LRU caches written out
    here; the list with one number repeated is ``--capacity`` at per-layer scope."""
    from collections import OrderedDict

    path, requests = trace
    budgets = [2, 5, 3, 9]
    (row,) = replay_json(path, "--scope", "per-layer", "--layer-slots", ",".join(map(str, budgets)))
    assert row["capacity"] == budgets and row["scope"] == "per-layer"
    caches, hits = [OrderedDict() for _ in budgets], 0
    for key in requests.keys.tolist():
        layer = key // NUM_EXPERTS
        cache = caches[layer]
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            if len(cache) == budgets[layer]:
                cache.popitem(last=False)
            cache[key] = True
    assert row["hits"] == hits
    for policy in ("lfu", "belady"):
        (same,) = replay_json(path, "--policy", policy, "--scope", "per-layer", "--layer-slots", "4,4,4,4")
        (even,) = replay_json(path, "--policy", policy, "--scope", "per-layer", "--capacity", "4")
        assert same["hits"] == even["hits"]
    table = run_cli("replay", path, "--scope", "per-layer", "--layer-slots", "2,5,3,9", check_status=0).stdout
    assert table.splitlines()[1].split()[:3] == ["lru", "per-layer", "2,5,3,9"]


def test_replay_text_table(trace):
    path, _ = trace
    result = run_cli("replay", path, "--capacity", "8", "--tokens", "10", check_status=0)
    header, row = result.stdout.strip().splitlines()
    assert header.split() == ["policy", "scope", "capacity", "requests", "hits", "misses", "hit_rate"]
    assert row.split()[:4] == ["lru", "global", "8", str(10 * NUM_LAYERS * TOP_K)]


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_mrc_reports_lru_at_every_capacity(trace, scope):
    path, requests = trace
    rows = replay_json(path, "--mrc", "--scope", scope)
    capacities = [row["capacity"] for row in rows]
    assert capacities == list(range(TOP_K, capacities[-1] + 1))
    assert {row["policy"] for row in rows} == {"lru"}
    assert [row["hits"] for row in rows] == lru_hits(requests, capacities, scope)


def test_plugins_lists_every_policy_with_its_parameters():
    text = run_cli("plugins", check_status=0).stdout
    for name in ("lru", "fifo", "lfu", "lfu_aging", "learned", "finemoe", "belady"):
        assert f"  {name} " in text
    assert "half_life=64.0" in text
    listing = json.loads(run_cli("plugins", "--json", check_status=0).stdout)
    policies = {row["name"]: row for row in listing["cache_policies"]}
    assert [p["name"] for p in policies["lfu_aging"]["params"]] == ["half_life", "keep_history"]
    assert policies["lru"]["params"] == []
    assert [p["name"] for p in policies["learned"]["params"]] == ["weights", "horizon", "rerank_every"]


@pytest.mark.parametrize("args, fragments", [
    (["--policy", "mru", "--capacity", "4"], ["unknown cache policy 'mru'", "valid: belady, fifo, finemoe"]),
    (["--scope", "tiered", "--capacity", "4"], ["unknown cache scope 'tiered'", "valid: global, per-layer"]),
    (["--capacity", "0"], ["'0' is not a positive integer"]),
    (["--capacity", "-3"], ["'-3' is not a positive integer"]),
    (["--capacity", "4,x"], ["'x' is not a positive integer"]),
    (["--capacity", "2.5"], ["'2.5' is not a positive integer"]),
    (["--capacity", str(2**63), "--scope", "per-layer"], [f"{2**63} is too large"]),
    (["--capacity", "1"], ["capacity 1 is smaller than top_k=2"]),
    (["--capacity", "1", "--scope", "per-layer"], ["smaller than top_k=2", "slots per layer"]),
    ([], ["--capacity is required"]),
    (["--layer-slots", "4,4,4,4"], ["--layer-slots needs --scope per-layer"]),
    (["--scope", "per-layer", "--layer-slots", "4,4"], ["per-layer budgets: got 2 for 4 layers"]),
    (["--scope", "per-layer", "--layer-slots", "4,4,4,1"], ["capacity 1 is smaller than top_k=2"]),
    (["--scope", "per-layer", "--layer-slots", "4,4,4,x"], ["--layer-slots: 'x' is not a positive integer"]),
    (["--scope", "per-layer", "--layer-slots", "4,4,4,4", "--capacity", "4"], ["leave out --capacity and --mrc"]),
    (["--mrc", "--policy", "lfu"], ["--mrc computes LRU's curve"]),
    (["--policy", "lfu_aging", "--param", "halflife=3", "--capacity", "4"], ["unknown parameter(s) halflife",
                                                                             "valid: half_life, keep_history"]),
    (["--policy", "lfu_aging", "--param", "half_life=-1", "--capacity", "4"], ["half_life must be > 0"]),
    (["--policy", "lru", "--param", "foo=1", "--capacity", "4"], ["unknown parameter(s) foo; it takes no parameters"]),
    (["--policy", "learned", "--param", f"weights={Path(__file__).resolve().parents[1] / 'README.md'}",
      "--capacity", "4"],
     ["not a learned-policy weights file (an .npz archive train-policy writes)"]),
])
def test_bad_input_is_one_line_and_status_2(trace, args, fragments):
    path, _ = trace
    assert_one_line_error(run_cli("replay", path, *args), *fragments)


def test_missing_trace_is_one_line_error(tmp_path):
    assert_one_line_error(run_cli("replay", tmp_path / "nope.h5", "--capacity", "4"), "no such file")


def test_train_policy_writes_weights_the_learned_policy_uses(trace, tmp_path):
    path, requests = trace
    out = tmp_path / "weights.npz"
    result = run_cli("train-policy", path, "--out", out, "--epochs", "2", "--fractions", "0.1,0.3", "--seed", "4",
                     "--rounds", "2", check_status=0)
    assert "examples" in result.stderr and "2 round(s)" in result.stderr and out.exists()
    with np.load(out) as weights:
        assert weights["w1"].shape[1] == 32 and str(weights["sources"][0]) == "small.h5"
        assert int(weights["rounds"]) == 2 and weights["w2"].shape == (32, len(weights["horizons"]))
    rows = replay_json(path, "--policy", "learned", "--param", f"weights={out}", "--capacity", "20")
    assert rows[0]["hits"] == replay(requests, "learned", [20], params={"weights": str(out)})[0].hits
    again = tmp_path / "again.npz"
    run_cli("train-policy", path, "--out", again, "--epochs", "2", "--fractions", "0.1,0.3", "--seed", "4",
            "--rounds", "2", check_status=0)
    with np.load(out) as first, np.load(again) as second:
        np.testing.assert_array_equal(first["w1"], second["w1"])  # same seed, same weights


def test_train_policy_notes_a_trace_given_twice(trace, tmp_path):
    """The same file twice (here once through a symbolic link) trains on its examples twice: allowed, with a note."""
    path, _ = trace
    link = tmp_path / "link.h5"
    link.symlink_to(path)
    args = ("--out", tmp_path / "w.npz", "--epochs", "1", "--fractions", "0.3", "--rounds", "1")
    twice = run_cli("train-policy", path, link, *args, check_status=0).stderr
    assert f"tierflow: note: {path} is given 2 times" in twice
    assert "tierflow: note" not in run_cli("train-policy", path, *args, check_status=0).stderr


def test_train_policy_bad_fractions(trace, tmp_path):
    path, _ = trace
    assert_one_line_error(run_cli("train-policy", path, "--out", tmp_path / "w.npz", "--fractions", "0.1,2"),
                          "each must be in (0, 1)")


def _bad_values_trace(path):
    """A trace whose token 1 names expert 3 twice at layer 0: `replay` counted it as a hit before."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs.update(format="tierflow-trace", version=1, model="test", num_layers=1, num_experts=4, top_k=2,
                       source="test")
        f["experts"] = np.array([[[0, 1]], [[3, 3]]], dtype=np.uint8)
        f["sequence_id"] = np.zeros(2, dtype=np.int64)
    return path


@pytest.mark.parametrize("command", [["replay", "--capacity", "3"], ["replay", "--capacity", "3", "--json"],
                                     ["train-policy", "--epochs", "1"]])
def test_trace_values_are_checked_by_every_command(tmp_path, command):
    path = _bad_values_trace(tmp_path / "bad.h5")
    args = [command[0], path, *command[1:]]
    if command[0] == "train-policy":
        args += ["--out", tmp_path / "w.npz"]
    assert_one_line_error(run_cli(*args), str(path), "expert repeated within token 1, layer 0: [3, 3]")


def test_no_requests_has_no_hit_rate(tmp_path):
    path = tmp_path / "empty.h5"
    write_trace(path, np.zeros((0, NUM_LAYERS, TOP_K), dtype=int), np.zeros(0, dtype=int), model="test",
                num_experts=NUM_EXPERTS, source="test")
    [row] = replay_json(path, "--capacity", "4")
    assert row["requests"] == 0 and row["hit_rate"] is None
    table = run_cli("replay", path, "--capacity", "4", check_status=0).stdout
    assert table.splitlines()[1].split()[-1] == "n/a"


def test_decode_only_replays_the_rows_the_simulator_replays(tmp_path):
    # Prefill row [0, 1], then decode rows [2, 3] and [0, 1]: every row gives 6 requests with 2 hits (a cache of
    # 4 holds all four experts); the decode rows alone give 4 requests and none hits.
    experts = np.array([[[0, 1]], [[2, 3]], [[0, 1]]])
    path = tmp_path / "phase.h5"
    write_trace(path, experts, np.zeros(3, dtype=int), model="test", num_experts=4, source="test",
                phase=np.array([0, 1, 1], dtype=np.uint8))
    every = replay_json(path, "--capacity", "4")[0]
    decode = replay_json(path, "--capacity", "4", "--decode-only")[0]
    assert (every["requests"], every["hits"]) == (6, 2)
    assert (decode["requests"], decode["hits"]) == (4, 0)


# ------------------------------------------------------------------------------------------------ progress

def _invoke(monkeypatch, *args):
    """The CLI in this process, with a progress bar for replays of any length (not only a million accesses)."""
    from click.testing import CliRunner

    from tierflow.cache import commands
    from tierflow.cli import cli

    monkeypatch.setattr(commands, "PROGRESS_MIN_ACCESSES", 0)
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_a_long_replay_shows_progress_on_stderr_only(trace, monkeypatch):
    path, requests = trace
    result = _invoke(monkeypatch, "replay", path, "--policy", "lfu", "--capacity", "4,16", "--json")
    assert result.exit_code == 0 and "replaying lfu" in result.stderr
    assert [row["hits"] for row in json.loads(result.stdout)] == [r.hits for r in replay(requests, "lfu", [4, 16])]
    quiet = _invoke(monkeypatch, "replay", path, "--policy", "lfu", "--capacity", "4,16", "--json", "--quiet")
    assert quiet.stderr == "" and quiet.stdout == result.stdout
    fast = _invoke(monkeypatch, "replay", path, "--policy", "lru", "--capacity", "4,16")  # one vectorised pass
    assert fast.exit_code == 0 and fast.stderr == ""


def test_train_policy_shows_progress_unless_quiet(trace, monkeypatch, tmp_path):
    path, _ = trace
    args = ("train-policy", path, "--epochs", "1", "--fractions", "0.1,0.3")
    result = _invoke(monkeypatch, *args, "--out", tmp_path / "a.npz")
    assert result.exit_code == 0 and "sampling evictions" in result.stderr
    quiet = _invoke(monkeypatch, *args, "--out", tmp_path / "b.npz", "--quiet")
    assert quiet.exit_code == 0 and "sampling evictions" not in quiet.stderr and "examples" in quiet.stderr


@pytest.mark.parametrize(("policy", "scope", "capacity"), [("lfu", "global", 8), ("learned", "per-layer", 3)])
def test_replay_progress_counts_every_access_once(trace, policy, scope, capacity, monkeypatch):
    """The callback hears of every access of every capacity, in chunks of PROGRESS_EVERY, and the hits are the
    ones a replay without progress counts."""
    from tierflow import replay as replay_module

    _, requests = trace
    monkeypatch.setattr(replay_module, "PROGRESS_EVERY", 1000)  # the trace's 2,400 accesses: chunks 1000, 1000, 400
    calls = []
    results = replay(requests, policy, [capacity, 2 * capacity], scope, progress=calls.append)
    assert calls == [1000, 1000, 400] * 2
    assert [r.hits for r in results] == [r.hits for r in replay(requests, policy, [capacity, 2 * capacity], scope)]


def test_training_progress_counts_the_accesses_it_replays(trace, tmp_path):
    from tierflow.cache import training

    _, requests = trace
    fractions = (0.1, 0.3, 1.0)  # a whole pool never evicts and is not replayed: two runs a scope
    calls = []
    training.train([requests], tmp_path / "w.npz", capacity_fractions=fractions, rounds=2, later_tokens=100,
                   epochs=1, progress=calls.append)
    expected = 2 * 2 * len(requests) + 2 * 2 * 100 * NUM_LAYERS * TOP_K  # round 2 replays the first 100 tokens
    assert sum(calls) == expected == training.training_accesses([requests], fractions, 2, later_tokens=100)


def test_a_replay_larger_than_memory_is_refused_before_reading(trace, monkeypatch):
    """Replay holds every access in memory (REPLAY_BYTES_PER_ACCESS each at its peak): a trace that cannot fit
    is a one-line error naming --tokens, not a MemoryError after minutes."""
    from tierflow import workload
    from tierflow.errors import TierflowError
    from tierflow.replay import REPLAY_BYTES_PER_ACCESS, read_requests

    path, _ = trace
    accesses = TOKENS * NUM_LAYERS * TOP_K
    monkeypatch.setattr(workload, "physical_memory_bytes", lambda: accesses * REPLAY_BYTES_PER_ACCESS - 1)
    with pytest.raises(TierflowError, match=f"--tokens: replaying {TOKENS} tokens x {NUM_LAYERS} layers"):
        read_requests(path)
    assert len(read_requests(path, max_tokens=TOKENS - 1)) == (TOKENS - 1) * NUM_LAYERS * TOP_K
    with pytest.raises(TierflowError, match="--tokens: replaying 300 decode tokens \\(so far\\)"):
        read_requests(path, decode_only=True)  # no phase column: every row is a decode row


def test_decode_only_counts_only_the_decode_rows_against_memory(tmp_path, monkeypatch):
    """A trace of long prompts: the decode rows a --decode-only replay keeps fit, though all rows would not."""
    from tierflow import workload
    from tierflow.replay import REPLAY_BYTES_PER_ACCESS, read_requests

    arrays = generate_arrays(NUM_LAYERS, NUM_EXPERTS, TOP_K, TOKENS, seed=3)
    phase = (np.arange(TOKENS) >= TOKENS - 10).astype(np.uint8)  # 290 prefill rows, then 10 decode rows
    path = tmp_path / "prompts.h5"
    write_trace(path, arrays["experts"], arrays["sequence_id"], model="test", num_experts=NUM_EXPERTS,
                source="test", phase=phase)
    room = 50 * NUM_LAYERS * TOP_K * REPLAY_BYTES_PER_ACCESS
    monkeypatch.setattr(workload, "physical_memory_bytes", lambda: room)
    assert len(read_requests(path, decode_only=True)) == 10 * NUM_LAYERS * TOP_K


def test_interleave_replays_requests_side_by_side(tmp_path):
    """``--interleave N``: the trace's requests (stored one after another) met as N decoding side by side:
    each request's tokens in their order, N requests open while enough are left, and replay and train-policy
    take that stream; a trace whose requests already interleave is refused."""
    arrays = generate_arrays(NUM_LAYERS, NUM_EXPERTS, TOP_K, 200, num_sequences=7, seed=5)
    path = tmp_path / "requests.h5"
    write_trace(path, arrays["experts"], arrays["sequence_id"], model="test", num_experts=NUM_EXPERTS,
                source="test", gate_scores=arrays["gate_scores"])
    stored = Requests.from_experts(arrays["experts"], NUM_EXPERTS, arrays["gate_scores"],
                                   sequence_id=arrays["sequence_id"])
    served = stored.interleaved(3)
    per_token = NUM_LAYERS * TOP_K
    order = served.sequences[::per_token]
    assert len(set(order[:3].tolist())) == 3
    for sequence in np.unique(arrays["sequence_id"]):
        np.testing.assert_array_equal(served.keys.reshape(-1, per_token)[order == sequence],
                                      stored.keys.reshape(-1, per_token)[arrays["sequence_id"] == sequence])
    rows = replay_json(path, "--capacity", "8,20", "--interleave", "3")
    assert [row["hits"] for row in rows] == [r.hits for r in replay(served, "lru", [8, 20])]
    assert rows != replay_json(path, "--capacity", "8,20")
    run_cli("train-policy", path, "--out", tmp_path / "w.npz", "--epochs", "1", "--interleave", "3", "--quiet",
            check_status=0)
    mixed = tmp_path / "mixed.h5"
    write_trace(mixed, arrays["experts"], np.arange(200) % 4, model="test", num_experts=NUM_EXPERTS, source="test")
    for command in (("replay", mixed, "--capacity", "8"), ("train-policy", mixed, "--out", tmp_path / "x.npz")):
        assert_one_line_error(run_cli(*command, "--interleave", "2"), "does not store each request's tokens "
                              "together (sequence 0 comes back after others)")
