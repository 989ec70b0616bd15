"""LFU with aging: each past access counts ``2 ** (-age / half_life)``, so old popularity fades.

A key's score at time ``t`` is ``sum_j 2 ** (-(t - t_j) / half_life)`` over its accesses ``t_j`` (in decode
steps). Every score decays by the same factor as time passes, so their order never changes between accesses:
the policy stores ``log2`` of the score at a fixed reference time and keeps keys in a heap. Ties go to the least
recently used key. With ``keep_history`` the score of an evicted key is remembered, so a popular expert that
was squeezed out comes back with its popularity (the expert set of a model is small enough to remember).
"""

from __future__ import annotations

import math

import attrs

from tierflow.cache.base import POLICIES, PriorityPolicy
from tierflow.registry import positive


@attrs.frozen
class LFUAgingParams:
    half_life: float = attrs.field(default=64.0, converter=float, validator=positive,
                                   metadata={"help": "decode steps after which an access counts half"})
    keep_history: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool),
                                     metadata={"help": "remember the scores of evicted experts"})


@POLICIES.register
class LFUAging(PriorityPolicy):
    """Evict the expert with the lowest exponentially decayed access count (ties: least recently used)."""

    name = "lfu_aging"
    Params = LFUAgingParams

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self._log_score: dict = {}  # key -> log2(sum_j 2 ** (t_j / half_life))

    def priority(self, key, access, hit):
        now = self.steps(access) / self.params.half_life
        old = self._log_score.get(key)
        if old is None:
            new = now
        elif old == now:  # two equal terms (also both infinite: a half-life so short that the steps over it
            # overflow, where only the latest access counts and ties go to the least recently used key)
            new = now + 1.0
        else:  # log2(2 ** old + 2 ** now) without overflow
            high, low = (old, now) if old > now else (now, old)
            new = high + math.log2(1.0 + 2.0 ** (low - high))
        self._log_score[key] = new
        return new

    def on_remove(self, key):
        super().on_remove(key)
        if not self.params.keep_history:
            del self._log_score[key]
