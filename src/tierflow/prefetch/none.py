"""No prefetching: every expert not resident is a demand miss."""

from tierflow.prefetch.base import PREFETCHERS, Prefetcher


@PREFETCHERS.register
class NoPrefetch(Prefetcher):
    """Never prefetch."""

    name = "none"

    def on_routing(self, event):
        return []
