"""Training splits for prefetchers that learn from routing before the run (``speculative_gate``, ``expert_map``).

A training split is a set of decode tokens, each with its experts at every layer, its router weights and its
sequence's embedding. It comes from a trace file (the last ``tokens`` decode tokens of it) and must not
share a sequence with the decode steps being simulated: a predictor fitted on the tokens it is then asked
about would report accuracy it does not have. Two checks find one: a training token routed exactly as a
simulated token, at every layer (the same token, whatever file or sequence id it came under: a built-in
workload and a ``trace gen`` file of the same seed hold the same sequences), and a sequence id the run decodes
when the file is the workload's own source (its later tokens, in the split, are the run's future).
"""

from __future__ import annotations

import attrs
import numpy as np

from tierflow.errors import TierflowError, TraceError
from tierflow.trace.format import open_trace


@attrs.frozen
class TrainingSplit:
    """``experts`` (n, layers, k) ids, ``weights`` (n, layers, k) router weights normalised per row,
    ``sequence_id`` (n,), ``embeddings`` (sequences, d) by sequence id or None."""

    experts: np.ndarray
    weights: np.ndarray
    sequence_id: np.ndarray
    embeddings: np.ndarray | None

    def __len__(self) -> int:
        return len(self.sequence_id)


def row_weights(experts: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
    """Router weights of routing rows ``(..., k)`` normalised to sum 1 per row; uniform when unknown or zero."""
    k = experts.shape[-1]
    if scores is None:
        return np.full(experts.shape, 1.0 / k, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    total = scores.sum(axis=-1, keepdims=True)
    uniform = np.float32(1.0 / k)
    return np.where(total > 0, scores / np.where(total > 0, total, 1), uniform).astype(np.float32)


def event_row_weights(event, num_experts: int) -> np.ndarray:
    """Each token's router weights at a routing event's layer (normalised by :func:`row_weights`): the event's
    per-token weights when the trace has them, else the batch's best weight for each expert (exact at batch 1)."""
    rows = event.rows.astype(np.int64)
    if event.row_scores is not None:
        return row_weights(rows, event.row_scores)
    best = np.zeros(num_experts, np.float32)
    best[event.experts.astype(np.int64)] = event.scores
    return row_weights(rows, best[rows])


# Fixed odd multipliers: a token's key is the wrapping sum of its sorted expert ids times these, one per
# (layer, slot). Distinct tokens share a key with probability about 2**-64 per pair.
_KEY_WEIGHTS = np.random.default_rng(0x5EED).integers(1, 2**63, size=1 << 16, dtype=np.int64).astype(np.uint64) | 1


def token_keys(rows: np.ndarray) -> np.ndarray:
    """One 64-bit key per token of ``rows`` (tokens, layers, k): equal for tokens routed to the same experts at
    every layer, whatever the order within a row."""
    flat = np.sort(np.asarray(rows, dtype=np.int64), axis=-1).reshape(len(rows), -1).astype(np.uint64)
    weights = np.resize(_KEY_WEIGHTS, flat.shape[1])
    with np.errstate(over="ignore"):
        return (flat * weights).sum(axis=1, dtype=np.uint64)


def _check_shape(meta, path: str, num_layers: int, num_experts: int, who: str) -> None:
    if (meta.num_layers, meta.num_experts) != (num_layers, num_experts):
        raise TierflowError(f"prefetcher {who!r}: train_trace {path} has {meta.num_layers} layers x "
                            f"{meta.num_experts} experts, the simulated model {num_layers} x {num_experts}")


def check_training_trace(path: str, num_layers: int, num_experts: int, who: str) -> None:
    """What :func:`load_training_split` would reject about the file itself, without reading its tokens: it
    opens as a trace of the model's shape (a sweep checks its points with this before running any)."""
    try:
        with open_trace(path) as reader:
            _check_shape(reader.meta, path, num_layers, num_experts, who)
    except TraceError as error:
        raise TierflowError(f"prefetcher {who!r}: train_trace {error}") from None


def load_training_split(path: str, tokens: int, context, who: str) -> TrainingSplit:
    """The last ``tokens`` decode tokens of the trace at ``path``, checked against the context's shape and
    workload (no shared sequence)."""
    try:
        with open_trace(path) as reader:
            meta = reader.meta
            _check_shape(meta, path, context.num_layers, context.num_experts, who)
            phases = reader.phases()
            decode = np.arange(meta.num_tokens) if phases is None else np.flatnonzero(phases != 0)
            if not len(decode):
                raise TierflowError(f"prefetcher {who!r}: train_trace {path} has no "
                                    f"{'decode ' if meta.num_tokens else ''}tokens")
            start = int(decode[max(0, len(decode) - tokens)])  # the first of the last ``tokens`` decode tokens
            parts = list(reader.chunks(start=start, gate_scores=True, phase=True))
            embeddings = reader.embedding()
    except TraceError as error:
        # The error names the file already.
        raise TierflowError(f"prefetcher {who!r}: train_trace {error}") from None

    def cat(name):
        return None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])

    experts, sequence_id = cat("experts").astype(np.int64), cat("sequence_id").astype(np.int64)
    scores, phase = cat("gate_scores"), cat("phase")
    keep = np.ones(len(sequence_id), bool) if phase is None else phase != 0
    experts, sequence_id = experts[keep], sequence_id[keep]
    scores = None if scores is None else scores[keep]
    workload = getattr(context, "workload", None)
    if workload is not None and hasattr(workload, "steps") and len(experts):
        _check_disjoint(workload, experts, sequence_id, meta.source, path, tokens, who)
    return TrainingSplit(experts, row_weights(experts, scores), sequence_id, embeddings)


def _check_disjoint(workload, experts, sequence_id, source, path, tokens: int, who: str) -> None:
    """Refuse a training split that holds a token the run decodes, or (the file being the workload's own
    source) a sequence the run decodes: see the module's docstring."""
    shared = set()
    if workload.steps:
        simulated = np.concatenate([token_keys(step.rows) for step in workload.steps])
        shared.update(np.unique(sequence_id[np.isin(token_keys(experts), simulated)]).tolist())
    # Sequence ids only identify a sequence within one file: compared when the workload may be this file.
    if getattr(workload, "source", None) == source:
        decoded = {int(s) for step in workload.steps for s in step.sequence_ids.tolist()}
        shared.update(decoded.intersection(np.unique(sequence_id).tolist()))
    if shared:
        raise TierflowError(
            f"prefetcher {who!r}: train_trace {path} shares {len(shared)} sequence(s) with the simulated decode "
            f"steps (e.g. its sequence {min(shared)}); use a separate file or a longer one (the split is its "
            f"last {tokens} tokens)")
