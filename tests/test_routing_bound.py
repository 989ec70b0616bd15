"""scripts/routing_bound.py: the rebuilt generator is the trace's, the pattern oracle recovers each token's hidden
routing pattern and what it proposes is used as often as that pattern says, and the bound it gives sits between no prefetching and
the true future."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from tierflow.catalog import get_model
from tierflow.errors import TierflowError
from tierflow.prefetch.base import PrefetchContext, RoutingEvent
from tierflow.trace.format import open_trace, write_trace
from tierflow.trace.synth import SynthParams, generate, generate_arrays

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "routing_bound.py"
sys.path.insert(0, str(_PATH.parent))  # the script imports its sibling prefetch_table
_spec = importlib.util.spec_from_file_location("routing_bound", _PATH)
bound = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bound)

TOKENS, SEED = 600, 4


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A DeepSeek-R1 trace file, its hidden states (regenerated in memory with the same seed), and the generator
    tables rebuilt from the file."""
    path = tmp_path_factory.mktemp("bound") / "deepseek.h5"
    generate("deepseek-r1", TOKENS, path, seed=SEED, workers=1)
    spec = get_model("deepseek-r1")
    hidden = generate_arrays(spec.num_moe_layers, spec.num_routed_experts, spec.top_k, TOKENS, seed=SEED,
                             params=SynthParams.for_model(spec.name), with_states=True)
    with open_trace(path) as reader:
        experts = np.concatenate([chunk.experts for chunk in reader.chunks()])
    np.testing.assert_array_equal(experts, hidden["experts"])  # the file is that routing
    return path, hidden, bound.rebuild_generator(str(path))


@pytest.fixture
def oracle(deepseek):
    """A pattern oracle over the trace at batch 1, one decode step per token."""
    _, hidden, generator = deepseek
    bound._GENERATOR.clear()
    bound._GENERATOR.update(generator)
    steps = [SimpleNamespace(rows=hidden["experts"][t][None], sequence_ids=hidden["sequence_id"][t:t + 1])
             for t in range(TOKENS)]
    spec = get_model("deepseek-r1")
    context = PrefetchContext(spec.num_moe_layers, spec.num_routed_experts, spec.top_k, lookahead=2,
                              budget_experts=8, workload=SimpleNamespace(steps=steps))
    return lambda threshold: bound.PatternOracle(bound.PatternOracle.Params(threshold), context)


def test_rebuild_refuses_a_trace_it_did_not_generate(tmp_path):
    same = tmp_path / "same.h5"
    generate("deepseek-r1", 50, same, seed=SEED, workers=1)
    assert bound.rebuild_generator(str(same))["top_k"] == 8  # a generated trace: its tables are rebuilt
    mixtral = tmp_path / "mixtral.h5"
    generate("mixtral-8x7b", 50, mixtral, seed=SEED, workers=1)
    with pytest.raises(TierflowError, match="does not reproduce"):  # another model's routing
        bound.rebuild_generator(str(mixtral))
    with h5py.File(same, "r+") as f:  # its source names another seed than the one that generated it
        f.attrs["source"] = f.attrs["source"].replace(f"seed={SEED}", f"seed={SEED + 1}")
    with pytest.raises(TierflowError, match="does not reproduce"):
        bound.rebuild_generator(str(same))
    imported = tmp_path / "imported.h5"
    write_trace(imported, np.zeros((2, 58, 8), dtype=int) + np.arange(8), np.zeros(2, dtype=int),
                model="deepseek-r1", num_experts=256, source="imported from a serving log")
    with pytest.raises(TierflowError, match="not a tierflow synthetic trace"):
        bound.rebuild_generator(str(imported))


def test_each_tokens_pattern_is_recovered(deepseek, oracle):
    _, hidden, generator = deepseek
    states = hidden["state"]
    assert (states == states[:, :1]).all()  # fine-grained profile: one state per token, at every layer
    truth = generator["topics"][hidden["sequence_id"]] * generator["states"] + states[:, 0]
    prefetcher = oracle(0.3)
    recovered = np.array([prefetcher._step_blocks(t)[0] for t in range(TOKENS)])
    assert (recovered == truth).mean() >= 0.95


def test_proposals_are_used_as_often_as_the_pattern_says(deepseek, oracle):
    """Over many tokens, the experts proposed at a threshold are used at least that often, more often at a higher
    threshold, and about as often as the pattern predicts (to within the copies of the previous token's experts,
    which take a share ``reuse`` of a token's slots: the prediction counts k fresh draws)."""
    _, hidden, _ = deepseek
    experts = hidden["experts"]
    precision = {}
    for threshold in (0.5, 0.15):
        prefetcher = oracle(threshold)
        used = proposed = 0
        predicted = 0.0
        for t in range(0, TOKENS, 3):
            for layer in range(0, experts.shape[1] - 2, 5):
                event = RoutingEvent(t, layer, experts[t, layer], np.ones(8), experts[t, layer][None], np.zeros(1))
                blocks = prefetcher._step_blocks(t)
                for target, expert in prefetcher.on_routing(event):
                    p = prefetcher._p[target, blocks, expert]
                    predicted += float(1.0 - np.prod((1.0 - p) ** prefetcher._k))
                    used += int(expert in experts[t, target])
                    proposed += 1
        assert proposed > 200
        precision[threshold] = used / proposed
        assert precision[threshold] >= threshold
        assert predicted / proposed == pytest.approx(precision[threshold], abs=0.1)
    assert precision[0.5] > precision[0.15] + 0.1


def test_bound_sits_between_none_and_the_true_future(deepseek, capsys):
    path = deepseek[0]
    rows = bound.main([str(path), "--steps", "48", "--thresholds", "0.15", "--oracle-accuracy", "1.0"])
    by_name = {row["prefetcher"].split()[0]: row for row in rows}
    assert set(by_name) == {"none", "oracle", "pattern_oracle"}
    none, oracle, pattern = by_name["none"], by_name["oracle"], by_name["pattern_oracle"]
    assert oracle["accuracy"] == pytest.approx(1.0)
    assert oracle["stall_s_per_token"] < pattern["stall_s_per_token"] < none["stall_s_per_token"]
    assert 0.0 < pattern["coverage"] < oracle["coverage"]
    assert "pattern_oracle" in capsys.readouterr().out
