"""Least recently used: evict the key whose last access is oldest."""

from __future__ import annotations

from collections import OrderedDict

from tierflow.cache.base import POLICIES, Policy


@POLICIES.register
class LRU(Policy):
    """Evict the least recently used expert."""

    name = "lru"

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self._order: OrderedDict = OrderedDict()  # oldest first

    def on_insert(self, key, access):
        self._order[key] = None

    def on_hit(self, key, access):
        self._order.move_to_end(key)

    def on_remove(self, key):
        del self._order[key]

    def victim(self, evictable, access):
        for key in self._order:
            if evictable(key):
                return key
        return None
