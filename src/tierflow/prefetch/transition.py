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
        shape = (c.num_layers, c.lookahead, c.num_experts, c.num_experts)
        self._counts = np.zeros(shape, dtype=np.float32)  # [l, d-1, i, j]: i at layer l, then j at l+d
        self._totals = np.zeros(shape[:3], dtype=np.float32)  # [l, d-1, i]: observations of i at layer l
        self._prob = np.zeros(shape, dtype=np.float32)  # counts / totals, kept up to date row by row
        self._routed: dict[int, np.ndarray] = {}  # layer -> experts of the current step so far
        self._step = -1
        self._observations = 0

    def on_routing(self, event):
        c = self.context
        if event.step != self._step:
            self._step, self._routed = event.step, {}
            self._observations += 1
        experts, layer = event.experts, event.layer
        for distance in range(1, c.lookahead + 1):
            source = self._routed.get(layer - distance)
            if source is not None:  # source and experts are distinct sets, so no index repeats in the add
                counts = self._counts[layer - distance, distance - 1]
                totals = self._totals[layer - distance, distance - 1]
                counts[source[:, None], experts[None, :]] += 1
                totals[source] += len(experts)
                self._prob[layer - distance, distance - 1][source] = counts[source] / totals[source][:, None]
        self._routed[layer] = experts
        reach = min(c.lookahead, c.num_layers - 1 - layer)
        if self._observations <= self.params.min_observations or reach <= 0:
            return []
        proposals = []
        budget = min(c.budget_experts, c.num_experts)
        for d in range(reach):
            scores = self._prob[layer, d][experts].sum(axis=0)
            best = np.argpartition(-scores, budget - 1)[:budget]
            best = best[np.argsort(-scores[best], kind="stable")]
            proposals += [(layer + 1 + d, e) for e in best[scores[best] > 0].tolist()]
        return proposals
