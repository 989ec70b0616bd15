"""Cache-only replay: hit counts of a policy on a trace, with no timing, and one-pass LRU miss-ratio curves.

Replay order is the README's ("Cache-only replay order"): tokens in file order, then layers ascending, then each
token's ``top_k`` experts in stored order; the object id of expert ``e`` at layer ``l`` is ``l * num_experts + e`` and
every expert is one unit of capacity. Every miss is admitted (the cache evicts in the policy's order to make
room); nothing is pinned, so this is the plain request stream a cache simulator such as libCacheSim sees.

Two paths compute the same numbers:

- the *reference* path drives :class:`~tierflow.cache.TierCache` (or its per-layer form) access by access,
  through the policy's hooks, exactly as the simulator does; every policy has it;
- the *fast* path for ``lru`` computes every access's LRU stack distance at once (:func:`stack_distances`,
  vectorised numpy), from which the hits at every capacity follow; ``--mrc`` is the same computation.

Tests check the fast path against the reference path, and both against libCacheSim.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from tierflow.cache import POLICIES, Access, make_expert_cache
from tierflow.cache.base import NEVER
from tierflow.cache.scope import check_scope, layer_budgets
from tierflow.errors import TierflowError
from tierflow.trace.format import open_trace


@attrs.frozen(eq=False)
class Requests:
    """A trace's accesses in replay order, as flat arrays of one entry per access.

    ``keys`` are object ids; ``steps`` the file index of the token each access belongs to; ``scores`` the
    router weights (None when the trace has none); ``sequences`` the sequence id of each access's token (None
    when not known).
    """

    keys: np.ndarray
    steps: np.ndarray
    num_layers: int
    num_experts: int
    top_k: int
    scores: np.ndarray | None = None
    sequences: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def layers(self) -> np.ndarray:
        return self.keys // self.num_experts

    @property
    def num_objects(self) -> int:
        return self.num_layers * self.num_experts

    @classmethod
    def from_experts(cls, experts, num_experts: int, gate_scores=None, first_step: int = 0,
                     sequence_id=None) -> Requests:
        """Flatten a ``(tokens, layers, top_k)`` array of expert ids (and optional router weights and sequence
        ids, one per token)."""
        experts = np.asarray(experts)
        tokens, num_layers, top_k = experts.shape
        offsets = (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :, None]
        keys = (experts.astype(np.int64) + offsets).ravel()
        steps = np.repeat(np.arange(first_step, first_step + tokens, dtype=np.int64), num_layers * top_k)
        scores = None if gate_scores is None else np.asarray(gate_scores, dtype=np.float32).ravel()
        sequences = None if sequence_id is None else np.repeat(np.asarray(sequence_id, dtype=np.int64),
                                                               num_layers * top_k)
        return cls(keys, steps, num_layers, num_experts, top_k, scores, sequences)

    @classmethod
    def from_keys(cls, keys, num_experts: int | None = None) -> Requests:
        """A plain request stream (one layer unless ``num_experts`` splits the ids into layers)."""
        keys = np.asarray(keys, dtype=np.int64)
        num_experts = num_experts or (int(keys.max()) + 1 if keys.size else 1)
        num_layers = int(keys.max()) // num_experts + 1 if keys.size else 1
        return cls(keys, np.arange(len(keys), dtype=np.int64), num_layers, num_experts, 1)

    def tokens_in_order(self, order) -> Requests:
        """The same accesses with the tokens taken in ``order`` (indices of this stream's tokens, e.g.
        :func:`tierflow.trace.synth.engine_order`), each token's accesses kept together; tokens are numbered
        again from 0 in the new order."""
        per_token = self.num_layers * self.top_k
        order = np.asarray(order, dtype=np.int64)

        def take(values):
            return None if values is None else values.reshape(-1, per_token)[order].ravel()

        steps = np.repeat(np.arange(len(order), dtype=np.int64), per_token)
        return attrs.evolve(self, keys=take(self.keys), steps=steps, scores=take(self.scores),
                            sequences=take(self.sequences))

    def interleaved(self, concurrent: int) -> Requests:
        """A stream of requests stored one after another, in the order a serving engine decoding ``concurrent``
        of them side by side would meet their tokens (:func:`tierflow.trace.synth.engine_order`)."""
        from tierflow.trace.synth import engine_order

        if concurrent == 1:
            return self
        if self.sequences is None:
            raise TierflowError("interleaving requests needs the trace's sequence ids")
        return self.tokens_in_order(engine_order(self.sequences[:: self.num_layers * self.top_k], concurrent))


# What a replay holds per access at its peak: the request arrays, then the stack-distance pass's or a policy's
# working arrays (measured on DeepSeek-R1 traces: about 165 bytes for LRU and --mrc, 190 for LFU, 216 for FIFO,
# Belady and learned, whose reference path turns the arrays into Python lists).
REPLAY_BYTES_PER_ACCESS = 220


def read_requests(path, max_tokens: int | None = None, decode_only: bool = False) -> Requests:
    """Every access of a trace file (or of its first ``max_tokens`` rows), read chunk by chunk into memory; with
    ``decode_only``, only the decode tokens' (the rows the simulator replays: a trace's ``phase`` marks
    prefill rows 0), numbered as steps in order. A trace whose replay would not fit the machine's memory (see
    :data:`REPLAY_BYTES_PER_ACCESS`) is refused before anything is read, or, with ``decode_only`` (prefill rows
    are known only once read), as soon as the decode rows read so far are too many."""
    from tierflow.workload import check_fits_memory

    def check(rows: int, what: str) -> None:
        accesses = rows * meta.num_layers * meta.top_k
        check_fits_memory(accesses * REPLAY_BYTES_PER_ACCESS,
                          f"replaying {rows:,} {what} x {meta.num_layers} layers x top-{meta.top_k} "
                          f"({accesses:,} accesses, about {REPLAY_BYTES_PER_ACCESS} bytes each)", "--tokens")

    with open_trace(path) as reader:
        meta = reader.meta
        if not decode_only:
            check(meta.num_tokens if max_tokens is None else min(max_tokens, meta.num_tokens), "tokens")
        keys, steps, scores, sequences = [], [], [], []
        kept = 0
        for chunk in reader.chunks(stop=max_tokens, gate_scores=True, phase=decode_only):
            experts, gates, sequence_id = chunk.experts, chunk.gate_scores, chunk.sequence_id
            if decode_only and chunk.phase is not None:
                rows = chunk.phase != 0
                experts, sequence_id = experts[rows], sequence_id[rows]
                gates = None if gates is None else gates[rows]
            if decode_only:
                check(kept + len(experts), "decode tokens (so far)")
            part = Requests.from_experts(experts, meta.num_experts, gates, kept, sequence_id)
            kept += len(experts)
            keys.append(part.keys)
            steps.append(part.steps)
            scores.append(part.scores)
            sequences.append(part.sequences)
    empty = np.empty(0, dtype=np.int64)
    return Requests(
        np.concatenate(keys) if keys else empty,
        np.concatenate(steps) if steps else empty,
        meta.num_layers, meta.num_experts, meta.top_k,
        np.concatenate(scores) if meta.has_gate_scores and scores else None,
        np.concatenate(sequences) if sequences else empty,
    )


# ----------------------------------------------------------------------------------------------- reuse links


def _sortable(keys: np.ndarray) -> np.ndarray:
    """The keys in the narrowest unsigned type that holds them: numpy's stable sort is a radix sort up to 16 bits."""
    if keys.size and np.issubdtype(keys.dtype, np.integer) and keys.min() >= 0:
        top = int(keys.max())
        for dtype in (np.uint8, np.uint16, np.uint32):
            if top <= np.iinfo(dtype).max:
                return keys.astype(dtype)
    return keys


def _reuse_links(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(previous, next): the index of the same key's previous and next access, -1 where there is none."""
    keys = np.asarray(keys)
    n = len(keys)
    order = np.argsort(_sortable(keys), kind="stable")
    sorted_keys = keys[order]
    same = sorted_keys[1:] == sorted_keys[:-1]
    earlier, later = order[:-1][same], order[1:][same]
    previous = np.full(n, -1, dtype=np.int64)
    following = np.full(n, -1, dtype=np.int64)
    previous[later] = earlier
    following[earlier] = later
    return previous, following


def next_use(keys) -> np.ndarray:
    """For each access, the index of the next access to the same key; -1 if the key is not accessed again."""
    return _reuse_links(np.asarray(keys))[1]


# ----------------------------------------------------------------------------------------------- stack distances

# Accesses are processed in blocks: the LRU stack at a block's start is carried as the sorted positions of each
# key's last use, and within a block counts come from ranks. A block splits into sub-blocks of 64 accesses whose
# counts come from 64-bit masks.
_BLOCK = 1024
_SUB = 64


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)  # numpy < 2.0
    return table[words.view(np.uint8).reshape(*words.shape, 8)].sum(axis=-1)


def _block_ranks(values: np.ndarray, width: int) -> np.ndarray:
    """Each value's rank (0 = smallest, ties in position order) within its run of ``width`` values."""
    rows = values.reshape(-1, width)
    order = np.argsort(rows, axis=1, kind="stable")
    ranks = np.empty(rows.shape, dtype=np.int16)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(width, dtype=np.int16), rows.shape), axis=1)
    return ranks.ravel()


def _earlier_smaller(virtual: np.ndarray) -> np.ndarray:
    """For each position ``i``: how many earlier positions of its block hold a smaller value than ``i``'s.

    ``virtual``'s length is a multiple of the block size; values are equal only where no count is needed.
    Within a run of 64 the earlier smaller values are found with a 64-bit mask of the ranks seen so far. Above
    that, a block is halved recursively: an element of a right half has ``rank in the whole - rank in its
    half`` smaller values in the left half, all of them earlier.
    """
    ranks = {_BLOCK: _block_ranks(virtual, _BLOCK)}
    width = _BLOCK
    while width > _SUB:
        ranks[width // 2] = _block_ranks(ranks[width], width // 2)  # ranking ranks keeps the order
        width //= 2
    bits = np.left_shift(np.uint64(1), ranks[_SUB].astype(np.uint64).reshape(-1, _SUB))
    seen = np.bitwise_or.accumulate(bits, axis=1) ^ bits
    counts = _popcount(seen & (bits - np.uint64(1))).ravel()
    position = np.arange(len(virtual))
    width = _SUB
    while width < _BLOCK:
        right_half = (position & width) != 0
        counts += np.where(right_half, ranks[2 * width].astype(np.int64) - ranks[width], 0)
        width *= 2
    return counts


def stack_distances(keys) -> np.ndarray:
    """Each access's LRU stack distance: how many other keys were accessed since the key's previous access
    (-1 for a first access). An LRU cache of ``c`` items hits exactly the accesses with ``0 <= distance < c``.

    Vectorised numpy, O(n log n) for n accesses. Within a block, the previous use of a key last seen before the
    block is replaced by a *virtual time* just before the block that keeps the LRU order at the block's start
    (the k-th most recent key gets ``start - 1 - k``); then the distance of an access ``i`` is a count of
    earlier accesses in its block with a smaller (virtual) previous use.
    """
    keys = np.asarray(keys)
    n = len(keys)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    previous, following = _reuse_links(keys)
    position = np.arange(n, dtype=np.int64)
    block_start = position - position % _BLOCK
    within = previous >= block_start
    across = np.flatnonzero((previous >= 0) & ~within)  # reuses of a key last seen before the block
    block_end = np.minimum(block_start + _BLOCK, n)
    last_in_block = np.flatnonzero((following < 0) | (following >= block_end))
    bounds = np.arange(0, n + _BLOCK, _BLOCK)
    across_at = np.searchsorted(across, bounds)
    last_at = np.searchsorted(last_in_block, bounds)
    # The LRU rank at the block's start of each key reused across a block boundary, from the sorted last uses
    # of every key seen before the block.
    recency = np.empty(len(across), dtype=np.int64)
    last_uses = np.empty(0, dtype=np.int64)
    previous_across = previous[across]
    for block in range(len(bounds) - 1):
        lo, hi = across_at[block], across_at[block + 1]
        where = np.searchsorted(last_uses, previous_across[lo:hi])
        recency[lo:hi] = len(last_uses) - 1 - where
        keep = np.ones(len(last_uses), dtype=bool)
        keep[where] = False
        last_uses = np.concatenate([last_uses[keep], last_in_block[last_at[block]:last_at[block + 1]]])
    padded = len(bounds) * _BLOCK - _BLOCK
    virtual = np.full(padded, padded + 1, dtype=np.int64)  # padding: after everything, never counted
    virtual[:n] = np.where(within, previous, -(n + 2))  # first uses: below every virtual time
    virtual[across] = block_start[across] - 1 - recency
    earlier = _earlier_smaller(virtual)[:n]
    distance = np.where(within, earlier - (previous - block_start + 1), earlier)
    distance[across] += recency
    distance[previous < 0] = -1
    return distance


def _layer_order(requests: Requests) -> np.ndarray:
    """The accesses grouped by layer, in replay order within each layer: LRU distances there are per layer."""
    return np.argsort(_sortable(requests.layers), kind="stable")


def _scoped_distances(requests: Requests, scope: str) -> tuple[np.ndarray, np.ndarray]:
    """(distances, layer of each) for the scope: per-layer distances are computed within each layer's stream."""
    if scope == "global":
        return stack_distances(requests.keys), requests.layers
    order = _layer_order(requests)
    return stack_distances(requests.keys[order]), requests.layers[order]


def lru_hits(requests: Requests, capacities: Sequence, scope: str = "global") -> list[int]:
    """LRU hits at each capacity from one stack-distance pass (per-layer capacities may be budget lists)."""
    distance, layer = _scoped_distances(requests, check_scope(scope))
    hits = []
    for capacity in capacities:
        if scope == "global":
            hits.append(int(np.count_nonzero((distance >= 0) & (distance < capacity))))
        else:
            budgets = np.asarray(layer_budgets(capacity, requests.num_layers), dtype=np.int64)
            hits.append(int(np.count_nonzero((distance >= 0) & (distance < budgets[layer]))))
    return hits


def lru_mrc(requests: Requests, scope: str = "global") -> tuple[np.ndarray, np.ndarray]:
    """(capacities, hits): LRU hits at every capacity from ``top_k`` up to the number of distinct keys (per layer
    for ``per-layer``, where a capacity is the slots of every layer); beyond that the hits stay the same."""
    distance, layer = _scoped_distances(requests, check_scope(scope))
    reused = distance[distance >= 0]
    if scope == "global":
        largest = len(np.unique(requests.keys))
    else:
        largest = int(np.bincount(np.unique(requests.keys) // requests.num_experts).max()) if len(requests) else 0
    largest = max(largest, requests.top_k)
    hits_at = np.cumsum(np.bincount(reused, minlength=largest)[:largest])  # hits_at[c - 1]: capacity c
    capacities = np.arange(requests.top_k, largest + 1)
    return capacities, hits_at[capacities - 1]


# ----------------------------------------------------------------------------------------------- replay


@attrs.frozen
class ReplayResult:
    """Hit counts of one policy at one capacity."""

    policy: str
    capacity: int | tuple[int, ...]
    scope: str
    requests: int
    hits: int

    @property
    def misses(self) -> int:
        return self.requests - self.hits

    @property
    def hit_rate(self) -> float | None:
        """None when there were no requests (no rate), as in ``simulate --json``."""
        return self.hits / self.requests if self.requests else None

    def to_json(self) -> dict:
        """The row of ``replay --json``."""
        capacity = list(self.capacity) if isinstance(self.capacity, tuple) else self.capacity
        return {"policy": self.policy, "capacity": capacity, "scope": self.scope, "requests": self.requests,
                "hits": self.hits, "misses": self.misses, "hit_rate": self.hit_rate}


def check_capacity(capacity, requests: Requests, scope: str) -> int | tuple[int, ...]:
    """A capacity must be a whole number of experts (per layer for ``per-layer``) of at least ``top_k``:
    one layer's experts must fit at once."""
    values = list(capacity) if isinstance(capacity, (list, tuple, np.ndarray)) else [capacity]
    unit = "experts" if scope == "global" else "slots per layer"
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise TierflowError(f"capacity must be a positive integer ({unit}), got {value!r}")
        if value < requests.top_k:
            raise TierflowError(
                f"capacity {value} is smaller than top_k={requests.top_k}: one layer's experts must fit ({unit})"
            )
    if not isinstance(capacity, (list, tuple, np.ndarray)):
        return int(capacity)
    if scope == "global":
        raise TierflowError("per-layer budgets need --scope per-layer")
    return tuple(layer_budgets(values, requests.num_layers))


def replay_reference(requests: Requests, policy: str, capacity, scope: str = "global",
                     params: dict | None = None, progress=None) -> int:
    """Hits of ``policy`` through the cache mechanism, one access at a time (every policy; the reference).
    ``progress`` (if given) is called with the number of accesses done since its last call."""
    cache = make_expert_cache(policy, scope, capacity, num_layers=requests.num_layers,
                              num_experts=requests.num_experts, top_k=requests.top_k, params=params,
                              router_scores=requests.scores is not None)
    drive(cache, requests, progress, future=POLICIES.get(policy).needs_future)
    return cache.stats.hits


PROGRESS_EVERY = 1 << 16  # accesses between two calls of a replay's progress callback


def drive(cache, requests: Requests, progress=None, *, future: bool) -> None:
    """Every access of ``requests`` through ``cache`` in order, each miss admitted (size 1), nothing pinned; each
    access carries what a policy may read: its time, token, sequence, layer and router score, and, with
    ``future`` (an offline policy, or a recorder labelling decisions), its key's next use (else ``NEVER``: an
    online policy cannot read it). ``progress`` (if given) is called with the accesses done, every
    :data:`PROGRESS_EVERY` and at the end."""
    num_experts = requests.num_experts
    if future:
        following = next_use(requests.keys)
        next_uses = np.where(following < 0, NEVER, following).tolist()
    else:
        next_uses = [NEVER] * len(requests)
    scores = requests.scores.tolist() if requests.scores is not None else [0.0] * len(requests)
    steps = requests.steps.tolist()
    sequences = requests.sequences.tolist() if requests.sequences is not None else [None] * len(requests)
    keys = requests.keys.tolist()
    lookup, admit = cache.lookup, cache.admit
    access = Access(0, 0)
    chunk = len(keys) if progress is None else PROGRESS_EVERY
    for first in range(0, len(keys), max(chunk, 1)):
        for time in range(first, min(first + chunk, len(keys))):
            key = keys[time]
            access.key, access.time, access.step, access.sequence = key, time, steps[time], sequences[time]
            access.layer = access.current_layer = key // num_experts
            access.score, access.next_use = scores[time], next_uses[time]
            if not lookup(key, access):
                admit(key, 1, access)
        if progress is not None:
            progress(min(chunk, len(keys) - first))


# Policies with a faster exact computation than the access-by-access reference (checked equal by tests).
FAST_PATHS = {"lru": lru_hits}


def uses_fast_path(policy: str, params: dict | None = None) -> bool:
    """Whether :func:`replay` computes ``policy``'s hits without driving a cache access by access."""
    return policy in FAST_PATHS and not params


def replay(requests: Requests, policy: str, capacities: Sequence, scope: str = "global",
           params: dict | None = None, *, fast: bool = True, progress=None) -> list[ReplayResult]:
    """One :class:`ReplayResult` per capacity; ``fast=False`` forces the reference path. ``progress`` (if
    given) hears of the reference path's accesses as they are done (``len(requests)`` per capacity)."""
    POLICIES.params(policy, params)  # unknown policy or parameter: fail before any work
    check_scope(scope)
    capacities = [check_capacity(c, requests, scope) for c in capacities]
    if fast and uses_fast_path(policy, params):
        hits = FAST_PATHS[policy](requests, capacities, scope)
    else:
        hits = [replay_reference(requests, policy, c, scope, params, progress) for c in capacities]
    return [ReplayResult(policy, c, scope, len(requests), h) for c, h in zip(capacities, hits, strict=True)]
