"""From a trace to decode steps: B sequences decode together; a layer needs the union of their experts.

Sequences are admitted in order of first appearance; when one runs out of tokens, the next unused one takes
its slot (continuous batching). Prefill tokens (``phase == 0``) are skipped: the simulator models decode.
"""

from __future__ import annotations

import os

import attrs
import numpy as np

from tierflow.errors import TierflowError
from tierflow.ordering import smallest_first
from tierflow.trace.format import expert_dtype, open_trace


@attrs.frozen
class DecodeStep:
    """One decode step of the batch.

    ``experts[l]`` holds the distinct experts layer ``l`` needs (union over the batch, in first-seen
    order); ``scores[l]`` the largest router weight any sequence gave each of them; ``tokens_per_expert[l]``
    how many of the batch's tokens chose each; ``rows`` the raw (batch, layers, k) routing of the step, and
    ``row_scores`` its router weights (None when the trace has none). ``predicted_experts`` (batch, layers, k),
    when the trace records them: the experts a speculative gate predicted for layer ``l + 1`` at layer ``l``.
    ``positions[i]``: the steps sequence ``sequence_ids[i]`` decoded in this run before this one (a sequence that
    joins the batch late starts at 0: its KV cache holds its own context, not the batch's first sequence's).
    """

    index: int
    experts: list[np.ndarray]
    scores: list[np.ndarray]
    tokens_per_expert: list[np.ndarray]
    rows: np.ndarray
    sequence_ids: np.ndarray
    positions: np.ndarray
    row_scores: np.ndarray | None = None
    predicted_experts: np.ndarray | None = None


@attrs.frozen
class Workload:
    """The decode steps to simulate, with the trace's shape."""

    steps: list[DecodeStep]
    num_layers: int
    num_experts: int
    top_k: int
    model: str
    source: str
    embeddings: np.ndarray | None
    sequence_ids: list[int]

    @property
    def tokens(self) -> int:
        return sum(len(step.sequence_ids) for step in self.steps)

    @property
    def has_scores(self) -> bool:
        """Whether the steps carry the trace's router weights (else their ``scores`` are 0)."""
        return bool(self.steps) and self.steps[0].row_scores is not None

    @property
    def has_predictions(self) -> bool:
        """Whether the steps carry the trace's recorded expert predictions (``predicted_experts``)."""
        return bool(self.steps) and self.steps[0].predicted_experts is not None


def _sequences_from_arrays(experts, sequence_id, scores, predicted=None) -> dict[int, tuple]:
    """Per sequence id, in order of first appearance: (experts, scores or None, predicted or None), of decode
    rows (callers drop prefill rows first)."""
    order = np.argsort(sequence_id, kind="stable")
    ids, starts = np.unique(sequence_id[order], return_index=True)
    first_seen = np.argsort([order[s] for s in starts], kind="stable")
    bounds = np.r_[starts, len(order)]
    sequences = {}
    for i in first_seen:
        index = order[bounds[i] : bounds[i + 1]]
        sequences[int(ids[i])] = (experts[index], None if scores is None else scores[index],
                                  None if predicted is None else predicted[index])
    return sequences


def _unions(rows: np.ndarray, scores: np.ndarray | None):
    """Per layer: the batch's distinct experts in first-seen order, their best score, and their token count."""
    batch, num_layers, k = rows.shape
    if batch == 1:  # one sequence: a layer's experts are already distinct, each chosen by one token
        ones = np.ones(k, dtype=np.int64)
        best = np.zeros((num_layers, k)) if scores is None else scores[0]
        return [(rows[0, layer].astype(np.int64), best[layer], ones) for layer in range(num_layers)]
    flat = rows.transpose(1, 0, 2).reshape(num_layers, batch * k).astype(np.int64)
    flat_scores = None if scores is None else scores.transpose(1, 0, 2).reshape(num_layers, batch * k)
    unions = []
    for layer in range(num_layers):
        uniq, first, inverse, counts = np.unique(flat[layer], return_index=True, return_inverse=True,
                                                 return_counts=True)
        order = np.argsort(first, kind="stable")
        best = np.zeros(len(uniq))
        if flat_scores is not None:
            np.maximum.at(best, inverse, flat_scores[layer])
        unions.append((uniq[order], best[order], counts[order]))
    return unions


def physical_memory_bytes() -> int | None:
    """The machine's physical memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_memory(nbytes: int, what: str, keys: str) -> None:
    """Fail before allocating routing arrays larger than the machine's physical memory."""
    memory = physical_memory_bytes()
    if memory and nbytes > memory:
        raise TierflowError(f"{keys}: {what} would need {nbytes / 2**30:,.1f} GiB, more than this machine's "
                            f"{memory / 2**30:,.1f} GiB of memory")


def build_steps(sequences: dict[int, tuple], batch_size: int, num_steps: int, skip_tokens: int = 0) -> list[DecodeStep]:
    """Continuous batching over the sequences (dict in admission order; values ``(experts, scores or None[,
    predicted or None])``) for up to ``num_steps`` steps."""
    pending = iter(sequences.items())
    slots: list[list] = []  # [sequence id, experts, scores, position, predicted]

    def admit():
        for seq_id, (experts, scores, *predicted) in pending:
            if len(experts) > skip_tokens:
                return [seq_id, experts, scores, skip_tokens, predicted[0] if predicted else None]
        return None

    for _ in range(batch_size):
        slot = admit()
        if slot is None:
            break
        slots.append(slot)
    steps = []
    while slots and len(steps) < num_steps:
        rows = np.stack([slot[1][slot[3]] for slot in slots])
        has_scores = all(slot[2] is not None for slot in slots)
        scores = np.stack([slot[2][slot[3]] for slot in slots]).astype(np.float64) if has_scores else None
        has_predicted = all(slot[4] is not None for slot in slots)
        predicted = np.stack([slot[4][slot[3]] for slot in slots]) if has_predicted else None
        unions = _unions(rows, scores)
        steps.append(DecodeStep(
            index=len(steps),
            experts=[u[0] for u in unions],
            scores=[u[1] for u in unions],
            tokens_per_expert=[u[2] for u in unions],
            rows=rows,
            sequence_ids=np.array([slot[0] for slot in slots]),
            positions=np.array([slot[3] - skip_tokens for slot in slots]),
            row_scores=scores,
            predicted_experts=predicted,
        ))
        next_slots = []
        for slot in slots:
            slot[3] += 1
            if slot[3] < len(slot[1]):
                next_slots.append(slot)
            elif (replacement := admit()) is not None:
                next_slots.append(replacement)
        slots = next_slots
    return steps


def _decode_rows(chunk):
    """The chunk without its prefill rows (``phase == 0``)."""
    if chunk.phase is None or chunk.phase.all():
        return chunk
    return _rows(chunk, chunk.phase != 0)


def _rows(chunk, keep: np.ndarray):
    """The chunk's rows where ``keep`` is true."""
    return attrs.evolve(chunk, **{name: None if getattr(chunk, name) is None else getattr(chunk, name)[keep]
                                  for name in ("experts", "sequence_id", "gate_scores", "phase", "token_index",
                                               "predicted_experts")})


_GAP_ROWS = 65_536  # rows in a row without a begun request's row that end the reading (four default chunks)


def load_workload(path, batch_size: int, num_steps: int, skip_tokens: int = 0) -> Workload:
    """Decode steps from a trace file. Reads only as many tokens as the steps can use (plus whole sequences)."""
    with open_trace(path) as reader:
        meta = reader.meta
        # Continuous batching needs at most batch_size * num_steps decode tokens past the skipped ones; read in
        # chunks until enough sequences are complete, and at least batch_size sequences have begun (a long
        # first request must not hide the others), or the file ends. Only decode tokens are kept and counted:
        # a trace of long prompts would otherwise fill memory with prefill rows, or stop after a few requests.
        budget = batch_size * (num_steps + skip_tokens)
        parts = []
        read = rows = 0  # decode tokens kept, rows read
        seen: set[int] = set()  # requests with decode tokens
        chunks = reader.chunks(gate_scores=True, phase=True, predicted_experts=True)
        for chunk in chunks:
            rows += len(chunk)
            chunk = _decode_rows(chunk)
            parts.append(chunk)
            read += len(chunk)
            if len(seen) < batch_size:
                seen.update(np.unique(chunk.sequence_id).tolist())
            if read >= 2 * budget + 65536 and len(seen) >= batch_size:
                break
        # The requests begun so far are read on: in a log of interleaved requests their later tokens come after
        # the window. A request holds a batch slot for at most num_steps + skip_tokens tokens, so reading stops
        # once every begun request has that many, or after _GAP_ROWS rows in a row, whole chunks, hold none of theirs
        # (their rows, prefill included: a long prompt of theirs does not end the reading; a few chunks of other
        # requests' rows do not either). New requests in these chunks are left out, so none is cut short.
        limit = num_steps + skip_tokens
        ids, counts = (np.unique(np.concatenate([part.sequence_id for part in parts]), return_counts=True)
                       if parts else (np.empty(0, np.int64), np.empty(0, np.int64)))
        have = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        wanting = ids[counts < limit]
        gap = 0
        for chunk in chunks:
            if not wanting.size or gap >= _GAP_ROWS:
                break
            theirs = np.isin(chunk.sequence_id, wanting)
            gap = 0 if theirs.any() else gap + len(chunk)  # in rows: a wide trace reads fewer a chunk
            chunk = _decode_rows(_rows(chunk, theirs))
            parts.append(chunk)
            for sequence, count in zip(*np.unique(chunk.sequence_id, return_counts=True), strict=True):
                have[int(sequence)] += int(count)
            wanting = np.array([s for s in wanting.tolist() if have[s] < limit], dtype=np.int64)
        embeddings = reader.embedding()
    if not rows:
        raise TierflowError(f"{path}: the trace has no tokens")
    cat = lambda name: None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    sequences = _sequences_from_arrays(cat("experts"), cat("sequence_id"), cat("gate_scores"),
                                       cat("predicted_experts"))
    steps = build_steps(sequences, batch_size, num_steps, skip_tokens)
    if not steps:
        raise TierflowError(f"{path}: no decode tokens after skipping {skip_tokens} per sequence")
    if len(steps[0].sequence_ids) < batch_size:
        # Fewer sequences than batch slots: the run would never decode the batch it is asked for (its HBM plan
        # holds the full batch's KV cache). Later steps may run short when the trace runs out of sequences;
        # each is charged for the sequences it decodes.
        available = sum(len(value[0]) > skip_tokens for value in sequences.values())
        skipped = f" after skipping {skip_tokens} tokens each" if skip_tokens else ""
        raise TierflowError(f"{path}: workload.batch_size = {batch_size} but the trace has only {available} "
                            f"sequence(s) with decode tokens{skipped}; lower workload.batch_size")
    return Workload(steps, meta.num_layers, meta.num_experts, meta.top_k, meta.model, meta.source, embeddings,
                    list(sequences))


SYNTHETIC_TOKENS_RULE = ("3 x (workload.batch_size x workload.decode_tokens + sequences x workload.skip_tokens), "
                         "sequences = max(workload.synthetic_sequences, 3 x workload.batch_size)")


def synthetic_sequence_count(batch_size: int, synthetic_sequences: int = 0) -> int:
    """Sequences of the built-in trace: at least three per batch slot, so finished ones are replaced."""
    return max(synthetic_sequences, 3 * batch_size)


def synthetic_token_count(batch_size: int, decode_tokens: int, skip_tokens: int = 0,
                          synthetic_sequences: int = 0) -> int:
    """Tokens of the built-in trace (:data:`SYNTHETIC_TOKENS_RULE`): sequence lengths vary, so three times the
    tokens the steps need, and three times the tokens every sequence skips, keep the batch full to the last
    step."""
    sequences = synthetic_sequence_count(batch_size, synthetic_sequences)
    return 3 * (batch_size * decode_tokens + sequences * skip_tokens)


def synthetic_workload(model_name: str, batch_size: int, num_steps: int, sequences: int, seed: int,
                       skip_tokens: int = 0) -> Workload:
    """Decode steps from the built-in synthetic generator (no file).

    Sequence lengths vary, so three times the needed tokens are generated over three times the sequences
    (at least ``sequences``): continuous batching keeps the batch full to the last step.
    """
    from tierflow.catalog import get_model
    from tierflow.trace.synth import SynthParams, generate_arrays

    spec = get_model(model_name)
    tokens = synthetic_token_count(batch_size, num_steps, skip_tokens, sequences)
    sequences = synthetic_sequence_count(batch_size, sequences)
    per_token = spec.num_moe_layers * spec.top_k * (expert_dtype(spec.num_routed_experts).itemsize + 4)  # + gates
    check_fits_memory(tokens * per_token,
                       f"the built-in trace's {tokens:,} tokens ({SYNTHETIC_TOKENS_RULE}) x {spec.num_moe_layers} "
                       f"layers x top-{spec.top_k}",
                       "workload.batch_size, workload.decode_tokens, workload.skip_tokens")
    data = generate_arrays(spec.num_moe_layers, spec.num_routed_experts, spec.top_k, tokens,
                           num_sequences=sequences, seed=seed, params=SynthParams.for_model(spec.name), workers=1)
    by_sequence = _sequences_from_arrays(data["experts"], data["sequence_id"], data["gate_scores"])
    steps = build_steps(by_sequence, batch_size, num_steps, skip_tokens)
    if not steps:  # the rule above leaves every sequence tokens beyond the skip on average; a guard all the same
        raise TierflowError(f"the built-in trace has no decode tokens after skipping {skip_tokens} per sequence; "
                            "lower workload.skip_tokens or workload.synthetic_sequences")
    return Workload(steps, spec.num_moe_layers, spec.num_routed_experts, spec.top_k, spec.name,
                    f"built-in synthetic (seed={seed})", data["embedding"], list(by_sequence))


def uniform_workload(model_name: str, batch_size: int, num_steps: int, seed: int) -> Workload:
    """Decode steps where every token picks its top-k experts uniformly at random, independently per layer
    and step (no reuse, no skew): a layer with batch B then activates E (1 - (1 - k/E)^B) experts on
    average. ``batch_size`` sequences decode for ``num_steps`` steps; router weights are 1/k each."""
    from tierflow.catalog import get_model

    spec = get_model(model_name)
    layers, num_experts, k = spec.num_moe_layers, spec.num_routed_experts, spec.top_k
    rng = np.random.default_rng(seed)
    tokens = batch_size * num_steps
    check_fits_memory(tokens * layers * k * np.dtype(np.int16).itemsize,
                       f"uniform routing for {tokens:,} tokens (batch x decode) x {layers} layers x top-{k}",
                       "workload.batch_size, workload.decode_tokens")
    rows = np.empty((tokens, layers, k), dtype=np.int16)
    chunk = max(1, 2**22 // (layers * num_experts))  # about 32 MB of random keys at a time
    for start in range(0, tokens, chunk):
        stop = min(tokens, start + chunk)
        keys = rng.random((stop - start, layers, num_experts))
        rows[start:stop] = smallest_first(keys, k)
    scores = np.full((num_steps, layers, k), 1.0 / k, dtype=np.float32)
    # Token t of sequence s is row s * num_steps + t.
    sequences = {s: (rows[s * num_steps : (s + 1) * num_steps], scores) for s in range(batch_size)}
    steps = build_steps(sequences, batch_size, num_steps)
    return Workload(steps, layers, num_experts, k, spec.name, f"uniform random routing (seed={seed})", None,
                    list(sequences))
