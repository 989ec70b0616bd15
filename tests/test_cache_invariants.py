"""The cache mechanism's invariants under every registered policy, as a hypothesis state machine against a
shadow model (after hypothesis' own tests/nocover/test_cache_implementation.py).

The shadow knows which keys are resident, their sizes and their pins, but not the eviction order: that is the
policy's business. Whatever the policy picks, the mechanism must keep occupancy within capacity, hit exactly
when a key is resident, hold no duplicates, never evict a pinned key, forget evicted keys, account bytes as the
sum of resident sizes, and refuse (with a clear error, evicting nothing) an admission that pinned keys block, an
object larger than the capacity, a key already resident, and an eviction of a pinned key. Both scopes: one pool
of 10 bytes, or two layers of 5 bytes each (a key only ever displaces keys of its own layer).
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tierflow.cache import NEVER, POLICIES, Access, CacheContext, CacheFullError, TierCache, make_policy
from tierflow.cache.scope import make_expert_cache

CAPACITY_BYTES = 10
NUM_EXPERTS = 6
KEYS = st.integers(0, 2 * NUM_EXPERTS - 1)  # two layers of six experts


def machine_for(policy_name: str, scope: str):
    per_layer = scope == "per-layer"
    capacity = CAPACITY_BYTES // 2 if per_layer else CAPACITY_BYTES  # bytes of the pool a key competes in

    class CacheMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            if per_layer:
                self.cache = make_expert_cache(policy_name, scope, capacity, num_layers=2, num_experts=NUM_EXPERTS,
                                               top_k=2)
                self.parts = self.cache.caches
            else:
                context = CacheContext(CAPACITY_BYTES, num_layers=2, num_experts=NUM_EXPERTS, top_k=2)
                self.cache = TierCache(make_policy(policy_name, None, context), CAPACITY_BYTES)
                self.parts = [self.cache]
            self.resident: dict[int, int] = {}  # shadow: key -> size
            self.pins: dict[int, int] = {}
            self.time = 0
            self.evicted: list[int] = []
            for part in self.parts:
                part.eviction_listeners.append(self._heard_eviction)

        def _same_pool(self, key):
            """The resident keys that share a pool with ``key`` (its layer's, per layer)."""
            return [k for k in self.resident if not per_layer or k // NUM_EXPERTS == key // NUM_EXPERTS]

        def _heard_eviction(self, key):
            assert key not in self.pins, f"pinned key {key} was evicted"
            self.evicted.append(key)

        def _access(self, key, score, gap, prefetch):
            self.time += 1
            return Access(key, self.time, layer=key // NUM_EXPERTS, score=score,
                          next_use=NEVER if gap is None else self.time + gap, prefetch=prefetch, step=self.time // 3)

        def _sizes(self):
            return {k: v for part in self.parts for k, v in part.sizes.items()}

        @rule(key=KEYS, size=st.integers(1, 4) | st.just(capacity + 1), score=st.floats(0.0, 1.0),
              gap=st.none() | st.integers(1, 40), prefetch=st.booleans())
        def access(self, key, size, score, gap, prefetch):
            access = self._access(key, score, gap, prefetch)
            hit = self.cache.lookup(key, access)
            assert hit == (key in self.resident)
            if hit:
                return
            pool = self._same_pool(key)
            pinned = sum(self.resident[k] for k in pool if k in self.pins)
            if pinned + size > capacity:
                before = dict(self.resident)
                with pytest.raises(CacheFullError, match="pinned|cannot fit"):
                    self.cache.admit(key, size, access)
                assert self._sizes() == before, "a refused admission changed the cache"
                return
            self.evicted.clear()
            returned = self.cache.admit(key, size, access)
            assert returned == self.evicted
            victim_sizes = []
            for victim in returned:
                assert victim in pool and victim not in self.pins  # never pinned, never another layer's
                victim_sizes.append(self.resident.pop(victim))
                assert victim not in self.cache
            if returned:  # the loop evicts only while it must: without the last victim there was no room
                assert sum(self.resident[k] for k in self._same_pool(key)) + victim_sizes[-1] + size > capacity
            self.resident[key] = size

        @rule(key=KEYS)
        def prefetch_used(self, key):  # a faster tier used a prefetched key: it may reorder, never remove
            self.cache.prefetch_used(key)

        @precondition(lambda self: bool(self.resident))
        @rule(data=st.data())
        def admit_a_resident_key(self, data):
            key = data.draw(st.sampled_from(sorted(self.resident)))
            with pytest.raises(ValueError, match="already resident"):
                self.cache.admit(key, 1, self._access(key, 0.5, None, False))

        @precondition(lambda self: bool(self.resident))
        @rule(data=st.data())
        def evict(self, data):
            key = data.draw(st.sampled_from(sorted(self.resident)))
            self.evicted.clear()
            if key in self.pins:
                with pytest.raises(ValueError, match="pinned"):
                    self.cache.evict(key)
                return
            self.cache.evict(key)
            assert self.evicted == [key] and key not in self.cache
            del self.resident[key]

        @precondition(lambda self: any(k not in self.pins for k in self.resident))
        @rule(data=st.data())
        def pin(self, data):
            key = data.draw(st.sampled_from(sorted(self.resident)))
            self.cache.pin(key)
            self.pins[key] = self.pins.get(key, 0) + 1

        @precondition(lambda self: bool(self.pins))
        @rule(data=st.data())
        def unpin(self, data):
            key = data.draw(st.sampled_from(sorted(self.pins)))
            self.cache.unpin(key)
            self.pins[key] -= 1
            if not self.pins[key]:
                del self.pins[key]

        @precondition(lambda self: any(k not in self.pins for k in self.resident))
        @rule(data=st.data())
        def discard(self, data):
            key = data.draw(st.sampled_from(sorted(k for k in self.resident if k not in self.pins)))
            self.cache.discard(key)
            del self.resident[key]

        @invariant()
        def matches_the_shadow(self):
            self.cache.check_valid()  # bytes = sum of sizes, pins resident, the policy orders exactly these keys
            keys = self.cache.keys()
            assert len(self.cache) == len(list(keys)) == len(set(keys)) == len(self.resident)
            assert self._sizes() == self.resident
            assert self.cache.used_bytes == sum(self.resident.values())
            assert {k: c for part in self.parts for k, c in part.pins.items()} == self.pins
            for part in self.parts:
                assert part.used_bytes <= capacity
                ordered = part.policy.ordered_keys()
                if ordered is not None:  # a list: a key the policy ordered twice would show
                    assert sorted(list(ordered)) == sorted(part.sizes)

    CacheMachine.__name__ = f"CacheMachine_{policy_name}_{scope}"
    return CacheMachine


@pytest.mark.parametrize("scope", ["global", "per-layer"])
@pytest.mark.parametrize("policy_name", POLICIES.names())
def test_cache_invariants_hold_under_every_policy(policy_name, scope):
    run_state_machine_as_test(machine_for(policy_name, scope),
                              settings=settings(max_examples=40, stateful_step_count=40, deadline=None))
