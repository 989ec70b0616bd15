"""Cache scopes for expert caches: one pool for all layers, or fixed slots per layer.

``global``
    One :class:`TierCache` holds experts of every layer; a layer's experts compete with all others.
``per-layer``
    One :class:`TierCache` per MoE layer with its own budget (the same for every layer, or one per layer);
    an expert only ever displaces an expert of its own layer.

Keys are object ids ``layer * num_experts + expert``, so a :class:`LayeredCache` routes a key to its layer's
cache by ``key // num_experts``. Both scopes offer what a driver uses (``lookup``, ``admit``, ``pin``, ``unpin``,
``evict``, ``stats``, ``in``), so replay need not know which it has; room is per layer, so ``can_admit`` takes
the key as well, and the simulator's memory asks each layer's cache (``cache_of``) for room and residency.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from tierflow.cache.base import CacheContext, CacheStats, TierCache, make_policy
from tierflow.config import SCOPES
from tierflow.errors import TierflowError


class LayeredCache:
    """Per-layer scope: one :class:`TierCache` per layer, with the interface of a single one."""

    def __init__(self, caches: Sequence[TierCache], num_experts: int):
        self.caches, self.num_experts = list(caches), num_experts
        self.name = "per-layer"

    def cache_of(self, key) -> TierCache:
        return self.caches[key // self.num_experts]

    def __contains__(self, key) -> bool:
        return key in self.cache_of(key)

    def __len__(self) -> int:
        return sum(len(cache) for cache in self.caches)

    def keys(self):
        return [key for cache in self.caches for key in cache.keys()]

    @property
    def capacity_bytes(self) -> int:
        return sum(cache.capacity_bytes for cache in self.caches)

    @property
    def used_bytes(self) -> int:
        return sum(cache.used_bytes for cache in self.caches)

    @property
    def stats(self) -> CacheStats:
        """Totals over the layers (a fresh record: per-layer counts stay in each cache's own ``stats``)."""
        total = CacheStats()
        for cache in self.caches:
            for field in ("hits", "misses", "insertions", "evictions"):
                setattr(total, field, getattr(total, field) + getattr(cache.stats, field))
        return total

    def lookup(self, key, access) -> bool:
        return self.cache_of(key).lookup(key, access)

    def prefetch_used(self, key) -> None:
        self.cache_of(key).prefetch_used(key)

    def can_admit(self, key, size_bytes: int) -> bool:
        return self.cache_of(key).can_admit(size_bytes)

    def admit(self, key, size_bytes: int, access) -> list:
        return self.cache_of(key).admit(key, size_bytes, access)

    def evict(self, key) -> None:
        self.cache_of(key).evict(key)

    def discard(self, key) -> None:
        self.cache_of(key).discard(key)

    def pin(self, key, times: int = 1) -> None:
        self.cache_of(key).pin(key, times)

    def unpin(self, key) -> None:
        self.cache_of(key).unpin(key)

    def is_pinned(self, key) -> bool:
        return self.cache_of(key).is_pinned(key)

    def check_valid(self) -> None:
        for layer, cache in enumerate(self.caches):
            cache.check_valid()
            assert all(key // self.num_experts == layer for key in cache.keys()), "a key is in another layer's cache"


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise TierflowError(f"unknown cache scope {scope!r}; valid: {', '.join(SCOPES)}")
    return scope


def layer_budgets(capacity: int | Sequence[int], num_layers: int) -> list[int]:
    """Slots per layer: one number for every layer, or a list with one budget per layer."""
    if isinstance(capacity, numbers.Integral):
        return [int(capacity)] * num_layers
    budgets = [int(b) for b in capacity]
    if len(budgets) != num_layers:
        raise TierflowError(f"per-layer budgets: got {len(budgets)} for {num_layers} layers")
    return budgets


def make_expert_cache(policy: str, scope: str, capacity: int | Sequence[int], *, num_layers: int,
                      num_experts: int, top_k: int = 1, expert_bytes: int = 1, params: dict | None = None,
                      name: str = "cache", router_scores: bool = True) -> TierCache | LayeredCache:
    """An expert cache of the given scope, holding ``capacity`` experts of ``expert_bytes`` each.

    ``capacity`` counts experts: the whole pool for ``global``; slots per layer for ``per-layer``, either one
    number for every layer or a list with one budget per layer. ``params`` are the policy's parameters;
    ``router_scores``: whether accesses will carry router weights (False: the trace has none).
    """
    check_scope(scope)
    if scope == "global":
        if not isinstance(capacity, numbers.Integral):
            raise TierflowError("a global cache takes one capacity, not per-layer budgets")
        capacity = int(capacity)
        context = CacheContext(capacity, num_layers, num_experts, top_k, router_scores=router_scores)
        return TierCache(make_policy(policy, params, context), capacity * expert_bytes, name)
    caches = []
    for layer, budget in enumerate(layer_budgets(capacity, num_layers)):
        context = CacheContext(budget, num_layers, num_experts, top_k, pool_layers=1, router_scores=router_scores)
        caches.append(TierCache(make_policy(policy, params, context), budget * expert_bytes, f"{name}[layer {layer}]"))
    return LayeredCache(caches, num_experts)
