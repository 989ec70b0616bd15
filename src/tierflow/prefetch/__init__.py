"""Prefetchers: one registry, one module per prefetcher. Importing this package registers them all."""

from tierflow.prefetch import none, previous_token, transition  # noqa: F401  (registers the prefetchers)
from tierflow.prefetch.base import PREFETCHERS, PrefetchContext, Prefetcher, RoutingEvent, make_prefetcher

__all__ = ["PREFETCHERS", "PrefetchContext", "Prefetcher", "RoutingEvent", "make_prefetcher"]
