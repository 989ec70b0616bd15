"""Speculative gate: predict layer l+d's experts from layer l's routing with a per-layer linear map.

Offloading systems apply the next layer's gate to the current hidden state to guess its experts before the
hidden state gets there. A trace holds routing, not hidden states, so this prefetcher stands in a linear map
per (layer l, distance d), fitted by ridge regression on a training split: from a token's routing at layer
``l`` (multi-hot of its experts plus their router weights, and a bias) to the indicator of each expert at
layer ``l+d``; with ``history`` h > 1 also the multi-hot of its experts at the h - 1 layers before ``l`` (a
hidden state carries what earlier layers did, and when a token keeps a routing pattern across layers a few
layers identify it better than one). Its outputs are per-token probabilities; a batch needs an expert when any
of its tokens does, so the batch's probability is ``1 - prod(1 - p)``. Experts at or above ``min_probability``
are proposed, most likely first, nearest layer first, at most the engine's budget per layer.

The training split is either a trace file (``train_trace``: its last ``train_tokens`` decode tokens, which
must not be sequences the run simulates) or, without one, the first ``train_fraction`` of the run's own decode
steps, during which the prefetcher only watches (it proposes nothing, as ``none``).

Recorded predictions: when the trace has the optional ``predicted_experts`` dataset (row ``[t, l]``: the
experts a real speculative gate predicted for layer ``l+1`` of token ``t`` while at layer ``l``), the routing
event carries the batch's rows and those experts are proposed for the next layer instead of the map's.
"""

from __future__ import annotations

import math

import attrs
import numpy as np

from tierflow.errors import TierflowError
from tierflow.prefetch.base import PREFETCHERS, Prefetcher
from tierflow.prefetch.training import TrainingSplit, event_row_weights, load_training_split
from tierflow.registry import fraction, positive


_PAIRS_PER_BLOCK = 1 << 24  # feature pairs counted at once when the normal equations are assembled
# The unknowns of one layer's fit, at most: a dense solve of n unknowns takes n**3 / 3 operations per layer (about a
# second on two cores at this size), so a longer history is refused rather than left to run for hours.
MAX_UNKNOWNS = 4097


def _unknowns(num_experts: int, back: int) -> int:
    """The features of a layer that looks ``back`` layers before it: its experts one-hot and weighted, the
    earlier layers' experts one-hot, and a bias."""
    return (2 + back) * num_experts + 1


def fit_layer_maps(experts: np.ndarray, weights: np.ndarray, num_experts: int, max_distance: int,
                   ridge: float, history: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ridge maps from a token's routing at layers ``l-history+1 .. l`` to its experts at ``l+1 ..
    l+max_distance``.

    ``experts``/``weights`` are ``(n, layers, k)``. Returns ``hot``, ``scored`` of shape ``(layers, E,
    max_distance * E)``, ``past`` of shape ``(layers, history - 1, E, max_distance * E)`` and ``bias`` of shape
    ``(layers, max_distance * E)`` (float32): the prediction for a token with experts ``x`` and weights ``w`` at
    layer ``l`` and experts ``y_h`` at layer ``l - h`` is ``bias[l] + sum_i hot[l, x_i] + w_i * scored[l, x_i]
    + sum_h sum_i past[l, h - 1, y_h,i]``, column ``(d - 1) * E + j`` for expert ``j`` at layer ``l + d`` (zero
    past the last layer; layers before the first contribute nothing). The normal equations are assembled from
    co-occurrence counts (``bincount``), not from a dense design matrix: a row has ``(history + 1) k + 1``
    non-zero features.
    """
    n, num_layers, _ = experts.shape
    E, D = num_experts, max_distance
    hot = np.zeros((num_layers, E, D * E), np.float32)
    scored = np.zeros_like(hot)
    past = np.zeros((num_layers, max(0, history - 1), E, D * E), np.float32)
    bias = np.zeros((num_layers, D * E), np.float32)
    if n == 0:
        return hot, scored, past, bias
    ones = np.ones((n, 1), np.float32)
    for layer in range(num_layers - 1):
        back = min(history - 1, layer)  # earlier layers this one can look back on
        features = _unknowns(E, back)
        x = experts[:, layer]
        index = np.concatenate([x, x + E, *[experts[:, layer - h] + (1 + h) * E for h in range(1, back + 1)],
                                np.full((n, 1), features - 1)], axis=1)  # (n, (2 + back) k + 1) feature ids
        value = np.concatenate([np.ones_like(weights[:, layer]), weights[:, layer],
                                *[np.ones_like(weights[:, layer]) for _ in range(back)], ones], axis=1)
        reach = min(D, num_layers - 1 - layer)
        targets = np.concatenate([experts[:, layer + d] + (d - 1) * E for d in range(1, reach + 1)], axis=1)
        gram = np.zeros(features * features)
        cross = np.zeros(features * D * E)
        # Tokens a block, so that the pairs of one block stay small (one block, as a rule: with a long history or
        # many training tokens, several, whose counts are added up)
        block = max(1, _PAIRS_PER_BLOCK // (index.shape[1] * max(index.shape[1], targets.shape[1])))
        for start in range(0, n, block):
            i, v, t = index[start:start + block], value[start:start + block], targets[start:start + block]
            gram += np.bincount((i[:, :, None] * features + i[:, None, :]).ravel(),
                                (v[:, :, None] * v[:, None, :]).ravel(), features * features)
            cross += np.bincount((i[:, :, None] * (D * E) + t[:, None, :]).ravel(),
                                 np.repeat(v.ravel(), t.shape[1]), features * D * E)
        gram = gram.reshape(features, features)
        gram[np.diag_indices(features)] += ridge
        cross = cross.reshape(features, D * E)
        try:
            solution = np.linalg.solve(gram, cross)
        except np.linalg.LinAlgError:
            # A ridge far below the counts is lost in rounding, and an expert seen once at a layer (or always
            # with the same router weight) makes its one-hot and weight columns collinear: the matrix is then
            # singular in floating point. The least-squares solution of least norm is what the ridge fit tends
            # to as the ridge shrinks.
            solution = np.linalg.lstsq(gram, cross, rcond=None)[0]
        solution = solution.astype(np.float32)
        hot[layer], scored[layer], bias[layer] = solution[:E], solution[E:2 * E], solution[-1]
        for h in range(1, back + 1):
            past[layer, h - 1] = solution[(1 + h) * E:(2 + h) * E]
    return hot, scored, past, bias


@PREFETCHERS.register
class SpeculativeGate(Prefetcher):
    """Predict the next layers' experts from this layer's routing with per-layer linear maps (ridge fit)."""

    name = "speculative_gate"

    @attrs.frozen
    class Params:
        train_trace: str = attrs.field(default="", metadata={
            "help": "trace file to fit on (its last train_tokens decode tokens); empty: the run's first steps"})
        train_tokens: int = attrs.field(default=10_000, validator=positive,
                                        metadata={"help": "decode tokens of train_trace to fit on"})
        train_fraction: float = attrs.field(default=0.25, converter=float, validator=fraction, metadata={
            "help": "without train_trace: share of the run's decode steps watched before fitting"})
        ridge: float = attrs.field(default=10.0, converter=float, validator=positive,
                                   metadata={"help": "ridge regularisation of the least-squares fit"})
        min_probability: float = attrs.field(default=0.3, converter=float, validator=fraction,
                                             metadata={"help": "propose experts the batch needs with at least "
                                                               "this predicted probability"})
        history: int = attrs.field(default=1, validator=positive, metadata={
            "help": "layers of the token's routing the maps read: the current one and history - 1 before it"})
        use_recorded: bool = attrs.field(default=True, metadata={
            "help": "use a trace's recorded next-layer predictions when the steps carry them"})

    @classmethod
    def check(cls, params, context, steps=None, recorded=False):
        p = params
        if p.history > context.num_layers:
            raise TierflowError(f"prefetcher {cls.name!r}: history = {p.history} exceeds the model's "
                                f"{context.num_layers} MoE layers (a token has no more routing to read)")
        E = context.num_experts
        unknowns = _unknowns(E, min(p.history - 1, context.num_layers - 2))  # at the layer that looks back furthest
        if unknowns > MAX_UNKNOWNS:
            raise TierflowError(
                f"prefetcher {cls.name!r}: history = {p.history} fits each layer's maps with {unknowns:,} unknowns "
                f"({E} experts a layer); at most {MAX_UNKNOWNS:,} (history <= {(MAX_UNKNOWNS - 1) // E - 1} here): "
                "the fit solves one such system per layer, in a time that grows as the cube of its unknowns")
        if p.train_trace or steps is None or (recorded and p.use_recorded):
            return
        watch = cls._steps_watched(p.train_fraction, steps)
        if watch == 0:
            raise TierflowError(f"prefetcher {cls.name!r}: train_fraction = {p.train_fraction} watches no step "
                                "and there is no train_trace (nor recorded predictions in the trace): it would "
                                "never fit its maps; set train_fraction > 0 or train_trace")
        if watch >= steps:
            raise TierflowError(
                f"prefetcher {cls.name!r}: train_fraction = {p.train_fraction} watches all {steps} decode "
                "step(s): it would fit its maps only after the run; "
                + ("set train_fraction < 1 or train_trace" if steps >= 2 else
                   "a run of one decode step leaves nothing to predict: use workload.decode_tokens >= 2 or "
                   "train_trace"))

    @staticmethod
    def _steps_watched(fraction: float, steps: int) -> int:
        """Decode steps watched before the maps are fitted, of a run of ``steps``."""
        watch = math.ceil(round(fraction * steps, 9))  # 0.55 x 100 is 55, not 56
        if fraction < 1 and steps >= 2:  # a fraction below 1 leaves at least one step to predict
            watch = min(watch, steps - 1)
        return watch

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        c, p = self.context, self.params
        self._distance = max(1, min(c.lookahead, c.num_layers - 1))
        self._fitted = False
        self._history_step, self._history = None, []  # this step's routing rows so far, by layer
        self._watch_steps = 0
        self._seen: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, weights) of watched steps
        self._step_rows: list[np.ndarray] = []
        self._step_weights: list[np.ndarray] = []
        self._steps = getattr(getattr(c, "workload", None), "steps", None)
        steps = None if self._steps is None else len(self._steps)
        first = self._steps[0] if self._steps else None
        self.check(p, c, steps, getattr(first, "predicted_experts", None) is not None)
        if p.train_trace:
            split = load_training_split(p.train_trace, p.train_tokens, c, self.name)
            self._fit(split)
        elif steps is not None:
            self._watch_steps = self._steps_watched(p.train_fraction, steps)

    def _fit(self, split: TrainingSplit) -> None:
        self._hot, self._scored, self._past, self._bias = fit_layer_maps(
            split.experts, split.weights, self.context.num_experts, self._distance, self.params.ridge,
            self.params.history)
        self._fitted = True

    def on_routing(self, event):
        c = self.context
        rows = event.rows.astype(np.int64)
        weights = event_row_weights(event, c.num_experts)
        reach = min(self._distance, c.num_layers - 1 - event.layer)
        recorded = self._recorded(event) if reach > 0 else None
        if event.layer == 0 or event.step != self._history_step:
            self._history_step, self._history = event.step, []
        self._history.append(rows)
        if not self._fitted:
            self._watch(event, rows, weights)
            if not self._fitted:  # recorded predictions need no fit
                return [] if recorded is None else [(event.layer + 1, e) for e in recorded]
        if reach <= 0:
            return []
        # Per token: bias + the rows of its experts in both blocks, + those of its experts at earlier layers;
        # (batch, D * E).
        p = (self._bias[event.layer] + self._hot[event.layer][rows].sum(axis=1)
             + (self._scored[event.layer][rows] * weights[:, :, None]).sum(axis=1))
        for h in range(1, min(self.params.history - 1, event.layer) + 1):
            if len(self._history) > h:
                p += self._past[event.layer, h - 1][self._history[-1 - h]].sum(axis=1)
        p = np.clip(p, 0.0, 1.0).reshape(len(rows), self._distance, c.num_experts)
        batch_p = 1.0 - np.prod(1.0 - p, axis=0)  # (D, E): some token of the batch needs the expert
        budget = min(c.budget_experts, c.num_experts)
        proposals = []
        for d in range(reach):
            target = event.layer + 1 + d
            if d == 0 and recorded is not None:
                proposals += [(target, e) for e in recorded]
                continue
            order = np.argsort(-batch_p[d], kind="stable")[:budget]
            proposals += [(target, e) for e in order[batch_p[d][order] >= self.params.min_probability].tolist()]
        return proposals

    def _watch(self, event, rows, weights) -> None:
        """Without a training trace: keep the watched steps' routing and fit once they are over."""
        if event.step >= self._watch_steps:
            if self._seen:
                experts = np.concatenate([r for r, _ in self._seen])
                split_weights = np.concatenate([w for _, w in self._seen])
                self._fit(TrainingSplit(experts, split_weights, np.zeros(len(experts), np.int64), None))
            return
        self._step_rows.append(rows)
        self._step_weights.append(weights)
        if event.layer == self.context.num_layers - 1:
            self._seen.append((np.stack(self._step_rows, axis=1), np.stack(self._step_weights, axis=1)))
            self._step_rows, self._step_weights = [], []

    def _recorded(self, event) -> list[int] | None:
        """The batch's recorded next-layer predictions, the experts most of its tokens predicted first (ties in
        first-seen order), or None: the engine starts only a budget's worth, so a batch's common guesses should
        not wait behind one token's."""
        if not self.params.use_recorded or event.predicted is None:
            return None
        predicted = np.asarray(event.predicted).ravel()
        experts, first, counts = np.unique(predicted, return_index=True, return_counts=True)
        order = np.lexsort((first, -counts))
        return experts[order].tolist()
