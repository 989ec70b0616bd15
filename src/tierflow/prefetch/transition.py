"""Activation transitions (MoE-Infinity style): P(expert at layer l+d | experts at layer l), learned online.

For every pair of layers ``d`` apart (``d`` up to the lookahead) the prefetcher counts how often expert
``j`` ran at layer ``l+d`` in a step where expert ``i`` ran at layer ``l``. When layer ``l`` is routed, it
scores each expert of layer ``l+d`` by the summed counts of the experts just chosen, normalised per source
expert (so frequent experts do not swamp the estimate), and proposes the best ones.
"""

from __future__ import annotations

import attrs
import numpy as np

from tierflow.prefetch.base import PREFETCHERS, Prefetcher


@PREFETCHERS.register
class Transition(Prefetcher):
    """Prefetch the experts most often seen d layers after the ones just routed (online statistics)."""

    name = "transition"

    @attrs.frozen
    class Params:
        min_observations: int = attrs.field(default=8, metadata={"help": "steps seen before proposing"})

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        c = self.context
        self._counts = np.zeros((c.lookahead, c.num_layers, c.num_experts, c.num_experts), dtype=np.float32)
        self._routed: dict[int, np.ndarray] = {}  # layer -> experts of the current step so far
        self._step = -1
        self._observations = 0

    def on_routing(self, event):
        c = self.context
        if event.step != self._step:
            self._step, self._routed = event.step, {}
            self._observations += 1
        experts = event.experts
        for distance in range(1, c.lookahead + 1):
            source = self._routed.get(event.layer - distance)
            if source is not None:
                self._counts[distance - 1, event.layer - distance][np.ix_(source, experts)] += 1
        self._routed[event.layer] = experts
        if self._observations <= self.params.min_observations:
            return []
        proposals = []
        for distance in range(1, c.lookahead + 1):
            target = event.layer + distance
            if target >= c.num_layers:
                break
            rows = self._counts[distance - 1, event.layer][experts]
            totals = rows.sum(axis=1, keepdims=True)
            scores = (rows / np.maximum(totals, 1)).sum(axis=0)
            best = np.argsort(-scores, kind="stable")[: c.budget_experts]
            proposals += [(target, int(e)) for e in best if scores[e] > 0]
        return proposals
