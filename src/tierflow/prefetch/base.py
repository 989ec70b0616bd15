"""Prefetchers see routing events and propose experts to fetch for layers ahead; they never move bytes.

The engine turns proposals into transfers at prefetch priority (a demand miss overtakes queued prefetches),
within the scenario's lookahead and per-event budget, skipping experts already resident or in flight. A
proposal refused only because its source queue is full waits and is offered again when that queue shrinks,
until its layer is reached. A proposal may name the next step's first layers (``num_layers + j``) when the
lookahead reaches past the last layer.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import numpy as np

from tierflow.registry import NoParams, Registry


@attrs.frozen
class PrefetchContext:
    """What a prefetcher knows at construction."""

    num_layers: int
    num_experts: int
    top_k: int
    lookahead: int
    budget_experts: int
    workload: object = None  # the decode steps; only offline bounds (oracle) may read ahead in it
    seed: int = 0  # the scenario's seed, for a prefetcher that draws at random and is given no seed of its own


@attrs.frozen
class RoutingEvent:
    """Layer ``layer`` of decode step ``step`` has been routed: the batch's experts and router scores."""

    step: int
    layer: int
    experts: np.ndarray  # distinct experts of the batch, first-seen order
    scores: np.ndarray  # the largest router weight each got
    rows: np.ndarray  # (batch, k) each sequence's routing at this layer
    sequence_ids: np.ndarray
    row_scores: np.ndarray | None = None  # (batch, k) each sequence's router weights, when the trace has them
    predicted: np.ndarray | None = None  # (batch, k) recorded predictions of the next layer's experts


@attrs.frozen
class DemandEvent:
    """The cache's answer to layer ``layer`` of decode step ``step``: which of the layer's experts were
    resident (``hits``), still on their way (``in_flight``: prefetched or fetched earlier, not landed yet) and
    missing, so fetched on demand now (``misses``). Each tuple lists experts in the layer's routing order."""

    step: int
    layer: int
    hits: tuple[int, ...]
    in_flight: tuple[int, ...]
    misses: tuple[int, ...]


class Prefetcher:
    name: ClassVar[str]
    Params: ClassVar[type] = NoParams

    def __init__(self, params=None, context: PrefetchContext | None = None):
        self.params = params if params is not None else self.Params()
        self.context = context

    @classmethod
    def check(cls, params, context: PrefetchContext, steps: int | None = None, recorded: bool = False) -> None:
        """Refuse parameters the run could not use, from its shape alone (raises :class:`TierflowError`):
        ``context`` may come without its workload, ``steps`` is the run's number of decode steps (None: not
        known) and ``recorded`` whether they carry recorded next-layer predictions. Cheap, and reads no file:
        construction runs it first, and a sweep runs it for every point before it runs any. Default: nothing."""

    def on_routing(self, event: RoutingEvent) -> list[tuple[int, int]]:
        """Proposals ``(layer, expert)`` for layers after ``event.layer``, most wanted first. A layer past the
        last one, ``num_layers + j``, is layer ``j`` of the next decode step."""
        raise NotImplementedError

    def on_demand(self, event: DemandEvent) -> None:
        """The layer's experts were looked up, just before its routing event (prefetchers that learn from hits
        and misses may listen). Only prefetchers that override this are told: building the event costs time
        at every layer."""

    def on_eviction(self, layer: int, expert: int) -> None:
        """The cache evicted an expert (prefetchers that track residency may listen)."""


PREFETCHERS: Registry[Prefetcher] = Registry("prefetcher")


def make_prefetcher(name: str, params: dict | None, context: PrefetchContext) -> Prefetcher:
    cls = PREFETCHERS.get(name)
    return cls(PREFETCHERS.params(name, params), context)
