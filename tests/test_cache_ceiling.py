"""scripts/cache_ceiling.py: the informed policy's probabilities match the generator, and it beats LRU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import attrs
import numpy as np
import pytest

from tierflow.replay import lru_hits

_PATH = Path(__file__).resolve().parent.parent / "scripts" / "cache_ceiling.py"
_spec = importlib.util.spec_from_file_location("cache_ceiling", _PATH)
ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ceiling)


def test_inclusion_probabilities_sum_to_top_k():
    p = np.random.default_rng(0).dirichlet(np.full(64, 0.3), 5)
    pi = ceiling.inclusion(p, 8)
    np.testing.assert_allclose(pi.sum(axis=1), 8.0, rtol=1e-9)
    assert (pi >= np.minimum(p, 1.0) - 1e-12).all() and (pi <= 1.0).all()


@pytest.fixture(scope="module")
def olmoe():
    hidden = ceiling.regenerate("olmoe-1b-7b", 600, 5)
    return hidden, ceiling.Oracle(hidden, max_visits=16)


def test_oracle_probabilities_match_the_generated_routing(olmoe):
    hidden, oracle = olmoe
    predicted, observed = ceiling.calibration(hidden, oracle, sample=3000)
    assert predicted == pytest.approx(observed, abs=0.03)


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_informed_policy_beats_lru(olmoe, scope):
    hidden, oracle = olmoe
    requests = hidden.requests
    capacity = 0.25 * requests.num_experts * (requests.num_layers if scope == "global" else 1)
    capacity = int(capacity)
    informed = ceiling.informed_hits(requests, oracle, "h4", capacity, scope)
    assert informed > lru_hits(requests, [capacity], scope)[0]


def test_side_by_side_survival_is_the_one_request_survival_for_a_single_request():
    """With one request, the engine order is the generated order: the product over requests has one factor, and
    it must equal the one-at-a-time survival at every row, layer and horizon inside the request."""
    single = ceiling.regenerate("olmoe-1b-7b", 120, 8)
    assert len(np.unique(single.sequence_id)) == 1
    side_by_side = ceiling.Oracle(attrs.evolve(single, interleave=4), max_visits=8)
    alone = ceiling.Oracle(single, max_visits=8)
    E, L = alone.num_experts, alone.num_layers
    keys = np.random.default_rng(1).choice(L * E, 300, replace=False)
    layer, expert = keys // E, keys % E
    used = (single.experts[:, layer, :] == expert[None, :, None]).any(axis=2)  # (tokens, keys)
    for row in (5, 40, 90):
        for current_layer in (0, 7, L - 1):
            # Each key's last use as a replay would have seen it: this row's layers up to the current one are done.
            seen = used[:row + 1].copy()
            seen[row] &= layer <= current_layer
            last = np.where(seen.any(axis=0), row - np.argmax(seen[::-1], axis=0), -1000)
            for visits in (1, 4, 8):
                for slots_left in (None, 3):
                    np.testing.assert_allclose(
                        side_by_side.survival(keys, last, row, current_layer, visits, slots_left),
                        alone.survival(keys, last, row, current_layer, visits, slots_left), rtol=1e-5)


def test_informed_policy_beats_lru_with_requests_side_by_side():
    hidden = ceiling.regenerate("olmoe-1b-7b", 600, 5, interleave=4)
    oracle = ceiling.Oracle(hidden, max_visits=16)
    requests = hidden.requests
    assert requests.sequences[:: requests.num_layers * requests.top_k][:4].tolist() == [0, 1, 0, 1]
    capacity = requests.num_layers * requests.num_experts // 4
    informed = ceiling.informed_hits(requests, oracle, "h4", capacity, "global")
    assert informed > 1.05 * lru_hits(requests, [capacity], "global")[0]
