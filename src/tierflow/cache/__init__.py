"""Expert caches: one mechanism (:class:`TierCache`) and pluggable eviction policies, one per module.

Importing this package registers every built-in policy in :data:`POLICIES`.
"""

from tierflow.cache import lru  # noqa: F401  (registers the policy)
from tierflow.cache.base import (
    NEVER,
    POLICIES,
    Access,
    CacheContext,
    CacheFullError,
    CacheStats,
    Policy,
    TierCache,
    make_policy,
)

__all__ = [
    "NEVER", "POLICIES", "Access", "CacheContext", "CacheFullError", "CacheStats", "Policy", "TierCache",
    "make_policy",
]
