"""Routing statistics of a trace, computed in one streaming pass.

The same functions check the synthetic generator against the real OLMoE/Mixtral counts, so they take plain
arrays as well as files.
"""

from __future__ import annotations

import numpy as np

from tierflow.trace.format import TraceChunk, TraceMeta, validate_trace

# Reuse counting holds a few (tokens x layers x k) temporaries; this keeps them near 2 MB for DeepSeek.
_REUSE_CHUNK_TOKENS = 4096


def entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row of a count matrix."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=-1) + 0.0  # + 0.0: an empty row is 0.0, not -0.0


def top_share(counts: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Share of selections taken by the most popular ``fraction`` of experts (at least one), per row."""
    counts = np.asarray(counts, dtype=np.float64)
    top = max(1, int(round(fraction * counts.shape[-1])))
    ordered = np.sort(counts, axis=-1)[..., ::-1]
    return ordered[..., :top].sum(axis=-1) / counts.sum(axis=-1)


def rank_aligned_counts(experts: np.ndarray, layer_a: int, layer_b: int, num_experts: int) -> np.ndarray:
    """(E x E) counts of (k-th choice at layer_a, k-th choice at layer_b), as the OLMoE analysis counts them."""
    a = experts[:, layer_a, :].astype(np.int64).ravel()
    b = experts[:, layer_b, :].astype(np.int64).ravel()
    return np.bincount(a * num_experts + b, minlength=num_experts * num_experts).reshape(num_experts, num_experts)


class RoutingAccumulator:
    """Accumulates per-layer popularity counts and consecutive-token reuse over chunks of a trace.

    Reuse: for each token whose sequence has an earlier token, the fraction of its top-k experts at a
    layer that the sequence's previous token also chose at that layer, averaged over tokens and layers. When the
    trace gives each token's position (``token_index``), only tokens one position apart are consecutive: an
    imported log that dropped a token does not pair the tokens on either side of the gap.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.num_tokens = 0
        self.sequences: set[int] = set()
        self._reused = 0
        self._reuse_pairs = 0
        self._last_row: dict[int, tuple[np.ndarray, int | None]] = {}  # sequence -> (its last row, its position)

    def update(self, experts: np.ndarray, sequence_id: np.ndarray, token_index: np.ndarray | None = None) -> None:
        # One layer at a time: no int64 copy of the whole chunk.
        for layer in range(self.num_layers):
            self.counts[layer] += np.bincount(experts[:, layer, :].ravel(), minlength=self.num_experts)
        self.num_tokens += len(sequence_id)
        for lo in range(0, len(sequence_id), _REUSE_CHUNK_TOKENS):
            hi = lo + _REUSE_CHUNK_TOKENS
            self._update_reuse(experts[lo:hi], sequence_id[lo:hi], None if token_index is None else token_index[lo:hi])

    def _update_reuse(self, experts: np.ndarray, sequence_id: np.ndarray, token_index: np.ndarray | None) -> None:
        order = np.argsort(sequence_id, kind="stable")
        seq = sequence_id[order]
        rows = experts[order]
        position = None if token_index is None else token_index[order].astype(np.int64)
        same = seq[1:] == seq[:-1]
        follows = same if position is None else same & (np.diff(position) == 1)
        if follows.any():
            self._count_overlap(rows[1:][follows], rows[:-1][follows])
        firsts = np.flatnonzero(np.r_[True, ~same])
        lasts = np.r_[firsts[1:] - 1, len(seq) - 1]
        carried = []
        for i in firsts.tolist():
            last = self._last_row.get(int(seq[i]))
            if last is not None and (position is None or last[1] is None or position[i] - last[1] == 1):
                carried.append((i, last[0]))
        if carried:
            index, previous = zip(*carried, strict=True)
            self._count_overlap(rows[list(index)], np.stack(previous))
        for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True):
            sequence = int(seq[first])
            self.sequences.add(sequence)
            # A copy: a view would keep this whole block of rows alive until the end of the pass.
            self._last_row[sequence] = rows[last].copy(), None if position is None else int(position[last])

    def _count_overlap(self, current: np.ndarray, previous: np.ndarray) -> None:
        # k passes of contiguous compares beat one (n, L, k, k) broadcast by an order of magnitude.
        self._reused += sum(
            int(np.count_nonzero(current == previous[..., slot, None])) for slot in range(self.top_k)
        )
        self._reuse_pairs += current.shape[0] * self.num_layers * self.top_k

    @property
    def reuse_rate(self) -> float | None:
        return self._reused / self._reuse_pairs if self._reuse_pairs else None

    def entropy_bits(self) -> np.ndarray:
        return entropy_bits(self.counts)


def validate_and_accumulate(path) -> tuple[RoutingAccumulator, TraceMeta]:
    """One streaming pass over a trace file that checks every value and accumulates its statistics."""
    accumulators: list[RoutingAccumulator] = []

    def visit(meta: TraceMeta, chunk: TraceChunk) -> None:
        if not accumulators:
            accumulators.append(RoutingAccumulator(meta.num_layers, meta.num_experts, meta.top_k))
        accumulators[0].update(chunk.experts, chunk.sequence_id, chunk.token_index)

    meta = validate_trace(path, on_chunk=visit)
    acc = accumulators[0] if accumulators else RoutingAccumulator(meta.num_layers, meta.num_experts, meta.top_k)
    return acc, meta


def label_mismatch(meta: TraceMeta, model: str | None = None) -> str | None:
    """What contradicts a trace's ``model`` attribute, if it names a catalog model: that model's shape (the
    attribute is wrong), else ``model``, the catalog model the trace is used as (a model of the same shape).
    None when nothing does, or the attribute names no catalog model (an imported log's "unknown")."""
    from tierflow.catalog import get_model
    from tierflow.errors import TierflowError

    try:
        spec = get_model(meta.model)
    except TierflowError:
        return None
    shape = (spec.num_moe_layers, spec.num_routed_experts, spec.top_k)
    if shape != (meta.num_layers, meta.num_experts, meta.top_k):
        return (f"{meta.path}: the model attribute names {spec.name} ({shape[0]} MoE layers x {shape[1]} experts, "
                f"top-{shape[2]}), but the trace is {meta.num_layers} x {meta.num_experts}, top-{meta.top_k}")
    used = None if model is None else get_model(model).name
    if used is not None and used != spec.name:
        return f"{meta.path}: the trace was recorded for {spec.name}; simulated as {used}, a model of the same shape"
    return None


def summarize(path) -> dict:
    """Validate a trace and return ``tierflow trace info``'s figures, with exactly its JSON keys."""
    acc, meta = validate_and_accumulate(path)
    reuse = acc.reuse_rate
    return {
        "model": meta.model,
        "num_tokens": meta.num_tokens,
        "num_sequences": len(acc.sequences),
        "num_layers": meta.num_layers,
        "num_experts": meta.num_experts,
        "top_k": meta.top_k,
        "source": meta.source,
        # A layer with no selections (a trace of no tokens) has no popularity: null, not the 0 bits of one expert.
        "per_layer_popularity_entropy": [round(float(h), 6) if n else None
                                         for h, n in zip(acc.entropy_bits(), acc.counts.sum(axis=-1), strict=True)],
        "consecutive_token_reuse_rate": None if reuse is None else round(reuse, 6),
    }


def format_summary(summary: dict) -> str:
    """A readable rendering of :func:`summarize`'s dictionary."""
    entropy = np.array([h for h in summary["per_layer_popularity_entropy"] if h is not None])
    max_bits = np.log2(summary["num_experts"]) if summary["num_experts"] > 1 else 1.0
    reuse = summary["consecutive_token_reuse_rate"]
    lines = [
        f"model                 {summary['model']}",
        f"source                {summary['source']}",
        f"tokens                {summary['num_tokens']:,}",
        f"sequences             {summary['num_sequences']:,}",
        f"MoE layers            {summary['num_layers']}",
        f"experts per layer     {summary['num_experts']}  (top-{summary['top_k']})",
        "popularity entropy    "
        + (
            f"{entropy.mean():.3f} bits mean, {entropy.min():.3f}..{entropy.max():.3f} over layers "
            f"({entropy.mean() / max_bits:.3f} of the uniform {max_bits:.3f} bits)"
            if entropy.size
            else "n/a (no tokens)"
        ),
        "consecutive reuse     " + ("n/a (no sequence has two tokens)" if reuse is None else f"{reuse:.3f}"),
    ]
    return "\n".join(lines)
