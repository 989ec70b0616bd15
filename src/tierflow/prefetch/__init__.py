"""Prefetchers: one registry, one module per prefetcher. Importing this package registers them all."""

from tierflow.prefetch import (  # noqa: F401  (registers the prefetchers)
    expert_map, none, oracle, previous_token, speculative_gate, transition,
)
from tierflow.prefetch.base import (
    PREFETCHERS, DemandEvent, PrefetchContext, Prefetcher, RoutingEvent, make_prefetcher,
)

__all__ = ["PREFETCHERS", "DemandEvent", "PrefetchContext", "Prefetcher", "RoutingEvent", "make_prefetcher"]
