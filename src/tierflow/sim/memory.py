"""One GPU's expert memory: its HBM expert cache, an optional DDR expert cache, and the fetch paths below.

Demand lookups pin what a layer uses; misses reserve room in HBM at once (the expert is resident-in-flight
and pinned until it lands) and start a transfer from the highest tier that holds the expert: the DDR cache,
else the placement tier. Prefetches take the same paths at lower priority and only when room can be made
without touching pinned experts. Every delivered byte goes to the ledger here, in one place.
"""

from __future__ import annotations

import attrs

from tierflow.cache import Access
from tierflow.ledger import Ledger, Route
from tierflow.sim.transfer import DEMAND, PREFETCH, Transfer


@attrs.define
class PrefetchStats:
    issued: int = 0
    useful: int = 0  # prefetched experts a layer used before they were evicted
    on_target: int = 0  # ... of which the step they were proposed for used (not a later one)
    late: int = 0  # ... of which were still in flight when their layer needed them
    wasted_bytes: int = 0  # prefetched bytes evicted (or left at the end) without being used
    wasted_by_route: dict = attrs.field(factory=dict)  # Route -> wasted bytes, for their energy

    def waste(self, route: Route, size_bytes: int) -> None:
        self.wasted_bytes += size_bytes
        self.wasted_by_route[route] = self.wasted_by_route.get(route, 0) + size_bytes


@attrs.define
class FetchPath:
    """The channels from a source tier to HBM, and what the route is called in the ledger."""

    hops: list
    route: Route
    staging: object = None  # a StagingBuffer the bytes bounce through, or None


class ExpertMemory:
    """Residency and fetching of one GPU's experts."""

    def __init__(self, calendar, gpu: int, hbm, ddr, paths: dict[str, FetchPath],
                 placement: str, expert_bytes: int, ledger: Ledger, num_layers: int,
                 reserve_bytes: int = 0):
        self.calendar, self.gpu = calendar, gpu  # the Calendar the paths' channels run on
        self.hbm, self.ddr = hbm, ddr
        self.paths = paths  # source tier ("ssd" / "ddr") -> its path into HBM
        # The channel prefetches are read through first (their queue limit applies there).
        self.prefetch_source = paths[placement].hops[0] if placement in paths else None
        # Without GPUDirect Storage, SSD reads wait for staging space before they reach the drive's queue.
        self.prefetch_staging = paths[placement].staging if placement in paths else None
        # With a DDR cache, the experts it holds are read over this channel instead.
        self.ddr_source = paths["ddr"].hops[0] if ddr is not None else None
        self.placement = placement
        self.all_resident = placement == "hbm"  # nothing to look up or move
        self.expert_bytes = expert_bytes
        self.ledger = ledger
        # Prefetches leave this much unpinned room (in a per-layer cache, in each layer's slots), so the next
        # layer's demand misses always fit.
        self.reserve_bytes = reserve_bytes
        self.in_flight: dict[int, Transfer] = {}
        self.prefetch = PrefetchStats()
        # The DDR cache's demand lookups (an HBM demand miss looks there first), for its hit rate: the DDR
        # cache's own counts include prefetches' lookups, which the HBM hit rate leaves out.
        self.ddr_demand_hits = self.ddr_demand_lookups = 0
        self._unused_prefetch: dict[int, Transfer] = {}  # prefetched keys not yet used by a layer
        self.demand_misses = 0
        self.demand_hits = 0
        self.demand_in_flight = 0  # lookups that found their expert on its way (a prefetch not yet landed)
        # Per MoE layer, the demand lookups that found the expert resident, on its way, or missing.
        self.hits_by_layer = [0] * num_layers
        self.in_flight_by_layer = [0] * num_layers
        self.misses_by_layer = [0] * num_layers
        self.peak_cache_bytes = 0
        # Without an HBM cache, an expert streamed in for a layer holds HBM from the moment its copy begins (its
        # first hop starts serving it) until that layer's expert compute ends.
        self.streamed_bytes = self.peak_streamed_bytes = 0
        self.eviction_listeners: list = []  # told the key of every expert evicted from HBM
        # A per-layer cache is one TierCache per layer; prefetch room is checked in the key's own layer.
        # ``resident`` answers "is this key resident or in flight" (``key in memory.resident``), cheaply: the
        # GPU stream asks it of every proposal before anything else.
        parts = getattr(hbm, "caches", [hbm]) if hbm is not None else []
        if len(parts) > 1:
            self._cache_of, self.resident = hbm.cache_of, hbm
        else:  # one cache: its own table answers "is this key resident", asked for every proposal
            only = parts[0] if parts else None
            self._cache_of, self.resident = (lambda key: only), (only.sizes if parts else ())
        for part in parts:
            part.eviction_listeners.append(self._on_hbm_eviction)
        self._reserve = {id(part): expert_bytes + reserve_bytes for part in parts}

    # ------------------------------------------------------------------------------------------- demand

    def demand(self, key: int, access: Access):
        """Make ``key`` resident for the current layer; returns the transfer to wait for, or None if resident."""
        hbm = self.hbm
        if hbm is None:
            if self.all_resident:  # every expert lives in HBM: nothing to look up, nothing moves
                return None
            self.demand_misses += 1  # no cache: stream every expert from its tier, every time
            self.misses_by_layer[access.layer] += 1
            return self._fetch(key, access, DEMAND, into_hbm=False)
        if hbm.lookup(key, access):
            hbm.pin(key)
            transfer = self.in_flight.get(key) if self.in_flight else None
            prefetched = self._unused_prefetch.pop(key, None) if self._unused_prefetch else None
            if prefetched is not None:
                self.prefetch.useful += 1
                self.prefetch.on_target += prefetched.target_step == access.step
                if self.ddr is not None:  # its DDR copy (filled on the way in) is no longer an unused prefetch
                    self.ddr.prefetch_used(key)
                if transfer is not None:
                    self.prefetch.late += 1
                    self._promote(transfer)
            if transfer is None:
                self.demand_hits += 1
                self.hits_by_layer[access.layer] += 1
            else:
                self.demand_in_flight += 1
                self.in_flight_by_layer[access.layer] += 1
            return transfer
        self.demand_misses += 1
        self.misses_by_layer[access.layer] += 1
        self._admit(key, access)
        hbm.pin(key, 2)  # used by this layer, and in flight
        return self._fetch(key, access, DEMAND, into_hbm=True)

    def _admit(self, key: int, access: Access) -> None:
        hbm = self.hbm
        hbm.admit(key, self.expert_bytes, access)
        if hbm.used_bytes > self.peak_cache_bytes:
            self.peak_cache_bytes = hbm.used_bytes

    def release(self, key: int) -> None:
        """The layer that used ``key`` has finished computing with it."""
        if self.hbm is not None:
            self.hbm.unpin(key)
        elif not self.all_resident:
            self.streamed_bytes -= self.expert_bytes

    # ------------------------------------------------------------------------------------------- prefetch

    def prefetch_blocker(self, key: int, max_queued: int) -> str | None:
        """Why a prefetch of ``key`` would not start now, or None if it would: ``"resident"`` (resident or in
        flight already), ``"queue"`` (the source's queue holds ``max_queued`` transfers: prefetches use spare
        bandwidth, they do not pile up in front of demand misses; the queue of the hop the expert would be read
        through first: the host link for an expert in the DDR cache), ``"room"`` (room cannot be made without
        evicting pinned experts) or ``"no cache"`` (no HBM cache to prefetch into)."""
        if self.hbm is None:
            return "no cache"
        if key in self.resident:
            return "resident"
        cache = self._cache_of(key)
        if not cache.can_admit(self._reserve[id(cache)]):
            return "room"
        source, staging = self.prefetch_source, self.prefetch_staging
        if self.ddr is not None and key in self.ddr:  # three tiers: it would come from the DDR cache
            source, staging = self.ddr_source, None
        if source.queued + (staging.waiting if staging is not None else 0) >= max_queued:
            return "queue"
        return None

    def prefetch_now(self, key: int, access: Access, target_step: int | None = None) -> None:
        """Start a prefetch that :meth:`prefetch_blocker` allowed, proposed for step ``target_step`` (default: the
        step deciding it, ``access.step``)."""
        self._admit(key, access)
        self.hbm.pin(key)  # in flight
        transfer = self._fetch(key, access, PREFETCH, into_hbm=True)
        transfer.target_step = access.step if target_step is None else target_step
        self._unused_prefetch[key] = transfer
        self.prefetch.issued += 1

    def _on_hbm_eviction(self, key: int) -> None:
        for listener in self.eviction_listeners:
            listener(key)
        if self._unused_prefetch:
            transfer = self._unused_prefetch.pop(key, None)
            if transfer is not None:
                self.prefetch.waste(self.paths[transfer.src].route, transfer.size_bytes)

    def finish(self) -> None:
        """At the end of the run, transfers still in flight land, and prefetched experts never used count as
        wasted."""
        self.calendar.run()
        for transfer in self._unused_prefetch.values():
            self.prefetch.waste(self.paths[transfer.src].route, transfer.size_bytes)
        self._unused_prefetch.clear()

    # ------------------------------------------------------------------------------------------- transfers

    def _source(self, key: int, access: Access) -> str:
        """The tier a missing expert is read from: the DDR cache if it holds it, else the placement tier."""
        if self.ddr is not None:
            hit = self.ddr.lookup(key, access)
            if not access.prefetch:
                self.ddr_demand_lookups += 1
                self.ddr_demand_hits += hit
            if hit:
                return "ddr"
        return self.placement

    def _fetch(self, key: int, access: Access, priority: int, into_hbm: bool) -> Transfer:
        if self.ddr is None:
            source = self.placement
        else:
            source = self._source(key, access)
            if source == "ssd":
                self._fill_ddr(key, access)
        path = self.paths[source]
        transfer = Transfer(self.calendar, key, self.expert_bytes, source, "hbm", path.hops, priority, gpu=self.gpu,
                            via=path.route.via, on_done=self._arrived if into_hbm else self._streamed)
        if into_hbm:
            self.in_flight[key] = transfer
        else:
            transfer.on_start = self._stream_started
        if path.staging is None:
            path.hops[0].submit(transfer)
        else:
            transfer.staged_bytes = self.expert_bytes
            path.staging.acquire(self.expert_bytes, transfer.start, priority)
        return transfer

    def _stream_started(self, transfer: Transfer) -> None:
        self.streamed_bytes += transfer.size_bytes
        self.peak_streamed_bytes = max(self.peak_streamed_bytes, self.streamed_bytes)

    def _promote(self, transfer: Transfer) -> None:
        """A layer now waits for this prefetch: from here on it moves at demand priority (ahead of queued
        prefetches, no longer pre-empted by demand misses), wherever it is: waiting for staging space, queued
        on a hop, or in service."""
        transfer.priority = DEMAND
        if transfer.staged_bytes and self.paths[transfer.src].staging.promote(transfer):
            return
        if transfer.hop < len(transfer.hops):
            transfer.hops[transfer.hop].promote(transfer)

    def _fill_ddr(self, key: int, access: Access) -> None:
        """Three tiers: an expert read from SSD stays in the DDR cache. It passes through DDR on its way to
        HBM anyway (the SSD route is staged via DDR), so keeping it costs no extra bytes."""
        if self.ddr.can_admit(self.expert_bytes):
            self.ddr.admit(key, self.expert_bytes, access)

    def _delivered(self, transfer: Transfer) -> None:
        path = self.paths[transfer.src]
        if transfer.staged_bytes:
            path.staging.release(transfer.staged_bytes)
        self.ledger.record_transfer(path.route, transfer.size_bytes, transfer.prefetched)

    def _arrived(self, transfer: Transfer) -> None:
        self._delivered(transfer)
        del self.in_flight[transfer.key]
        self.hbm.unpin(transfer.key)

    def _streamed(self, transfer: Transfer) -> None:
        self._delivered(transfer)
