"""Activation transitions (MoE-Infinity style): P(expert at layer l+d | experts at layer l), learned online.

For every pair of layers ``d`` apart (``d`` up to the lookahead) the prefetcher counts how often a token that
ran expert ``i`` at layer ``l`` ran expert ``j`` at layer ``l+d``. When layer ``l`` is routed, it
scores each expert of layer ``l+d`` by the summed counts of the experts just chosen, normalised per source
expert (so frequent experts do not swamp the estimate), and proposes the best ones.

A step's counts are added when the next step begins, all at once. That changes no proposal: the statistics
layer ``l`` reads (transitions out of layer ``l``) gain this step's counts only when layers ``l+1 .. l+d``
are routed, after layer ``l`` has proposed, since a step's layers are routed in order.
"""

from __future__ import annotations

import attrs
import numpy as np

from tierflow.prefetch.base import PREFETCHERS, Prefetcher
from tierflow.registry import non_negative


@PREFETCHERS.register
class Transition(Prefetcher):
    """Prefetch the experts most often seen d layers after the ones just routed (online statistics)."""

    name = "transition"

    @attrs.frozen
    class Params:
        min_observations: int = attrs.field(default=8, validator=non_negative, metadata={
            "help": "decode steps observed before it proposes anything"})

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        c = self.context
        layers, lookahead, n = c.num_layers, c.lookahead, c.num_experts
        # Row (l, d-1, i) of each table, flattened to one row number: the source expert i at layer l, distance d.
        self._counts = np.zeros((layers * lookahead * n, n), dtype=np.float32)  # row, j: then j ran at l+d
        self._totals = np.zeros(layers * lookahead * n, dtype=np.float32)  # row: experts seen at l+d after i
        # -totals, or -1 while a row is unobserved (its counts are 0, so -counts / totals is 0 there as well).
        # The rows of the routed experts, -counts / totals summed over them, rank the candidates.
        self._minus_totals = np.full_like(self._totals, -1.0)
        first_row = (np.arange(layers)[:, None] * lookahead + np.arange(lookahead)) * n  # [l, d-1]
        self._first_row = first_row
        # For the proposals at layer l: the first rows of (l, 1) .. (l, reach), as a column to add experts to.
        self._reach = [min(lookahead, layers - 1 - layer) for layer in range(layers)]
        self._proposal_rows = [first_row[layer, :reach, None] for layer, reach in enumerate(self._reach)]
        self._row_offsets = [np.arange(reach)[:, None] * n for reach in range(lookahead + 1)]  # into ranked, flat
        self._budget = min(c.budget_experts, n)  # proposals per layer ahead
        self._routed: dict[int, np.ndarray] = {}  # layer -> the current step's routing rows (batch, k) so far
        self._step = -1
        self._observations = 0

    def on_routing(self, event):
        if event.step != self._step:
            self._observe_step()
            self._step, self._routed = event.step, {}
            self._observations += 1
        experts, layer = event.experts, event.layer
        self._routed[layer] = event.rows
        reach = self._reach[layer]
        if self._observations <= self.params.min_observations or reach <= 0:
            return []
        return self._propose(layer, experts, reach)

    def _observe_step(self) -> None:
        """Add the finished step's transitions: each token's (i at l, j at l+d) pairs (at batch > 1, pairs of
        two different tokens' experts are not transitions)."""
        routed = self._routed
        if not routed:
            return
        c = self.context
        n, layers = c.num_experts, c.num_layers
        batch = max(len(rows) for rows in routed.values())
        width = max(rows.shape[1] for rows in routed.values())
        whole = len(routed) == layers and all(rows.shape == (1, width) for rows in routed.values())
        if whole:  # batch 1, every layer routed to the same number of experts: no padding, no repeated cell
            experts = np.array([routed[layer][0] for layer in range(layers)], dtype=np.int64)[:, None, :]
            present = None
        else:  # (layers, batch, width), padded with -1
            experts = np.full((layers, batch, max(1, width)), -1, dtype=np.int64)
            for layer, rows in routed.items():
                experts[layer, : len(rows), : rows.shape[1]] = rows
            present = experts >= 0
            sizes = present.sum(axis=2)  # (layers, batch): each token's experts at each layer
        rows_touched = []
        for distance in range(1, min(c.lookahead, layers - 1) + 1):
            source, target = experts[:-distance], experts[distance:]  # (layers - d, batch, width)
            rows = self._first_row[: layers - distance, distance - 1, None, None] + source
            cells = (rows * n)[..., :, None] + target[..., None, :]  # (layers - d, batch, width, width)
            if present is None:
                # Rows differ between (l, d) and a token's experts are distinct: no cell repeats in the add.
                self._counts.reshape(-1)[cells.ravel()] += 1
                self._totals[rows.ravel()] += width
                rows_touched.append(rows.ravel())
            else:  # two tokens may share a pair: add each distinct cell once with its count (np.add.at is slow)
                pairs = present[:-distance, :, :, None] & present[distance:, :, None, :]
                cell, count = np.unique(cells[pairs], return_counts=True)
                self._counts.reshape(-1)[cell] += count
                sources = present[:-distance] & (sizes[distance:, :, None] > 0)
                row, where = np.unique(rows[sources], return_inverse=True)
                self._totals[row] += np.bincount(
                    where, weights=np.broadcast_to(sizes[distance:, :, None], rows.shape)[sources])
                rows_touched.append(row)
        rows = np.concatenate(rows_touched)
        self._minus_totals[rows] = -self._totals.take(rows)

    def _propose(self, layer: int, experts: np.ndarray, reach: int) -> list[tuple[int, int]]:
        """The best ``budget`` experts of each of the next ``reach`` layers, by summed probability; equal scores go
        to the lower expert id, as in a stable sort (a score of 0 is no evidence: not proposed)."""
        budget = self._budget
        if budget == 0:
            return []
        rows = self._proposal_rows[layer] + experts  # (reach, routed)
        minus_prob = self._counts.take(rows, axis=0)  # a copy: divided in place
        minus_prob /= self._minus_totals.take(rows)[:, :, None]
        ranked = minus_prob.sum(axis=1)  # (reach, num_experts): the lowest is wanted most
        if budget == ranked.shape[1]:
            best = ranked.argsort(axis=1, kind="stable")
            return [(layer + 1 + d, int(e)) for d, row in enumerate(best) for e in row if ranked[d, e] < 0]
        # A partition at the budget puts the best budget first and the next score after them, in linear time.
        # Which of several equal scores it keeps, and in what order, is up to numpy's selection code, which differs
        # between CPUs; so where the next score equals the last one kept (and is evidence), that row is sorted
        # stably instead, and the budget is ordered by (score, expert id) either way.
        chosen = ranked.argpartition(budget, axis=1)[:, : budget + 1]
        scores = ranked.take(chosen + self._row_offsets[reach]).tolist()
        proposals = []
        for d, (row, score) in enumerate(zip(chosen.tolist(), scores, strict=True)):
            last = max(score[:budget])
            if last < 0 and score[budget] == last:
                row = ranked[d].argsort(kind="stable")[:budget].tolist()
                score = ranked[d].take(row).tolist()
            proposals += [(layer + 1 + d, e) for s, e in sorted(zip(score[:budget], row[:budget])) if s < 0]
        return proposals
