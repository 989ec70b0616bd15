"""The cache mechanism: :class:`TierCache` owns capacity, bytes, pinning and the admit/evict loop; a
:class:`Policy` only decides eviction order.

Keys are object ids (``layer * num_experts + expert`` for expert caches). A policy sees each insertion, hit
and removal through hooks and, when the cache needs room, names a victim among the keys the cache says are
evictable (resident and not pinned). Policies that need more than the key (the layer being computed, a router
score, the next use for the offline bound) read it from the :class:`Access` record passed with each event.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import ClassVar

import attrs

from tierflow.errors import TierflowError
from tierflow.registry import NoParams, Registry

NEVER = float("inf")  # next_use of a key that is not accessed again


class CacheFullError(TierflowError):
    """Admission needs room but every resident key is pinned (in use or in flight)."""


class Access:
    """What is known about one access (or insertion) of a key.

    ``time`` increases with every access (the replay position or the simulator's access counter);
    ``layer`` is the MoE layer the key belongs to; ``score`` the router's weight for it (0 when unknown);
    ``next_use`` the ``time`` of the key's next access (``NEVER`` if none; only offline drivers know it);
    ``prefetch`` is true when the insertion is speculative rather than demanded; ``current_layer`` is the
    layer being computed when the event happens.
    """

    __slots__ = ("key", "time", "layer", "score", "next_use", "prefetch", "current_layer")

    def __init__(self, key, time, layer=0, score=0.0, next_use=NEVER, prefetch=False, current_layer=None):
        self.key, self.time, self.layer, self.score = key, time, layer, score
        self.next_use, self.prefetch = next_use, prefetch
        self.current_layer = layer if current_layer is None else current_layer


@attrs.frozen
class CacheContext:
    """What a policy may know about the cache it orders (given once, at construction)."""

    capacity_items: int
    num_layers: int = 1
    num_experts: int = 1


class Policy:
    """Eviction order for one cache. Subclasses implement the four hooks; the cache does the rest."""

    name: ClassVar[str]
    Params: ClassVar[type] = NoParams

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
        evicted = []
        while self.used_bytes + size_bytes > self.capacity_bytes:
            victim = self.policy.victim(self._evictable, access)
            if victim is None:
                raise CacheFullError(
                    f"{self.name}: no room for {key!r}: all {len(self.sizes)} resident objects are pinned"
                )
            self.evict(victim)
            evicted.append(victim)
        self.sizes[key] = size_bytes
        self.used_bytes += size_bytes
        self.stats.insertions += 1
        self.policy.on_insert(key, access)
        return evicted

    def evict(self, key) -> None:
        """Remove an unpinned resident key (an eviction: listeners hear of it)."""
        if key in self.pins:
            raise ValueError(f"{self.name}: {key!r} is pinned and cannot be evicted")
        self._remove(key)
        self.stats.evictions += 1
        for listener in self.eviction_listeners:
            listener(key)

    def discard(self, key) -> None:
        """Remove a resident key that is no longer wanted (not counted as an eviction)."""
        if key in self.pins:
            raise ValueError(f"{self.name}: {key!r} is pinned and cannot be removed")
        self._remove(key)

    def _remove(self, key) -> None:
        self.used_bytes -= self.sizes.pop(key)
        self.policy.on_remove(key)

    def pin(self, key) -> None:
        """Protect a resident key from eviction; pins nest and each needs an ``unpin``."""
        count = self.pins.get(key, 0)
        if not count:
            if key not in self.sizes:
                raise ValueError(f"{self.name}: cannot pin {key!r}: not resident")
            self.pinned_bytes += self.sizes[key]
        self.pins[key] = count + 1

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


def make_policy(name: str, params: dict | None = None, context: CacheContext | None = None) -> Policy:
    """A policy instance from the registry, with validated parameters."""
    cls = POLICIES.get(name)
    return cls(POLICIES.params(name, params), context)
