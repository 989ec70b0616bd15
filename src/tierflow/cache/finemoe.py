"""FineMoE-style eviction (fMoE): evict the expert with the lowest router probability x visit count, and
protect experts that were prefetched but not yet used.

A key's value is ``visits * probability``: how often it was routed to (kept across evictions: the expert set
is small) times its router weight, smoothed over its visits (``Access.score``; traces without router weights
give every visit the weight 1, which reduces the rule to LFU with history). A key inserted by a prefetch
(``Access.prefetch``) is protected until its first demand hit (in a DDR cache behind HBM: until the expert is
first used from HBM, which the DDR cache hears of through ``on_prefetch_used``): protected keys are evicted only when no
unprotected key is evictable. A prefetch is not a routing: it adds no visit and no weight, and one that finds
its key resident changes nothing. Ties go to the least recently used key.
"""

from __future__ import annotations

import attrs

from tierflow.cache.base import POLICIES, PriorityPolicy


def _unit(instance, attribute, value):
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value}")


@attrs.frozen
class FineMoEParams:
    smoothing: float = attrs.field(default=0.25, converter=float, validator=_unit,
                                   metadata={"help": "weight of the newest router probability in its running mean"})


@POLICIES.register
class FineMoE(PriorityPolicy):
    """Evict the expert with the lowest router probability x visit count; prefetched experts are protected."""

    name = "finemoe"
    Params = FineMoEParams

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self._visits: dict = {}
        self._probability: dict = {}
        self._protected: set = set()

    def on_hit(self, key, access):
        if not access.prefetch:  # a prefetch finding its key resident changes nothing, recency included
            super().on_hit(key, access)

    def priority(self, key, access, hit):
        if access.prefetch:  # an insertion (see on_hit)
            self._protected.add(key)
            return (True, self._visits.get(key, 0) * self._probability.get(key, 1.0))
        probability = access.score if self.context.router_scores else 1.0
        old = self._probability.get(key)
        alpha = self.params.smoothing
        probability = self._probability[key] = probability if old is None else old + alpha * (probability - old)
        self._visits[key] = self._visits.get(key, 0) + 1
        if hit:
            self._protected.discard(key)
        return (key in self._protected, self._visits[key] * probability)

    def on_prefetch_used(self, key):
        """The prefetched expert was used from the faster tier: it is no longer an unused prefetch here either
        (its value is unchanged: this cache saw no routing to it)."""
        if key in self._protected:
            self._protected.discard(key)
            self._reprioritise(key, (False, self._visits.get(key, 0) * self._probability.get(key, 1.0)))

    def on_remove(self, key):
        super().on_remove(key)
        self._protected.discard(key)
