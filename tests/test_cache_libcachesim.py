"""Independent cross-check: hit counts of lru, fifo, lfu and belady equal libCacheSim's (its PyPI package,
object size 1) exactly, on hypothesis-generated request streams and capacities.

libCacheSim is driven request by request through ``cache.get``; for Belady each request carries the index of
the key's next request in ``next_access_vtime`` (INT64_MAX when there is none), which is how its
``Belady.c`` learns the future. Our numbers come from both replay paths: the reference (TierCache, access by
access) and, for lru, the stack-distance fast path.
"""

from __future__ import annotations

import libcachesim  # the test extra's independent implementation: missing, it is a failure, not a skip
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tierflow.replay import Requests, next_use, replay, replay_reference

INT64_MAX = 2**63 - 1
LIBCACHESIM = {"lru": "LRU", "fifo": "FIFO", "lfu": "LFU", "belady": "Belady"}


def libcachesim_hits(policy: str, keys: list[int], capacity: int) -> int:
    cache = getattr(libcachesim, LIBCACHESIM[policy])(capacity, hashpower=10)
    following = next_use(np.array(keys))
    hits = 0
    for time, key in enumerate(keys):
        # obj_id 0 is reserved in some libCacheSim code paths: shift ids by one.
        request = libcachesim.Request(obj_size=1, obj_id=key + 1, clock_time=time,
                                      next_access_vtime=INT64_MAX if following[time] < 0 else int(following[time]))
        hits += bool(cache.get(request))
    return hits


streams = st.lists(st.integers(0, 24), min_size=1, max_size=400)
# Skewed streams too: a few hot keys among many cold ones make the policies disagree more often.
skewed = st.lists(st.one_of(st.integers(0, 3), st.integers(0, 60)), min_size=1, max_size=400)


@pytest.mark.parametrize("policy", sorted(LIBCACHESIM))
@given(keys=st.one_of(streams, skewed), capacity=st.integers(1, 30))
def test_hits_equal_libcachesim(policy, keys, capacity):
    requests = Requests.from_keys(keys)
    expected = libcachesim_hits(policy, keys, capacity)
    assert replay_reference(requests, policy, capacity) == expected
    assert replay(requests, policy, [capacity])[0].hits == expected


def test_the_cross_check_is_not_vacuous():
    """On one stream the four policies give four different hit counts, so agreeing means something."""
    rng = np.random.default_rng(11)
    keys = (rng.zipf(1.3, 3000) % 80).tolist()
    counts = {policy: libcachesim_hits(policy, keys, 12) for policy in LIBCACHESIM}
    assert len(set(counts.values())) == 4, counts
    assert counts["belady"] == max(counts.values())
    for policy, hits in counts.items():
        assert replay_reference(Requests.from_keys(keys), policy, 12) == hits
