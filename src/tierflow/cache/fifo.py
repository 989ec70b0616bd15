"""First in, first out: evict the key inserted longest ago; hits do not change the order."""

from __future__ import annotations

from tierflow.cache.base import POLICIES, QueuePolicy


@POLICIES.register
class FIFO(QueuePolicy):
    """Evict the expert that was loaded longest ago, whatever its use since."""

    name = "fifo"
