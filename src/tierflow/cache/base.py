"""The cache mechanism: :class:`TierCache` owns capacity, bytes, pinning and the admit/evict loop; a
:class:`Policy` only decides eviction order.

Keys are object ids (``layer * num_experts + expert`` for expert caches). A policy sees each insertion, hit
and removal through hooks and, when the cache needs room, names a victim among the keys the cache says are
evictable (resident and not pinned). Policies that need more than the key (the layer being computed, a router
score, the next use for the offline bound) read it from the :class:`Access` record passed with each event.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable
from typing import ClassVar

import attrs

from tierflow.errors import TierflowError
from tierflow.registry import NoParams, Registry

NEVER = float("inf")  # next_use of a key that is not accessed again


class CacheFullError(TierflowError):
    """Admission needs room but every resident key is pinned (in use or in flight)."""


class Access:
    """What is known about one access (or insertion) of a key.

    ``time`` increases with every access (the replay position; the simulator's lookups of one layer share the
    position a one-token-per-step replay would be at, :func:`tierflow.sim.gpu.access_time`);
    ``layer`` is the MoE layer the key belongs to; ``score`` the router's weight for it (0 when unknown);
    ``next_use`` the ``time`` of the key's next access (``NEVER`` if none; only offline drivers know it);
    ``prefetch`` is true when the insertion is speculative rather than demanded; ``current_layer`` is the
    layer being computed when the event happens; ``step`` the decode step (token) the access belongs to, or
    None when the driver does not say (policies then measure time in ``time`` units only); ``sequence`` the
    request (the trace's sequence id) the access serves, or None when unknown or when it serves several.

    Drivers may reuse one record for many events: a policy copies what it keeps and never holds the record.
    """

    __slots__ = ("key", "time", "layer", "score", "next_use", "prefetch", "current_layer", "step", "sequence")

    def __init__(self, key, time, layer=0, score=0.0, next_use=NEVER, prefetch=False, current_layer=None,
                 step=None, sequence=None):
        self.key, self.time, self.layer, self.score = key, time, layer, score
        self.next_use, self.prefetch = next_use, prefetch
        self.current_layer = layer if current_layer is None else current_layer
        self.step, self.sequence = step, sequence


@attrs.frozen
class CacheContext:
    """What a policy may know about the cache it orders (given once, at construction)."""

    capacity_items: int
    num_layers: int = 1
    num_experts: int = 1
    top_k: int = 1
    # MoE layers whose experts share this cache: num_layers for a global pool, 1 for a per-layer cache
    # (0: all num_layers). A cache serves pool_layers * top_k requests per decode step.
    pool_layers: int = 0
    # Whether accesses carry the trace's router weights (Access.score); False: the trace has none (scores 0).
    router_scores: bool = True

    @property
    def requests_per_step(self) -> int:
        """Expert requests this cache serves in one decode step (one token's activations in its layers)."""
        return (self.pool_layers or self.num_layers) * self.top_k


class Policy:
    """Eviction order for one cache. Subclasses implement the four hooks; the cache does the rest.

    Most policies derive from one of the two orderings below rather than from this class directly:
    :class:`QueuePolicy` (a queue the hooks reorder: LRU, FIFO) or :class:`PriorityPolicy` (a priority computed
    at each access: LFU, LFU with aging, FineMoE, Belady). The learned policy ranks all residents itself.
    """

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams
    # Offline policies read Access.next_use; drivers compute the future only for them.
    needs_future: ClassVar[bool] = False

    def __init__(self, params=None, context: CacheContext | None = None):
        self.params = params if params is not None else self.Params()
        self.context = context

    def on_insert(self, key: Hashable, access: Access) -> None:
        raise NotImplementedError

    def on_hit(self, key: Hashable, access: Access) -> None:
        raise NotImplementedError

    def on_remove(self, key: Hashable) -> None:
        raise NotImplementedError

    def victim(self, evictable: Callable[[Hashable], bool], access: Access) -> Hashable | None:
        """The resident key to evict next among those for which ``evictable(key)``; None if there is none."""
        raise NotImplementedError

    def on_prefetch_used(self, key: Hashable) -> None:
        """A resident key that a prefetch inserted has been used from a faster tier (a DDR cache's copy of an
        expert prefetched into HBM: the DDR cache hears only HBM misses, not that use). Default: nothing."""

    def ordered_keys(self) -> Collection[Hashable] | None:
        """The keys the policy currently orders (for :meth:`TierCache.check_valid`); None if it does not say."""
        return None

    def steps(self, access: Access) -> float:
        """The access's time in decode steps: ``Access.step`` when the driver gives it, else ``Access.time``
        divided by the accesses of one step (``num_layers * top_k``), so parameters in steps mean the same in
        cache-only replay and in the simulator."""
        if access.step is not None:
            return float(access.step)
        context = self.context
        per_step = context.num_layers * context.top_k if context is not None else 1
        return access.time / per_step


class QueuePolicy(Policy):
    """Eviction in queue order: the victim is the first evictable key of a queue that hooks may reorder.

    Insertions join the back of the queue; :meth:`on_hit` decides what a hit does (LRU moves the key to the
    back, FIFO leaves it). The victim walk skips pinned keys, so it is O(1) when nothing is pinned.
    """

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self._queue: OrderedDict = OrderedDict()  # front = next victim

    def on_insert(self, key, access):
        self._queue[key] = None

    def on_hit(self, key, access):
        pass

    def on_remove(self, key):
        del self._queue[key]

    def victim(self, evictable, access):
        for key in self._queue:
            if evictable(key):
                return key
        return None

    def ordered_keys(self):
        return self._queue.keys()


class PriorityPolicy(Policy):
    """Eviction by a priority fixed at each access: the victim is the evictable key with the lowest priority.

    Subclasses implement :meth:`priority` (called on every insertion and hit); ties go to the key accessed
    least recently. Keys are held in a heap with lazy deletion: each access pushes a fresh entry and older
    entries of the key are skipped when they surface, so every hook is O(log n).
    """

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        self._heap: list = []
        self._entries: dict = {}  # key -> its live heap entry (priority, seq, key)
        self._seq = itertools.count()

    def priority(self, key, access: Access, hit: bool):
        """The key's eviction priority after this access (lower is evicted first); any comparable value."""
        raise NotImplementedError

    def on_insert(self, key, access):
        self._push(key, self.priority(key, access, False))

    def on_hit(self, key, access):
        self._push(key, self.priority(key, access, True))

    def on_remove(self, key):
        del self._entries[key]

    def _reprioritise(self, key, priority) -> None:
        """Change a resident key's priority without an access: it keeps its place among equal priorities."""
        self._push(key, priority, self._entries[key][1])

    def _push(self, key, priority, order=None) -> None:
        """Give ``key`` a new priority; ``order`` (default: a fresh one, as for an access) breaks its ties."""
        entry = (priority, next(self._seq) if order is None else order, key)
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._entries) + 64:  # drop the stale entries now and then
            self._heap = list(self._entries.values())
            heapq.heapify(self._heap)

    def victim(self, evictable, access):
        heap, entries = self._heap, self._entries
        skipped = []
        found = None
        while heap:
            entry = heap[0]
            key = entry[2]
            if entries.get(key) is not entry:
                heapq.heappop(heap)  # stale: the key was accessed again or removed since
            elif evictable(key):
                found = key
                break
            else:
                skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def ordered_keys(self):
        return self._entries.keys()


POLICIES: Registry[Policy] = Registry("cache policy")


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    insertions: int = 0
    evictions: int = 0

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.requests if self.requests else None


class TierCache:
    """A byte-bounded set of resident keys with pinning, ordered for eviction by a policy.

    ``lookup`` counts a hit or a miss; ``admit`` makes room (evicting unpinned keys in the policy's order)
    and inserts. Pinned keys (in use by a layer, or in flight) are never evicted; admitting when the bytes
    cannot be freed raises :class:`CacheFullError` rather than overfilling.
    """

    def __init__(self, policy: Policy, capacity_bytes: int, name: str = "cache"):
        if capacity_bytes < 0:
            raise TierflowError(f"{name} capacity must be >= 0 bytes, got {capacity_bytes}")
        self.policy, self.capacity_bytes, self.name = policy, capacity_bytes, name
        self.sizes: dict[Hashable, int] = {}
        self.pins: dict[Hashable, int] = {}
        self.used_bytes = 0
        self.pinned_bytes = 0
        self.stats = CacheStats()
        self.eviction_listeners: list[Callable[[Hashable], None]] = []
        self._evictable = self._is_evictable

    def __contains__(self, key) -> bool:
        return key in self.sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def keys(self) -> Iterable[Hashable]:
        return self.sizes.keys()

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def _is_evictable(self, key) -> bool:
        return key not in self.pins

    def lookup(self, key, access: Access) -> bool:
        """Count an access: True (and tell the policy) when the key is resident."""
        if key in self.sizes:
            self.stats.hits += 1
            self.policy.on_hit(key, access)
            return True
        self.stats.misses += 1
        return False

    def can_admit(self, size_bytes: int) -> bool:
        """Whether ``admit`` of this many bytes would succeed now (free plus unpinned bytes suffice)."""
        return size_bytes <= self.capacity_bytes - self.pinned_bytes

    def admit(self, key, size_bytes: int, access: Access) -> list:
        """Insert a key that is not resident, evicting as needed; returns the evicted keys in order."""
        if key in self.sizes:
            raise ValueError(f"{self.name}: {key!r} is already resident")
        if size_bytes > self.capacity_bytes:
            raise CacheFullError(
                f"{self.name}: an object of {size_bytes} bytes cannot fit in a capacity of {self.capacity_bytes}"
            )
        if not self.can_admit(size_bytes):  # checked first, so a failed admission evicts nothing
            raise CacheFullError(
                f"{self.name}: no room for {key!r} ({size_bytes} bytes): {self.pinned_bytes} of "
                f"{self.capacity_bytes} bytes are pinned by {len(self.pins)} resident objects"
            )
        evicted = []
        while self.used_bytes + size_bytes > self.capacity_bytes:
            victim = self.policy.victim(self._evictable, access)
            if victim is None:
                raise CacheFullError(
                    f"{self.name}: no room for {key!r}: all {len(self.sizes)} resident objects are pinned"
                )
            self._evict(victim)
            evicted.append(victim)
        self.sizes[key] = size_bytes
        self.used_bytes += size_bytes
        self.stats.insertions += 1
        self.policy.on_insert(key, access)
        return evicted

    def evict(self, key) -> None:
        """Remove an unpinned resident key (an eviction: listeners hear of it)."""
        if key not in self.sizes:
            raise ValueError(f"{self.name}: {key!r} is not resident")
        if key in self.pins:
            raise ValueError(f"{self.name}: {key!r} is pinned and cannot be evicted")
        self._evict(key)

    def _evict(self, key) -> None:
        """Evict a key known to be resident and unpinned."""
        self.used_bytes -= self.sizes.pop(key)
        self.policy.on_remove(key)
        self.stats.evictions += 1
        for listener in self.eviction_listeners:
            listener(key)

    def discard(self, key) -> None:
        """Remove a resident key that is no longer wanted (not counted as an eviction)."""
        if key not in self.sizes:
            raise ValueError(f"{self.name}: {key!r} is not resident")
        if key in self.pins:
            raise ValueError(f"{self.name}: {key!r} is pinned and cannot be removed")
        self._remove(key)

    def prefetch_used(self, key) -> None:
        """See :meth:`Policy.on_prefetch_used`; a key not resident here is ignored."""
        if key in self.sizes:
            self.policy.on_prefetch_used(key)

    def _remove(self, key) -> None:
        self.used_bytes -= self.sizes.pop(key)
        self.policy.on_remove(key)

    def pin(self, key, times: int = 1) -> None:
        """Protect a resident key from eviction (``times`` pins at once, at least one); pins nest and each
        needs an ``unpin``."""
        if times < 1:
            raise ValueError(f"{self.name}: pin {key!r} at least once, not {times} times")
        count = self.pins.get(key, 0)
        if not count:
            size = self.sizes.get(key)
            if size is None:
                raise ValueError(f"{self.name}: cannot pin {key!r}: not resident")
            self.pinned_bytes += size
        self.pins[key] = count + times

    def unpin(self, key) -> None:
        count = self.pins.get(key, 0)
        if not count:
            raise ValueError(f"{self.name}: {key!r} is not pinned")
        if count == 1:
            del self.pins[key]
            self.pinned_bytes -= self.sizes[key]
        else:
            self.pins[key] = count - 1

    def is_pinned(self, key) -> bool:
        return key in self.pins

    def check_valid(self) -> None:
        """Assert the invariants the property tests rely on."""
        assert self.used_bytes == sum(self.sizes.values()), "byte accounting drifted"
        assert self.used_bytes <= self.capacity_bytes, "capacity exceeded"
        assert set(self.pins) <= set(self.sizes), "a pinned key is not resident"
        assert all(count > 0 for count in self.pins.values())
        assert self.pinned_bytes == sum(self.sizes[k] for k in self.pins), "pinned bytes drifted"
        ordered = self.policy.ordered_keys()
        if ordered is not None:
            assert len(ordered) == len(self.sizes) and set(ordered) == set(self.sizes), "policy lost track of keys"


def make_policy(name: str, params: dict | None = None, context: CacheContext | None = None) -> Policy:
    """A policy instance from the registry, with validated parameters."""
    cls = POLICIES.get(name)
    return cls(POLICIES.params(name, params), context)
