"""Least frequently used: evict the key with the fewest accesses since it was inserted.

Ties go to the least recently used key, and a key's count starts again at 1 when it is re-inserted: the same
rules as libCacheSim's ``LFU`` (``cache/eviction/LFU.c``: one FIFO list per frequency, appended to on each
access, evicted from the head of the lowest), so hit counts agree with it exactly.
"""

from __future__ import annotations

from tierflow.cache.base import POLICIES, PriorityPolicy


@POLICIES.register
class LFU(PriorityPolicy):
    """Evict the least frequently used expert (ties: least recently used)."""

    name = "lfu"

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self._count: dict = {}

    def priority(self, key, access, hit):
        count = self._count[key] = self._count.get(key, 0) + 1 if hit else 1
        return count

    def on_remove(self, key):
        super().on_remove(key)
        del self._count[key]
