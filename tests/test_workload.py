"""Decode steps from traces: continuous batching, unions, prefill skipping."""

from __future__ import annotations

import numpy as np
import pytest

from tierflow.errors import TierflowError
from tierflow.trace.format import write_trace
from tierflow.workload import build_steps, load_workload, synthetic_workload, uniform_workload


def _sequences(lengths, layers=2, k=2, experts=8):
    rng = np.random.default_rng(0)
    return {
        sid: (np.array([[rng.choice(experts, k, replace=False) for _ in range(layers)] for _ in range(n)]), None)
        for sid, n in enumerate(lengths)
    }


def test_continuous_batching_refills_finished_slots():
    steps = build_steps(_sequences([2, 5, 3]), batch_size=2, num_steps=10)
    # A finished sequence's slot goes to the next one in order.
    assert [s.sequence_ids.tolist() for s in steps] == [[0, 1], [0, 1], [2, 1], [2, 1], [2, 1]]
    assert sum(len(s.sequence_ids) for s in steps) == 10


def test_union_counts_tokens_per_expert():
    rows = {0: (np.array([[[0, 1]]]), np.array([[[0.7, 0.3]]])), 1: (np.array([[[1, 2]]]), np.array([[[0.6, 0.4]]]))}
    (step,) = build_steps(rows, batch_size=2, num_steps=1)
    assert step.experts[0].tolist() == [0, 1, 2]
    assert step.tokens_per_expert[0].tolist() == [1, 2, 1]
    assert step.scores[0].tolist() == pytest.approx([0.7, 0.6, 0.4])


def test_prefill_tokens_are_skipped_and_steps_bounded(tmp_path):
    path = tmp_path / "t.h5"
    experts = np.array([[[0, 1]], [[1, 2]], [[2, 3]], [[3, 0]]])
    write_trace(path, experts, [0, 0, 0, 0], model="m", num_experts=4, source="s",
                phase=np.array([0, 0, 1, 1], dtype=np.uint8))
    workload = load_workload(path, batch_size=1, num_steps=5)
    assert [s.experts[0].tolist() for s in workload.steps] == [[2, 3], [3, 0]]


def test_a_trace_with_nothing_to_decode_is_an_error(tmp_path):
    path = tmp_path / "t.h5"
    write_trace(path, [[[0, 1]]], [0], model="m", num_experts=4, source="s", phase=np.array([0], dtype=np.uint8))
    with pytest.raises(TierflowError):
        load_workload(path, batch_size=1, num_steps=5)


@pytest.mark.parametrize("batch, steps, skip, sequences", [(1, 16, 64, 20), (1, 1, 1, 6), (8, 8, 3, 100),
                                                         (4, 6, 10, 0)])
def test_the_built_in_trace_keeps_the_batch_full_past_skipped_tokens(batch, steps, skip, sequences):
    """Each sequence skips its first ``skip`` tokens: the built-in trace has enough tokens for the skips of all
    its sequences, so every step decodes a full batch, each sequence from its skip on."""
    workload = synthetic_workload("olmoe-1b-7b", batch, steps, sequences, 3, skip)
    assert len(workload.steps) == steps
    assert all(len(step.sequence_ids) == batch for step in workload.steps)
    first = {}
    for step in workload.steps:
        for sequence, position in zip(step.sequence_ids.tolist(), step.positions.tolist(), strict=True):
            first.setdefault(sequence, position)
    assert set(first.values()) == {0}  # positions count from the first decoded token after the skip


def test_a_workload_larger_than_memory_fails_before_allocating():
    with pytest.raises(TierflowError, match="workload.decode_tokens.*more than this machine's"):
        synthetic_workload("deepseek-r1", 1, 10**12, 0, 0)
    with pytest.raises(TierflowError, match="workload.decode_tokens.*more than this machine's"):
        uniform_workload("deepseek-r1", 1, 10**12, 0)


def test_a_trace_with_fewer_sequences_than_the_batch_is_rejected(tmp_path):
    path = tmp_path / "t.h5"
    write_trace(path, np.array([[[0, 1]], [[1, 2]], [[2, 3]]]), [0, 0, 0], model="m", num_experts=4, source="s")
    assert len(load_workload(path, batch_size=1, num_steps=2).steps) == 2
    with pytest.raises(TierflowError, match="workload.batch_size = 4 but the trace has only 1 sequence"):
        load_workload(path, batch_size=4, num_steps=2)


def test_a_long_first_request_does_not_hide_the_others(tmp_path):
    """Reading stops once enough tokens are read, but not before the batch's sequences have begun."""
    path = tmp_path / "t.h5"
    long, short = 200_000, 5
    sequence_ids = np.repeat([0, 1, 2], [long, short, short])
    experts = np.tile(np.array([[[0, 1]], [[2, 3]]]), (len(sequence_ids) // 2 + 1, 1, 1))[: len(sequence_ids)]
    write_trace(path, experts, sequence_ids, model="m", num_experts=4, source="s")
    workload = load_workload(path, batch_size=3, num_steps=2)
    assert sorted(workload.steps[0].sequence_ids.tolist()) == [0, 1, 2]


def test_long_prompts_do_not_cut_the_read_short(tmp_path):
    """The reader stops once it holds enough decode tokens; prefill tokens do not count toward that, so requests
    with long prompts still fill the batch (it used to stop after the first few requests)."""
    path = tmp_path / "prompts.h5"
    sequences, prefill, decode = 12, 35_000, 20
    per = prefill + decode
    rng = np.random.default_rng(1)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(sequences * per)]).reshape(-1, 1, 2)
    phase = np.tile(np.r_[np.zeros(prefill), np.ones(decode)].astype(np.uint8), sequences)
    write_trace(path, experts, np.repeat(np.arange(sequences), per), model="m", num_experts=8, source="s",
                phase=phase)
    workload = load_workload(path, batch_size=4, num_steps=50)
    assert [len(step.sequence_ids) for step in workload.steps] == [4] * 50
    assert workload.tokens == 200


def test_requests_count_as_begun_only_once_they_decode(tmp_path):
    """Two prompts first, then one long answer, then the other: the reader must not take the second request as
    begun from its prompt and stop before its answer (it refused the batch of two)."""
    path = tmp_path / "answers.h5"
    layout = [(0, 0, 10), (1, 0, 10), (0, 1, 140_000), (1, 1, 20)]  # (request, phase, rows) in file order
    rng = np.random.default_rng(2)
    rows = sum(n for _, _, n in layout)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(rows)]).reshape(-1, 1, 2)
    write_trace(path, experts, np.concatenate([[seq] * n for seq, _, n in layout]), model="m", num_experts=8,
                source="s", phase=np.concatenate([[phase] * n for _, phase, n in layout]).astype(np.uint8))
    workload = load_workload(path, batch_size=2, num_steps=5)
    assert [sorted(step.sequence_ids.tolist()) for step in workload.steps] == [[0, 1]] * 5


def test_interleaved_requests_are_read_to_their_end(tmp_path):
    # 2,000 requests of 50 tokens each, logged round-robin (row i belongs to request i mod 2000): the window the
    # reader needs for 60 steps ends long before request 0's last token.
    requests, length = 2000, 50
    rng = np.random.default_rng(0)
    experts = np.stack([rng.permutation(8)[:2] for _ in range(requests * length)])[:, None, :]
    write_trace(tmp_path / "rr.h5", experts, np.tile(np.arange(requests), length), model="m", num_experts=8,
                source="test")
    workload = load_workload(tmp_path / "rr.h5", batch_size=1, num_steps=60)
    runs = [int(step.sequence_ids[0]) for step in workload.steps]
    assert runs == [0] * 50 + [1] * 10


def test_simulate_says_when_the_trace_runs_out(tmp_path):
    import json

    from conftest import run_cli

    experts = np.tile(np.arange(8), (6, 16, 1))
    write_trace(tmp_path / "short.h5", experts, np.zeros(6, dtype=int), model="olmoe-1b-7b", num_experts=64,
                source="test")
    result = run_cli("simulate", "--quiet", "--json", "--trace", tmp_path / "short.h5", "--set", "model=olmoe-1b-7b",
                     "--set", "hardware=h100-pcie5", "--set", "gpus=1", "--set", "workload.decode_tokens=20",
                     check_status=0)
    assert json.loads(result.stdout)["tokens"] == 6
    assert "the trace ran out of sequences after 6 of 20 decode steps" in result.stderr


def test_other_requests_rows_between_a_requests_tokens_do_not_cut_it(tmp_path):
    # 3,000 requests of 30 tokens round-robin, with two chunks (32,768 rows) of another request's prompt logged
    # right after the reader's window (81,920 rows: 27 or 28 tokens of each request): the requests begun before
    # it are still read to their end.
    requests, length, prompt, window = 3000, 30, 32768, 81920
    ids = np.tile(np.arange(requests), length)
    ids = np.concatenate([ids[:window], np.full(prompt, 99999), ids[window:]])
    phase = np.ones(len(ids), dtype=np.uint8)
    phase[window:window + prompt] = 0
    experts = np.tile(np.array([[[0, 1]]]), (len(ids), 1, 1))
    write_trace(tmp_path / "rr.h5", experts, ids, model="m", num_experts=8, source="test", phase=phase)
    workload = load_workload(tmp_path / "rr.h5", batch_size=1, num_steps=60)
    assert [int(step.sequence_ids[0]) for step in workload.steps] == [0] * 30 + [1] * 30


def test_one_long_request_is_read_only_as_far_as_the_run_goes(tmp_path, monkeypatch):
    from tierflow.trace.format import TraceReader

    tokens = 400_000
    write_trace(tmp_path / "one.h5", np.tile(np.array([[[0, 1]]]), (tokens, 1, 1)), np.zeros(tokens, dtype=int),
                model="m", num_experts=8, source="test")
    read = []
    chunks = TraceReader.chunks

    def counted(self, *args, **kwargs):
        for chunk in chunks(self, *args, **kwargs):
            read.append(len(chunk))
            yield chunk

    monkeypatch.setattr(TraceReader, "chunks", counted)
    workload = load_workload(tmp_path / "one.h5", batch_size=1, num_steps=8)
    assert len(workload.steps) == 8 and sum(read) < 2 * 65536 + 2 * 16384
