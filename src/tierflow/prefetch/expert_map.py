"""Expert maps (fMoE / FineMoE style): prefetch what the most similar past tokens used at the next layers.

An expert map is one decode token's routing over all layers: at each layer, its experts with their router
weights (normalised to sum 1). The prefetcher keeps a bounded store of past maps, each tagged with its
sequence's embedding. While a token goes through the layers, it is matched against every stored map:

* by the cosine similarity of its sequence's embedding to the map's (the semantic hint, when the trace has
  ``/sequences/embedding``) and of its trajectory so far (layers ``0..l``) to the map's same layers; the
  semantic part weighs ``semantic_weight / (semantic_weight + layers seen)``, so it guides the first layers
  and the trajectory takes over;
* the ``neighbors`` best maps vote, weighted by similarity: the weighted share of them that used an expert at
  layer ``l+d`` estimates the probability that the token will. Experts some token needs with at least
  ``min_probability`` are proposed, most likely first, nearest layer first. The threshold is a direct
  accuracy-for-coverage knob (as ``speculative_gate``'s), unlike a rule that proposes until the cumulative
  router weight reaches a target, whose width follows the similarity rather than the chance of use.
* ``selection = "cumulative"`` is FineMoE's rule instead: each token's estimate is the neighbours' router
  weights at ``l+d`` (similarity-weighted, summing to 1), and its experts are taken in that order until their
  cumulative weight reaches ``1 - similarity`` of its best match, at least ``top_k`` of them (a confident
  match prefetches little, a poor one a lot).

A batch needs an expert when one of its tokens does with at least the threshold: the per-token estimates are
coarse (multiples of about ``1 / neighbors``), and combining a batch's as ``1 - prod(1 - p)`` lets many stray
single votes add up to a confident-looking batch need. When a token has passed the last layer its map
joins the store; a full store replaces the entry most similar to the new map (the most redundant one), so it
keeps covering distinct routing patterns. ``train_trace`` fills the store before the run with the last
decode tokens of a trace file (past requests); otherwise it starts empty and learns online.
"""

from __future__ import annotations

import attrs
import numpy as np

from tierflow.ordering import smallest_first
from tierflow.prefetch.base import PREFETCHERS, Prefetcher
from tierflow.prefetch.training import event_row_weights, load_training_split
from tierflow.registry import fraction, non_negative, positive


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms > 0, norms, 1)).astype(np.float32)


@PREFETCHERS.register
class ExpertMap(Prefetcher):
    """Match the token to stored past expert maps (embedding, then trajectory) and prefetch what they used."""

    name = "expert_map"

    @attrs.frozen
    class Params:
        capacity: int = attrs.field(default=4096, validator=positive,
                                    metadata={"help": "expert maps the store holds"})
        neighbors: int = attrs.field(default=16, validator=positive,
                                     metadata={"help": "best-matching maps that vote on the next layers"})
        semantic_weight: float = attrs.field(default=1.0, converter=float, validator=non_negative, metadata={
            "help": "weight of the embedding match against the layers seen so far (0: trajectory only)"})
        min_probability: float = attrs.field(default=0.3, converter=float, validator=fraction, metadata={
            "help": "propose an expert when some token of the batch needs it with at least this estimated "
                    "probability"})
        selection: str = attrs.field(default="threshold", validator=attrs.validators.in_(("threshold", "cumulative")),
                                     metadata={"help": "threshold: min_probability on each token's estimate; "
                                                       "cumulative: FineMoE's, until the neighbours' router weight "
                                                       "reaches 1 - similarity, at least top_k"})
        train_trace: str = attrs.field(default="", metadata={
            "help": "trace file whose last train_tokens decode tokens fill the store first; empty: start empty"})
        train_tokens: int = attrs.field(default=4096, validator=positive,
                                        metadata={"help": "decode tokens of train_trace offered to the store"})

    @classmethod
    def check(cls, params, context, steps=None, recorded=False):
        from tierflow.workload import check_fits_memory

        M = params.capacity
        check_fits_memory(context.num_layers * context.num_experts * M * 2, f"a store of {M:,} expert maps",
                          "prefetch.params.capacity")

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        c, p = self.context, self.params
        L, E, M = c.num_layers, c.num_experts, p.capacity
        self.check(p, c)
        # [layer, expert, map]: router weight (0: not chosen). float16: a cosine needs no more than three digits,
        # and it halves the store (4096 DeepSeek-R1 maps: 122 MB).
        self._maps = np.zeros((L, E, M), np.float16)
        self._prefix_norm2 = np.zeros((L, M), np.float32)  # squared norm of each map's layers 0..l
        self._slot_experts: list[np.ndarray | None] = [None] * M  # each slot's (L, k) experts, to clear it
        self._size = 0
        workload = getattr(c, "workload", None)
        embeddings = getattr(workload, "embeddings", None)
        self._embeddings = None if embeddings is None else _unit_rows(np.asarray(embeddings, np.float32))
        self._map_embedding = None if embeddings is None else np.zeros((M, embeddings.shape[1]), np.float32)
        self._step = None
        if p.train_trace:
            self._fill_from(load_training_split(p.train_trace, p.train_tokens, c, self.name))

    # ------------------------------------------------------------------------------------------- the store

    def _fill_from(self, split) -> None:
        """Offer the training tokens to the store one by one, as if they had just been decoded."""
        store = self._map_embedding
        embeddings = None
        if split.embeddings is not None and store is not None and split.embeddings.shape[1] == store.shape[1]:
            embeddings = _unit_rows(split.embeddings)
        for token in range(len(split)):
            experts, weights = split.experts[token], split.weights[token]  # (L, k)
            full = self._size == self.params.capacity
            similarity = self._full_similarity(experts, weights) if full else None  # only a full store needs it
            sequence = int(split.sequence_id[token])
            emb = embeddings[sequence] if embeddings is not None and sequence < len(embeddings) else None
            self._insert(experts, weights, emb, similarity)

    def _full_similarity(self, experts: np.ndarray, weights: np.ndarray, slots=None) -> np.ndarray:
        """Cosine similarity of a whole map ``(L, k)`` to each stored map, or to those in ``slots``."""
        slots = np.arange(self._size) if slots is None else np.asarray(slots)
        layers = np.arange(experts.shape[0])[:, None, None]
        dot = (self._maps[layers, experts[:, :, None], slots] * weights[:, :, None]).sum(axis=(0, 1))
        norm2 = float((weights * weights).sum())
        return dot / np.sqrt(np.maximum(norm2 * self._prefix_norm2[-1, slots], 1e-30))

    def _insert(self, experts, weights, embedding, similarity) -> int:
        """Add a map; a full store overwrites its most similar entry (the most redundant one). Returns its slot."""
        if self._size < self.params.capacity:
            slot = self._size
            self._size += 1
        else:
            slot = int(np.argmax(similarity))
        layers = np.arange(experts.shape[0])[:, None]
        if self._slot_experts[slot] is not None:
            self._maps[layers, self._slot_experts[slot], slot] = 0.0
        self._maps[layers, experts, slot] = weights
        self._slot_experts[slot] = experts.copy()
        self._prefix_norm2[:, slot] = np.cumsum((weights * weights).sum(axis=1))
        if self._map_embedding is not None:
            self._map_embedding[slot] = 0.0 if embedding is None else embedding
        return slot

    # ------------------------------------------------------------------------------------------- routing

    def on_routing(self, event):
        c = self.context
        rows = event.rows.astype(np.int64)
        weights = event_row_weights(event, c.num_experts)
        if event.step != self._step or event.layer == 0:
            self._start_step(event, len(rows))
        layer, size = event.layer, self._size
        self._rows[:, layer], self._weights[:, layer] = rows, weights
        self._norm2 += (weights * weights).sum(axis=1)
        proposals = []
        if size:
            self._dot[:, :size] += (self._maps[layer][rows, :size] * weights[:, :, None]).sum(axis=1)
            proposals = self._propose(layer, size)
        if layer == c.num_layers - 1:
            self._finish_step(size)
        return proposals

    def _start_step(self, event, batch: int) -> None:
        c = self.context
        self._step = event.step
        self._dot = np.zeros((batch, self.params.capacity), np.float32)
        self._norm2 = np.zeros(batch, np.float32)
        self._rows = np.zeros((batch, c.num_layers, event.rows.shape[1]), np.int64)
        self._weights = np.zeros(self._rows.shape, np.float32)
        self._token_embedding = self._semantic = None
        if self._embeddings is not None:
            ids = event.sequence_ids.astype(np.int64)
            known = ids < len(self._embeddings)
            emb = np.zeros((batch, self._embeddings.shape[1]), np.float32)
            emb[known] = self._embeddings[ids[known]]
            self._token_embedding = emb
            # The store changes only between steps: the embedding match is the same at every layer.
            self._semantic = emb @ self._map_embedding[:self._size].T

    def _similarity(self, layer: int, size: int) -> np.ndarray:
        """(batch, size): the blend of trajectory and embedding cosine similarity to each stored map."""
        trajectory = self._dot[:, :size] / np.sqrt(
            np.maximum(self._norm2[:, None] * self._prefix_norm2[layer, :size][None, :], 1e-30))
        w = self.params.semantic_weight
        if self._token_embedding is None or w == 0:
            return trajectory
        alpha = w / (w + layer + 1)
        return alpha * self._semantic + (1 - alpha) * trajectory

    def _propose(self, layer: int, size: int) -> list[tuple[int, int]]:
        c = self.context
        reach = min(c.lookahead, c.num_layers - 1 - layer)
        if reach <= 0:
            return []
        similarity = self._similarity(layer, size)
        n = min(self.params.neighbors, size)
        nearest = smallest_first(-similarity, n)  # (batch, n), the most similar first
        vote = np.maximum(np.take_along_axis(similarity, nearest, axis=1), 0.0) + 1e-6
        vote /= vote.sum(axis=1, keepdims=True)  # (batch, n): each token's neighbours' weights sum to 1
        if self.params.selection == "cumulative":
            best = np.take_along_axis(similarity, nearest, axis=1).max(axis=1)  # (batch,)
            return self._cumulative(layer, reach, nearest, vote, 1.0 - np.clip(best, 0.0, 1.0))
        proposals = []
        for d in range(1, reach + 1):
            # (batch, E): the similarity-weighted share of the neighbours that used each expert at l+d, an
            # estimate of the probability that the token does.
            used = (self._maps[layer + d][:, nearest] > 0).astype(np.float32)  # (E, batch, n)
            need = np.einsum("ebn,bn->e", used, vote) if len(vote) == 1 else \
                np.einsum("ebn,bn->be", used, vote).max(axis=0)
            order = np.argsort(-need, kind="stable")
            order = order[need[order] >= self.params.min_probability]
            proposals += [(layer + d, e) for e in order.tolist()]
        return proposals

    def _cumulative(self, layer: int, reach: int, nearest: np.ndarray, vote: np.ndarray,
                    targets: np.ndarray) -> list[tuple[int, int]]:
        """FineMoE's selection: per token, experts by the neighbours' router weight at each layer ahead until the
        cumulative weight reaches the token's target, at least top_k; the batch's union, the heaviest first."""
        k = self.context.top_k
        proposals = []
        for d in range(1, reach + 1):
            weight = np.einsum("ebn,bn->be", self._maps[layer + d][:, nearest].astype(np.float32), vote)
            best = np.zeros(weight.shape[1], np.float32)  # each chosen expert's largest weight over the batch
            for token, target in zip(weight, targets.tolist(), strict=True):
                order = np.argsort(-token, kind="stable")
                ranked = token[order]
                count = max(k, int(np.searchsorted(np.cumsum(ranked), target, side="left")) + 1)
                chosen = order[:count][ranked[:count] > 0]
                best[chosen] = np.maximum(best[chosen], token[chosen])
            order = np.argsort(-best, kind="stable")
            proposals += [(layer + d, e) for e in order[best[order] > 0].tolist()]
        return proposals

    def _finish_step(self, size: int) -> None:
        """The batch's tokens have passed the last layer: their maps join the store."""
        full = (self._dot[:, :size] / np.sqrt(np.maximum(self._norm2[:, None] * self._prefix_norm2[-1, :size], 1e-30))
                if size else np.zeros((len(self._rows), 0), np.float32))
        written: list[int] = []  # slots this batch's earlier tokens overwrote
        for b in range(len(self._rows)):
            emb = None if self._token_embedding is None else self._token_embedding[b]
            if self._size != size:  # the store grew during the batch: nothing computed covers the new maps
                similarity = self._full_similarity(self._rows[b], self._weights[b])
            else:  # the step's running similarities, brought up to date where this batch wrote
                similarity = full[b]
                if written:
                    similarity = similarity.copy()
                    similarity[written] = self._full_similarity(self._rows[b], self._weights[b], written)
            written.append(self._insert(self._rows[b], self._weights[b], emb, similarity))
        self._step = None
