"""Cache-only replay: the request order of the README, next-use links, stack distances against a naive LRU
stack, the LRU fast path and the miss-ratio curve against the access-by-access reference path, both scopes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierflow.errors import TierflowError
from tierflow.replay import (
    Requests,
    ReplayResult,
    lru_hits,
    lru_mrc,
    next_use,
    read_requests,
    replay,
    replay_reference,
    stack_distances,
)
from tierflow.trace.format import DEFAULT_CHUNK_TOKENS, write_trace


def naive_stack_distances(keys):
    """The LRU stack by list: distance = depth of the key below the top (-1 if absent)."""
    stack, out = [], []
    for key in keys:
        if key in stack:
            depth = stack.index(key)
            out.append(depth)
            stack.pop(depth)
        else:
            out.append(-1)
        stack.insert(0, key)
    return out


def test_requests_follow_the_design_order(tmp_path):
    experts = np.array([[[1, 0], [2, 3]], [[0, 2], [3, 1]]])  # (tokens, layers, top_k), 4 experts
    scores = np.array([[[0.6, 0.4], [0.7, 0.3]], [[0.5, 0.5], [0.9, 0.1]]], dtype=np.float32)
    path = tmp_path / "t.h5"
    write_trace(path, experts, [0, 1], model="m", num_experts=4, source="test", gate_scores=scores)
    requests = read_requests(path)
    assert requests.keys.tolist() == [1, 0, 6, 7, 0, 2, 7, 5]  # token, then layer, then stored order
    assert requests.steps.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert requests.sequences.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # each access's request
    assert requests.layers.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    np.testing.assert_allclose(requests.scores, scores.ravel(), rtol=1e-3)  # stored as float16
    assert len(read_requests(path, max_tokens=1)) == 4


def test_next_use_links_each_access_to_the_next_of_its_key():
    assert next_use(np.array([5, 3, 5, 5, 3, 9])).tolist() == [2, 4, 3, -1, -1, -1]


@given(st.lists(st.integers(0, 40), max_size=2500))
def test_stack_distances_equal_a_naive_lru_stack(keys):
    assert stack_distances(np.array(keys, dtype=np.int64)).tolist() == naive_stack_distances(keys)


def test_stack_distances_across_many_blocks():
    """Long streams cross many 1024-access blocks, with reuses both inside and across them."""
    rng = np.random.default_rng(2)
    for universe in (3, 70, 900, 5000):
        keys = (rng.zipf(1.2, 7000) % universe).astype(np.int64)
        assert stack_distances(keys).tolist() == naive_stack_distances(keys.tolist())


def test_cyclic_closed_form():
    # Cycling through n keys: every reuse has distance n - 1, so LRU hits nothing below n and all at n.
    keys = np.tile(np.arange(50), 30)
    distances = stack_distances(keys)
    assert (distances[:50] == -1).all() and (distances[50:] == 49).all()
    requests = Requests.from_keys(keys)
    assert lru_hits(requests, [49, 50]) == [0, len(keys) - 50]


def synthetic_requests(tokens=120, layers=4, experts=8, top_k=2, seed=0):
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(experts, 0.5), layers)
    rows = np.array([[rng.choice(experts, top_k, replace=False, p=popularity[layer]) for layer in range(layers)]
                     for _ in range(tokens)])
    return Requests.from_experts(rows, experts, rng.random(rows.shape))


@pytest.mark.parametrize("scope, capacities", [("global", [2, 5, 11, 32]), ("per-layer", [2, 3, 5, 8])])
def test_lru_fast_path_equals_the_reference(scope, capacities):
    requests = synthetic_requests()
    fast = replay(requests, "lru", capacities, scope)
    reference = replay(requests, "lru", capacities, scope, fast=False)
    assert fast == reference
    assert [r.hits for r in fast] == [replay_reference(requests, "lru", c, scope) for c in capacities]


@given(budgets=st.lists(st.integers(2, 8), min_size=4, max_size=4), seed=st.integers(0, 50))
def test_per_layer_budgets_fast_path_equals_the_reference(budgets, seed):
    requests = synthetic_requests(tokens=40, seed=seed)
    fast = replay(requests, "lru", [budgets], "per-layer")[0]
    assert fast.capacity == tuple(budgets)
    assert fast.hits == replay_reference(requests, "lru", budgets, "per-layer")


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_mrc_is_lru_at_every_capacity(scope):
    requests = synthetic_requests(tokens=60)
    capacities, hits = lru_mrc(requests, scope)
    assert capacities[0] == requests.top_k
    keys = np.unique(requests.keys)
    largest = len(keys) if scope == "global" else np.bincount(keys // requests.num_experts).max()
    assert capacities[-1] == largest  # every key fits: further capacities add nothing
    assert (np.diff(hits) >= 0).all()  # LRU is a stack algorithm: more room never loses a hit
    assert hits.tolist() == lru_hits(requests, capacities.tolist(), scope)
    for capacity in (capacities[0], capacities[len(capacities) // 2], capacities[-1]):
        assert hits[capacity - capacities[0]] == replay_reference(requests, "lru", int(capacity), scope)


def test_belady_bounds_every_policy_at_every_capacity():
    requests = synthetic_requests(tokens=80, seed=4)
    for capacity in (3, 8, 16):
        bound = replay(requests, "belady", [capacity])[0].hits
        for policy in ("lru", "fifo", "lfu", "lfu_aging", "finemoe", "learned"):
            assert replay(requests, policy, [capacity])[0].hits <= bound


def test_result_json_has_exactly_the_agreed_keys():
    result = ReplayResult("lru", 4, "global", 10, 7)
    assert result.to_json() == {"policy": "lru", "capacity": 4, "scope": "global", "requests": 10, "hits": 7,
                                "misses": 3, "hit_rate": 0.7}


@pytest.mark.parametrize("capacity, message", [(0, "positive integer"), (-2, "positive integer"),
                                               (1, "smaller than top_k=2"), (2.5, "positive integer")])
def test_bad_capacities_are_errors(capacity, message):
    with pytest.raises(TierflowError, match=message):
        replay(synthetic_requests(tokens=5), "lru", [capacity])


def test_unknown_policy_and_scope_list_the_valid_ones():
    requests = synthetic_requests(tokens=5)
    with pytest.raises(TierflowError, match="valid: belady, fifo"):
        replay(requests, "arc", [4])
    with pytest.raises(TierflowError, match="valid: global, per-layer"):
        replay(requests, "lru", [4], scope="tiered")


def test_replay_numbers_tokens_across_read_chunks(tmp_path):
    tokens = DEFAULT_CHUNK_TOKENS + 100
    experts = (np.arange(tokens) % 4).reshape(tokens, 1, 1)
    path = tmp_path / "long.h5"
    write_trace(path, experts, np.zeros(tokens, dtype=int), model="m", num_experts=4, source="test")
    assert read_requests(path).steps.tolist() == list(range(tokens))


def test_only_an_offline_policy_is_told_when_a_key_is_used_next(tmp_path, monkeypatch):
    """Replay hands each access's next use to the offline bound alone; every online policy sees NEVER, so none
    can read the future by accident (Belady sees the true next uses)."""
    import tierflow.replay as replay_module
    from tierflow.cache import NEVER, POLICIES

    experts = np.random.default_rng(4).integers(0, 4, size=(40, 3, 1))
    path = tmp_path / "t.h5"
    write_trace(path, experts, np.zeros(40, np.int64), model="m", num_experts=4, source="test")
    requests = read_requests(path)
    truth = [NEVER if n < 0 else n for n in next_use(requests.keys).tolist()]
    make = replay_module.make_expert_cache
    for policy in POLICIES.names():
        seen = []

        def spy(*args, **kwargs):
            cache = make(*args, **kwargs)
            lookup = cache.lookup

            def record(key, access):
                seen.append(access.next_use)
                return lookup(key, access)

            cache.lookup = record
            return cache

        monkeypatch.setattr(replay_module, "make_expert_cache", spy)
        replay_reference(requests, policy, 4)
        assert seen == (truth if POLICIES.get(policy).needs_future else [NEVER] * len(truth)), policy
