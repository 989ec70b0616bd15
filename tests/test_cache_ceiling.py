"""scripts/cache_ceiling.py: the informed policy's probabilities match the generator, and it beats LRU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
