"""Expert caches: one mechanism (:class:`TierCache`) and pluggable eviction policies, one per module.

Importing this package registers every built-in policy in :data:`POLICIES`.
"""

from tierflow.cache import belady, fifo, finemoe, learned, lfu, lfu_aging, lru  # noqa: F401  (they register)
from tierflow.cache.base import (
    NEVER,
    POLICIES,
    Access,
    CacheContext,
    CacheFullError,
    CacheStats,
    Policy,
    PriorityPolicy,
    QueuePolicy,
    TierCache,
    make_policy,
)
from tierflow.cache.scope import SCOPES, LayeredCache, make_expert_cache

__all__ = [
    "NEVER", "POLICIES", "SCOPES", "Access", "CacheContext", "CacheFullError", "CacheStats", "LayeredCache",
    "Policy", "PriorityPolicy", "QueuePolicy", "TierCache", "make_expert_cache", "make_policy",
]
