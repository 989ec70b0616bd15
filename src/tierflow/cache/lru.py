"""Least recently used: evict the key whose last access is oldest."""

from __future__ import annotations

from tierflow.cache.base import POLICIES, QueuePolicy


@POLICIES.register
class LRU(QueuePolicy):
    """Evict the least recently used expert."""

    name = "lru"

    def on_hit(self, key, access):
        self._queue.move_to_end(key)
