"""Prefetchers see routing events and propose experts to fetch for layers ahead; they never move bytes.

The engine turns proposals into transfers at prefetch priority (a demand miss overtakes queued prefetches),
within the scenario's lookahead and per-event budget, skipping experts already resident or in flight. A
proposal refused only because its source queue is full waits and is offered again when that queue shrinks,
until its layer is reached.
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


class Prefetcher:
    name: ClassVar[str]
    Params: ClassVar[type] = NoParams

    def __init__(self, params=None, context: PrefetchContext | None = None):
        self.params = params if params is not None else self.Params()
        self.context = context

    def on_routing(self, event: RoutingEvent) -> list[tuple[int, int]]:
        """Proposals ``(layer, expert)`` for layers after ``event.layer``, most wanted first."""
        raise NotImplementedError

    def on_eviction(self, layer: int, expert: int) -> None:
        """The cache evicted an expert (prefetchers that track residency may listen)."""


PREFETCHERS: Registry[Prefetcher] = Registry("prefetcher")


def make_prefetcher(name: str, params: dict | None, context: PrefetchContext) -> Prefetcher:
    cls = PREFETCHERS.get(name)
    return cls(PREFETCHERS.params(name, params), context)
