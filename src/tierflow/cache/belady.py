"""Belady's MIN: evict the key whose next use is farthest in the future (the offline optimum).

Only offline drivers know the future: they pass each access's next use in ``Access.next_use`` (``NEVER`` when
the key is not accessed again). As in libCacheSim's ``Belady`` (``cache/eviction/Belady.c``) the incoming key is
always admitted and only resident keys are candidates, so this is the bound for caches that admit every miss.
Keys never used again are evicted first (in least-recently-used order, which does not change the hit count).
"""

from __future__ import annotations

from tierflow.cache.base import POLICIES, PriorityPolicy


@POLICIES.register
class Belady(PriorityPolicy):
    """Offline optimum: evict the expert used again farthest in the future (needs the trace's future)."""

    needs_future = True

    name = "belady"

    def priority(self, key, access, hit):
        return -access.next_use
