"""Synthetic expert-activation traces with realistic routing structure.

The generative model, per MoE layer ``l`` of a model with ``E`` experts and top-``k`` routing:

* **Topics.** Each sequence draws one of ``num_topics`` topics. Expert popularity at layer ``l`` for topic
  ``t`` is log-normal: ``log w = skew_l * (sqrt(1 - topic_divergence) * g_l + sqrt(topic_divergence) * h_lt)``
  with standard normal ``g_l`` (shared) and ``h_lt`` (topic-specific); ``skew_l`` goes linearly from
  ``skew_first`` to ``skew_last`` over the layers. Each sequence also gets an embedding near its topic's
  centroid, for semantic-hint prefetchers.
* **Routing state and cross-layer affinity.** Each token carries a latent routing state (one of
  ``num_states``) that tilts the popularity by ``exp(strength_l * u_ls)``, with ``strength_l`` going
  linearly from ``state_strength_first`` to ``state_strength_last`` (deeper layers specialise more). At the first layer the state
  comes from the topic's state mix and persists across consecutive tokens with ``state_persistence``; at
  each next layer, with probability ``affinity`` it is set by the current layer's top-1 expert (a fixed
  random map expert -> state per layer), else it carries over. So layer ``l+1``'s choice depends on layer
  ``l``'s.
* **Temporal reuse.** Each of a token's ``k`` slots re-selects the previous token's expert in that slot
  with probability ``reuse`` (same layer, same sequence); other slots draw afresh, without replacement,
  from the token's popularity. Collisions are re-drawn so a row never repeats an expert; that costs a little
  of the copying, so the measured consecutive reuse sits slightly below ``reuse`` plus chance overlap.
* **Gate scores.** Router weights of the chosen experts: a softmax over their log-probability plus Gumbel
  noise, normalised over the ``k`` chosen (the top-k renormalisation most MoE routers apply); each row is
  stored in descending score order, as routers emit it.

Default parameters per routing profile were fitted by ``scripts/calibrate_synth.py`` to the real OLMoE and
Mixtral counts in ``traces/olmoe-routing-stats`` (see the README for the statistics they reproduce).
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import os
from collections.abc import Iterable

import attrs
import numpy as np

from tierflow.errors import TierflowError
from tierflow.trace.format import TraceWriter, expert_dtype
from tierflow.workers import new_pool, signals_held, sigterm_unwinds, terminate_pool

# Each (topic, state) block's distribution is also kept as an urn of this many expert ids (largest-
# remainder rounding, probabilities exact to 1/_URN_SIZE) for cheap i.i.d. draws; exact draws use the cdf.
_URN_SIZE = 1 << 13
_URN_ROUNDS = 3  # i.i.d. urn draws tried for a colliding slot before an exact restricted draw
_BELOW_ONE = 1.0 - 1e-12  # uniform draws are clipped here so the last cdf entry (1.0) always exceeds them
_SETTLE_ROUNDS = 1
# A restricted draw shifts a uniform draw past the excluded mass; below this much mass left, double precision
# cannot place it among the experts left, and they are drawn from their own probabilities instead.
_RESOLVABLE_MASS = 1e-9
_GEN_CHUNK_TOKENS = 32768


def _unit(low: float, high: float):
    def check(instance, attribute, value):
        if not low <= value <= high:
            raise ValueError(f"{attribute.name} must be in [{low}, {high}], got {value}")

    return check


def _positive(instance, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen
class SynthParams:
    """Parameters of the synthetic routing model (see the module docstring for their meaning)."""

    num_topics: int = attrs.field(default=8, validator=_positive)
    topic_divergence: float = attrs.field(default=0.5, validator=_unit(0.0, 1.0))
    skew_first: float = attrs.field(default=0.7, validator=_unit(0.0, 10.0))
    skew_last: float = attrs.field(default=1.1, validator=_unit(0.0, 10.0))
    num_states: int = attrs.field(default=16, validator=_positive)
    state_strength_first: float = attrs.field(default=1.0, validator=_unit(0.0, 20.0))
    state_strength_last: float = attrs.field(default=1.0, validator=_unit(0.0, 20.0))
    state_concentration: float = attrs.field(default=0.3, validator=_positive)
    affinity: float = attrs.field(default=0.5, validator=_unit(0.0, 1.0))
    state_persistence: float = attrs.field(default=0.6, validator=_unit(0.0, 1.0))
    reuse: float = attrs.field(default=0.3, validator=_unit(0.0, 1.0))
    gate_temperature: float = attrs.field(default=1.0, validator=_positive)
    embedding_dim: int = attrs.field(default=32, validator=_positive)
    embedding_noise: float = attrs.field(default=0.5, validator=_unit(0.0, 100.0))
    tokens_per_sequence: int = attrs.field(default=512, validator=_positive)

    @classmethod
    def for_model(cls, model_name: str) -> SynthParams:
        """The calibrated defaults for the routing profile of a catalog model."""
        return ROUTING_PROFILES[routing_profile(model_name)]

    def with_overrides(self, overrides: Iterable[str]) -> SynthParams:
        """Apply ``key=value`` strings; unknown keys and bad values are one-line errors."""
        fields = attrs.fields_dict(type(self))
        changes = {}
        for item in overrides:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep:
                raise TierflowError(f"--set {item!r}: expected KEY=VALUE")
            if key not in fields:
                raise TierflowError(f"unknown generator parameter {key!r}; valid: {', '.join(fields)}")
            changes[key] = _generator_value(key, raw, int if fields[key].type in ("int", int) else float)
        try:
            return attrs.evolve(self, **changes)
        except ValueError as error:
            raise TierflowError(f"generator parameter {error}") from None


def _generator_value(key: str, raw: str, kind: type) -> int | float:
    """A ``--set`` value read as ``simulate --set`` reads one (TOML: ``5e0`` is the whole number 5), as a finite
    number of the parameter's kind."""
    from tierflow.config import parse_value

    value = parse_value(raw.strip())
    if isinstance(value, str):  # not a TOML number; Python's reading still takes ".5" and "5."
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, float) and value.is_integer() and kind is int and abs(value) <= 2**53:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        expected = "a whole number" if kind is int else "a number"
        raise TierflowError(f"generator parameter {key}: {raw!r} is not {expected}")
    if not math.isfinite(value):
        raise TierflowError(f"generator parameter {key}: must be a finite number, got {raw!r}")
    return kind(value)


# Fitted by scripts/calibrate_synth.py; the fit's targets and results are printed by that script and
# summarised in the README. "fine_grained" is fitted to OLMoE-1B-7B (64 experts, top-8) and serves the
# fine-grained-expert models (DeepSeek, Qwen, OLMoE, GPT-OSS); "coarse" is fitted to Mixtral-8x7B.
ROUTING_PROFILES: dict[str, SynthParams] = {
    "fine_grained": SynthParams(topic_divergence=0.80, skew_first=0.73, skew_last=1.92, num_states=32,
                                state_strength_first=1.55, state_strength_last=2.0, state_concentration=0.32,
                                affinity=0.0),
    "coarse": SynthParams(topic_divergence=0.22, skew_first=0.06, skew_last=0.3, num_states=64,
                          state_strength_first=0.8, state_strength_last=1.0, state_concentration=0.3, affinity=0.0),
}


def routing_profile(model_name: str) -> str:
    """Which calibrated routing profile a catalog model uses."""
    return "coarse" if model_name.lower().startswith("mixtral") else "fine_grained"


# ----------------------------------------------------------------------------------------------- the model


@attrs.frozen
class _LayerTables:
    p: np.ndarray  # (topics * states, E) routing distribution of each (topic, state) block
    urns: np.ndarray  # (topics * states, _URN_SIZE) expert ids: the distribution, quantised
    stacked_cdf: np.ndarray  # (topics * states * E,) block b's cumulative distribution plus b, ascending
    log_p: np.ndarray  # (topics * states, E) log-probabilities, for gate scores and exact redraws
    top1_state: np.ndarray  # (E,) the state a token moves to when this layer's top-1 is that expert


def _layer_tables(rng, params: SynthParams, num_experts: int, skew: float, strength: float) -> _LayerTables:
    shared = rng.standard_normal(num_experts)
    topical = rng.standard_normal((params.num_topics, num_experts))
    lam = params.topic_divergence
    log_w = skew * (math.sqrt(1 - lam) * shared + math.sqrt(lam) * topical)
    tilt = strength * rng.standard_normal((params.num_states, num_experts))
    logits = (log_w[:, None, :] + tilt[None, :, :]).reshape(-1, num_experts)
    log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    p = np.exp(log_p)
    p /= p.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p, axis=1)
    cdf[:, -1] = 1.0
    stacked = (cdf + np.arange(len(cdf))[:, None]).ravel()
    top1_state = rng.integers(0, params.num_states, num_experts)
    return _LayerTables(p, _quantised_urns(p, expert_dtype(num_experts)), stacked, log_p.astype(np.float32),
                        top1_state)


def _quantised_urns(p: np.ndarray, dtype) -> np.ndarray:
    """Each row of ``p`` as ``_URN_SIZE`` expert ids (largest-remainder rounding)."""
    rows, num_experts = p.shape
    scaled = p * _URN_SIZE
    counts = np.floor(scaled).astype(np.int64)
    short = _URN_SIZE - counts.sum(axis=1)
    # Stable sorts: equal remainders by expert id, the same on every CPU.
    remainder_rank = np.argsort(np.argsort(counts - scaled, axis=1, kind="stable"), axis=1, kind="stable")
    counts += remainder_rank < short[:, None]
    experts = np.tile(np.arange(num_experts, dtype=dtype), rows)
    return np.repeat(experts, counts.ravel()).reshape(rows, _URN_SIZE)


def _inverse_cdf(tables: _LayerTables, block: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The first expert whose cumulative probability exceeds ``x``, in each row's block.

    One binary search over all blocks at once: block ``b``'s cdf is stored offset by ``b`` (see
    :func:`_layer_tables`), so ``b + x`` lands inside block ``b``.
    """
    num_experts = tables.p.shape[1]
    x = np.minimum(x, _BELOW_ONE)
    index = np.searchsorted(tables.stacked_cdf, block + x, side="right")
    return index - block * num_experts


def _draw_excluding(rng, tables: _LayerTables, block: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """One expert per row from the row's distribution restricted to experts not in ``excluded`` (n, m;
    -1 marks an empty place). Exact: the inverse CDF of the restricted distribution, found by shifting the
    uniform draw past the excluded mass below it until it settles (at most m + 1 passes)."""
    num_experts = tables.p.shape[1]
    block = block.astype(np.int64)
    valid = excluded >= 0
    mass = np.where(valid, tables.p.ravel()[(block * num_experts)[:, None] + np.maximum(excluded, 0)], 0.0)
    left = 1.0 - mass.sum(axis=1)
    u = rng.random(len(block)) * left
    expert = _inverse_cdf(tables, block, u)
    # Where the experts left hold too little mass for the shifted draw to resolve (routing so concentrated
    # that u + the excluded mass below it rounds onto an excluded expert), draw from their own probabilities.
    tiny = left < _RESOLVABLE_MASS
    if tiny.any():
        expert[tiny] = _draw_restricted(rng, tables, block[tiny], excluded[tiny])
    todo = np.flatnonzero(~tiny)
    for _ in range(excluded.shape[1] + 1):
        below = (mass[todo] * (excluded[todo] <= expert[todo, None])).sum(axis=1)
        moved = _inverse_cdf(tables, block[todo], u[todo] + below)
        changed = moved != expert[todo]
        expert[todo] = moved
        todo = todo[changed]
        if not todo.size:
            break
    return expert


def _draw_restricted(rng, tables: _LayerTables, block: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """One expert per row from the row's log-probabilities with the ``excluded`` ones (-1: none) removed,
    renormalised from the largest remaining one (so a remaining mass far below 1 is still exact)."""
    num_experts = tables.p.shape[1]
    log_p = tables.log_p[block].astype(np.float64)
    rows = np.repeat(np.arange(len(block)), excluded.shape[1])
    keep = excluded.ravel() >= 0
    log_p[rows[keep], excluded.ravel()[keep]] = -np.inf
    weights = np.exp(log_p - log_p.max(axis=1, keepdims=True))
    cumulative = np.cumsum(weights, axis=1)
    u = rng.random(len(block)) * cumulative[:, -1]
    return np.minimum((cumulative <= u[:, None]).sum(axis=1), num_experts - 1)


def _first_occurrences(values: np.ndarray, num_experts: int) -> np.ndarray:
    """Per row of ``values`` (n, w): True where a value appears for the first time in its row.

    A column at a time against a (row, expert) "seen" table: w cheap passes instead of a (n, w, w) compare.
    """
    n, width = values.shape
    seen = np.zeros(n * num_experts, dtype=bool)
    flat = values + (np.arange(n, dtype=np.int64) * num_experts)[:, None]
    first = np.empty((n, width), dtype=bool)
    for column in range(width):
        index = flat[:, column]
        first[:, column] = ~seen[index]
        seen[index] = True
    return first


def _draw_distinct(rng, tables: _LayerTables, block: np.ndarray, k: int) -> np.ndarray:
    """k distinct experts per row, drawn one after another without replacement (as top-k sampling is).

    The first distinct values of an i.i.d. sequence are exactly such a draw, so each row first takes k + 4
    cheap i.i.d. draws from its block's urn and keeps the first distinct ones; rows that saw fewer than k
    distinct experts (concentrated routing) complete the sequence with exact restricted draws.
    """
    n, width = len(block), k + 4
    index = rng.integers(0, _URN_SIZE, (n, width))
    index += block[:, None] * _URN_SIZE
    draws = tables.urns.ravel()[index]
    first = _first_occurrences(draws, tables.p.shape[1])
    # The first k distinct draws of each row, in order: a stable sort puts the first occurrences in front.
    order = np.argsort(~first, axis=1, kind="stable")[:, :k]
    chosen = np.take_along_axis(draws, order, axis=1).astype(np.int64)
    have = first.sum(axis=1)
    chosen[np.arange(k) >= have[:, None]] = -1
    for slot in range(k):
        lacking = np.flatnonzero(have <= slot)
        if lacking.size:
            chosen[lacking, slot] = _draw_excluding(rng, tables, block[lacking], chosen[lacking, :slot])
    return chosen.astype(expert_dtype(tables.p.shape[1]))


def _fill_repeats(rng, tables: _LayerTables, block: np.ndarray, rows: np.ndarray) -> None:
    """Replace, in place, every later occurrence of a repeated expert with one drawn from the row's
    distribution restricted to the experts not already in the row."""
    ordered = np.sort(rows, axis=1)
    bad = np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))
    if not bad.size:
        return
    fixed = rows[bad].astype(np.int64)
    k = fixed.shape[1]
    repeat = ~_first_occurrences(fixed, tables.p.shape[1])
    sub_block = block[bad].astype(np.int64)
    for slot in range(1, k):
        todo = np.flatnonzero(repeat[:, slot])
        # A few cheap i.i.d. urn draws first (a rejected draw is simply the next one of the sequence), then
        # an exact restricted draw for the rows whose mass sits on experts they already hold.
        for _ in range(_URN_ROUNDS):
            if not todo.size:
                break
            draw = tables.urns.ravel()[sub_block[todo] * _URN_SIZE + rng.integers(0, _URN_SIZE, todo.size)]
            ok = ~((fixed[todo] == draw[:, None]) & ~repeat[todo]).any(axis=1)
            fixed[todo[ok], slot] = draw[ok]
            repeat[todo[ok], slot] = False
            todo = todo[~ok]
        if todo.size:
            keep = np.where(repeat[todo], -1, fixed[todo])
            fixed[todo, slot] = _draw_excluding(rng, tables, sub_block[todo], keep)
            repeat[todo, slot] = False
    rows[bad] = fixed


def _settle(rng, tables: _LayerTables, block: np.ndarray, values: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """Rows of distinct experts from slot copies: carry each slot's last fresh value forward, redraw
    collisions, and let later copies see a redrawn value (as a new fresh value) so no copy is lost to it.
    ``values`` and ``fresh`` have one leading row for the carried state; both are updated in place."""
    for _ in range(_SETTLE_ROUNDS):
        rows = _carry_forward(values, fresh)[1:]
        before = rows.copy()
        _fill_repeats(rng, tables, block, rows)
        changed = rows != before
        if not changed.any():
            break
        values[1:][changed] = rows[changed]
        fresh[1:][changed] = True
    return rows


def _carry_forward(values: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """values[last fresh index at or before t] along axis 0 (1-D or 2-D); row 0 must be fresh."""
    width = values[0].size
    flat = np.arange(values.size).reshape(values.shape)
    last = np.maximum.accumulate(np.where(fresh, flat, 0), axis=0)
    if values.ndim == 2:  # the accumulated flat index of column j is a multiple of width plus j
        last += np.arange(width) - last % width
    return values.ravel()[last]


@attrs.define
class _Carry:
    """State handed from one chunk of tokens to the next (the sequence that spans the boundary)."""

    state0: int = 0
    chain: np.ndarray | None = None  # (L, k) the slot values the next token may re-select


class RoutingModel:
    """A seeded instance of the routing model for one model shape; generates tokens chunk by chunk."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, params: SynthParams, seed: int,
                 record_states: bool = False):
        """``record_states``: also yield each token's routing state at every layer (hidden variables, for
        analyses that need what the generator knew; the routing is the same either way)."""
        if not 1 <= top_k <= num_experts:
            raise TierflowError(f"top_k {top_k} must be in [1, num_experts={num_experts}]")
        self.num_layers, self.num_experts, self.top_k, self.params = num_layers, num_experts, top_k, params
        self.seed, self.record_states = seed, record_states
        # Separate streams for the model's tables, the sequences, and each block of tokens (see
        # route_block), so blocks can be generated in any order or in parallel with identical results.
        tables_rng = np.random.default_rng([seed, 0])
        self.rng = np.random.default_rng([seed, 1])
        skews = np.linspace(params.skew_first, params.skew_last, num_layers)
        strengths = np.linspace(params.state_strength_first, params.state_strength_last, num_layers)
        self.layers = [
            _layer_tables(tables_rng, params, num_experts, float(skew), float(strength))
            for skew, strength in zip(skews, strengths, strict=True)
        ]
        self.state_mix = tables_rng.dirichlet(np.full(params.num_states, params.state_concentration),
                                              params.num_topics)
        self.topic_centroids = _unit_rows(tables_rng.standard_normal((params.num_topics, params.embedding_dim)))

    def sequences(self, num_tokens: int, num_sequences: int) -> tuple[np.ndarray, np.ndarray]:
        """Per sequence: its length (all >= 1, summing to num_tokens) and its topic."""
        if num_sequences > num_tokens:
            raise TierflowError(f"--sequences {num_sequences} exceeds --tokens {num_tokens}")
        shares = self.rng.dirichlet(np.full(num_sequences, 4.0))
        extra = np.floor(shares * (num_tokens - num_sequences)).astype(np.int64)
        extra[: num_tokens - num_sequences - extra.sum()] += 1
        topics = self.rng.integers(0, self.params.num_topics, num_sequences)
        return 1 + extra, topics

    def embeddings(self, topics: np.ndarray) -> np.ndarray:
        noise = self.rng.standard_normal((len(topics), self.params.embedding_dim))
        scale = self.params.embedding_noise / math.sqrt(self.params.embedding_dim)
        return _unit_rows(self.topic_centroids[topics] + scale * noise).astype(np.float32)

    def route_block(self, plan: _BlockPlan, block: int):
        """Yield (experts, gate_scores, sequence_id, token_index) for one block, chunk by chunk, and the routing
        states (n, L) as a fifth item when the model records them."""
        rng = np.random.default_rng([self.seed, 2, block])
        lo, hi = plan.token_range(block)
        carry = _Carry()
        for start in range(lo, hi, _GEN_CHUNK_TOKENS):
            stop = min(start + _GEN_CHUNK_TOKENS, hi)
            seq = plan.sequence_of_token[start:stop]
            index = plan.token_index[start:stop]
            states = [] if self.record_states else None
            experts, gates = self.generate_chunk(rng, plan.topics[seq], index == 0, carry, states)
            if states is None:
                yield experts, gates, seq, index
            else:
                yield experts, gates, seq, index, np.stack(states, axis=1)

    def generate_chunk(self, rng, topic: np.ndarray, starts: np.ndarray, carry: _Carry,
                       states_out: list | None = None):
        """Route one chunk of tokens. ``topic`` per token; ``starts`` marks each sequence's first token.

        Returns (experts (n, L, k), gate_scores (n, L, k)) and updates ``carry``. If ``states_out`` is a list,
        each layer's routing state per token (n,) is appended to it; no random draw depends on it.
        """
        p = self.params
        n, k = len(topic), self.top_k
        continues = not starts[0]
        # Layer-0 routing state: fresh at sequence starts and with probability 1 - persistence.
        fresh_state = np.r_[True, starts | (rng.random(n) >= p.state_persistence)]
        states = np.empty(n + 1, dtype=np.int64)
        states[0] = carry.state0
        states[1:] = _sample_rows(rng, self.state_mix[topic])
        state = _carry_forward(states, fresh_state)[1:]
        carry.state0 = int(state[-1])

        experts = np.empty((n, self.num_layers, k), dtype=expert_dtype(self.num_experts))
        gates = np.empty((n, self.num_layers, k), dtype=np.float32)
        chain_out = np.empty((self.num_layers, k), dtype=experts.dtype)
        for layer, tables in enumerate(self.layers):
            block = topic * p.num_states + state
            if states_out is not None:
                states_out.append(state.astype(np.int16))
            fresh = _draw_distinct(rng, tables, block, k)
            slot_fresh = np.empty((n + 1, k), dtype=bool)
            slot_fresh[0] = True
            slot_fresh[1:] = starts[:, None] | (rng.random((n, k)) >= p.reuse)
            values = np.empty((n + 1, k), dtype=fresh.dtype)
            values[0] = carry.chain[layer] if continues else 0
            values[1:] = fresh
            rows = _settle(rng, tables, block, values, slot_fresh)
            chain_out[layer] = rows[-1]
            rows, scores = self._gate(rng, tables, block, rows)
            experts[:, layer], gates[:, layer] = rows, scores
            if layer + 1 < self.num_layers:
                moved = rng.random(n) < p.affinity
                state = np.where(moved, tables.top1_state[rows[:, 0]], state)
        carry.chain = chain_out
        return experts, gates

    def _gate(self, rng, tables: _LayerTables, block: np.ndarray, rows: np.ndarray):
        # In double precision, rounded once when stored: numpy's single-precision log and exp differ in the last
        # bit between CPUs (their vector code is chosen by the instructions the CPU has), and so would the scores.
        # The order is a stable sort (equal logits by position) for the same reason.
        uniform = rng.random(rows.shape, dtype=np.float32).astype(np.float64)
        gumbel = -np.log(-np.log(uniform + 1e-12))
        num_experts = tables.log_p.shape[1]
        log_p = tables.log_p.ravel()[block[:, None] * num_experts + rows].astype(np.float64)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            logits = (log_p + gumbel) / self.params.gate_temperature
            k = rows.shape[1]
            order = np.argsort(-logits, axis=1, kind="stable") + (np.arange(len(rows)) * k)[:, None]
            logits = logits.ravel()[order]
            weights = np.exp(logits - logits[:, :1])
            weights /= weights.sum(axis=1, keepdims=True)
        if not np.isfinite(weights).all():
            # A temperature so small that the logits overflow: refuse before a file appears.
            raise TierflowError(f"generator parameter gate_temperature={self.params.gate_temperature} is too small: "
                                f"the gate scores overflow (use a larger value)")
        return rows.ravel()[order], weights


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _sample_rows(rng, probabilities: np.ndarray) -> np.ndarray:
    """One categorical draw per row of a probability matrix."""
    cumulative = np.cumsum(probabilities, axis=1)
    u = rng.random(len(probabilities)) * cumulative[:, -1]
    return (cumulative < u[:, None]).sum(axis=1)


# ----------------------------------------------------------------------------------------------- blocks

# Whole sequences are grouped into blocks of at least this many tokens; blocks are independent (own random
# stream, no state crosses them), so they can be routed in parallel. A block much longer than this (one
# very long sequence) is routed in the calling process, chunk by chunk, to keep memory bounded.
_BLOCK_TOKENS = 12288
_INLINE_BLOCK_TOKENS = 4 * _BLOCK_TOKENS


@attrs.frozen
class _BlockPlan:
    lengths: np.ndarray  # tokens per sequence
    topics: np.ndarray  # topic per sequence
    sequence_of_token: np.ndarray
    token_index: np.ndarray
    token_bounds: np.ndarray  # block b covers tokens [token_bounds[b], token_bounds[b + 1])

    @classmethod
    def build(cls, lengths: np.ndarray, topics: np.ndarray) -> _BlockPlan:
        ends = np.cumsum(lengths)
        bounds, filled = [0], 0
        for end in ends.tolist():
            if end - filled >= _BLOCK_TOKENS:
                bounds.append(end)
                filled = end
        if bounds[-1] != ends[-1]:
            bounds.append(int(ends[-1]))
        sequence_of_token = np.repeat(np.arange(len(lengths)), lengths)
        token_index = np.arange(int(ends[-1])) - np.repeat(ends - lengths, lengths)
        return cls(lengths, topics, sequence_of_token, token_index, np.array(bounds))

    @property
    def num_blocks(self) -> int:
        return len(self.token_bounds) - 1

    def token_range(self, block: int) -> tuple[int, int]:
        return int(self.token_bounds[block]), int(self.token_bounds[block + 1])

    def routed_inline(self, block: int) -> bool:
        lo, hi = self.token_range(block)
        return hi - lo > _INLINE_BLOCK_TOKENS


_FORKED: tuple[RoutingModel, _BlockPlan] | None = None  # what a worker process routes blocks of


def _adopt(model: RoutingModel, plan: _BlockPlan) -> None:
    global _FORKED
    _FORKED = (model, plan)


def _route_block_in_worker(block: int):
    model, plan = _FORKED
    parts = list(model.route_block(plan, block))
    return tuple(np.concatenate([part[i] for part in parts]) for i in range(len(parts[0])))


class _BlockRouter:
    """Routes a plan's blocks in order, on ``workers`` processes when there is more than one block."""

    def __init__(self, model: RoutingModel, plan: _BlockPlan, workers: int):
        self.model, self.plan = model, plan
        parallel = [b for b in range(plan.num_blocks) if not plan.routed_inline(b)]
        self.workers = min(workers, len(parallel))
        self._pool = None
        if self.workers > 1:
            # Forked workers inherit the model's tables (initargs are not pickled under fork).
            self._pool = new_pool(self.workers, _adopt, (model, plan), multiprocessing.get_context("fork"))

    def __iter__(self):
        if self._pool is None:
            for block in range(self.plan.num_blocks):
                yield from self.model.route_block(self.plan, block)
            return
        queued = iter([b for b in range(self.plan.num_blocks) if not self.plan.routed_inline(b)])
        futures: dict[int, concurrent.futures.Future] = {}

        def top_up():
            while len(futures) < 2 * self.workers and (block := next(queued, None)) is not None:
                futures[block] = self._pool.submit(_route_block_in_worker, block)

        with signals_held():  # the first submit forks the workers
            top_up()
        for block in range(self.plan.num_blocks):
            top_up()
            if self.plan.routed_inline(block):
                yield from self.model.route_block(self.plan, block)
            else:
                yield futures.pop(block).result()

    def close(self, abort: bool = False):
        """Stop the workers: after the blocks they are routing, or at once when ``abort`` (an error or a
        signal: nothing more will be read)."""
        if self._pool is None:
            return
        if abort:
            terminate_pool(self._pool)
        else:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(abort=exc_type is not None)


# ----------------------------------------------------------------------------------------------- entry points


def generator_bytes(num_layers: int, num_experts: int, num_tokens: int, num_sequences: int,
                    params: SynthParams) -> int:
    """Memory the generator holds before it draws: every layer's tables for each (topic, state) block (the
    distribution and its cdf in float64, the log-probabilities in float32, the urn of expert ids), one layer's
    temporaries while they are built (about ten float64 arrays of a block's experts), the plan (four numbers a
    token) and the embeddings."""
    blocks = params.num_topics * params.num_states
    urn = _URN_SIZE * np.dtype(expert_dtype(num_experts)).itemsize
    return (num_layers * blocks * (20 * num_experts + urn) + blocks * 80 * num_experts
            + 8 * (num_tokens * 4 + (num_sequences + params.num_topics) * params.embedding_dim))


def _prepare(num_layers, num_experts, top_k, num_tokens, num_sequences, seed, params, record_states=False):
    num_sequences = num_sequences or max(1, math.ceil(num_tokens / params.tokens_per_sequence))
    from tierflow.workload import check_fits_memory

    check_fits_memory(generator_bytes(num_layers, num_experts, num_tokens, num_sequences, params),
                      "the generator's tables and plan", "--tokens, num_topics, num_states, embedding_dim")
    model = RoutingModel(num_layers, num_experts, top_k, params, seed, record_states)
    lengths, topics = model.sequences(num_tokens, num_sequences)
    return model, _BlockPlan.build(lengths, topics)


def generate_arrays(num_layers, num_experts, top_k, num_tokens, *, num_sequences=None, seed=0,
                    params: SynthParams | None = None, workers: int = 1, with_states: bool = False):
    """Generate a whole trace in memory. Returns a dict with experts, gate_scores, sequence_id, token_index,
    topic (per sequence) and embedding (per sequence). For tests and calibration; files use :func:`generate`.

    ``with_states`` adds ``state`` (tokens, layers): each token's latent routing state at each layer, the hidden
    variable an analysis of what an online policy could infer needs (scripts/cache_ceiling.py). The routing
    is identical with or without it."""
    params = params or ROUTING_PROFILES["fine_grained"]
    model, plan = _prepare(num_layers, num_experts, top_k, num_tokens, num_sequences, seed, params, with_states)
    with _BlockRouter(model, plan, workers) as router:
        parts = list(router)
    extra = {"state": np.concatenate([c[4] for c in parts])} if with_states else {}
    return {**extra,
        "experts": np.concatenate([c[0] for c in parts]),
        "gate_scores": np.concatenate([c[1] for c in parts]),
        "sequence_id": np.concatenate([c[2] for c in parts]),
        "token_index": np.concatenate([c[3] for c in parts]),
        "topic": plan.topics,
        "embedding": model.embeddings(plan.topics),
    }


def generate(model_name: str, num_tokens: int, out, *, sequences: int | None = None, seed: int = 0,
             params: SynthParams | None = None, workers: int | None = None, progress=None):
    """Write a synthetic trace for a catalog model to ``out`` (atomically); returns the topics per sequence.

    ``workers`` processes route blocks of whole sequences in parallel (default: all cores); the file is the
    same whatever their number. ``progress`` (if given) is called with the tokens of each block routed.
    """
    from tierflow.catalog import get_model

    spec = get_model(model_name)
    params = params or SynthParams.for_model(spec.name)
    model, plan = _prepare(spec.num_moe_layers, spec.num_routed_experts, spec.top_k, num_tokens, sequences,
                           seed, params)
    source = (f"tierflow synthetic: profile={routing_profile(spec.name)} seed={seed} "
              + " ".join(f"{k}={v}" for k, v in attrs.asdict(params).items()))
    # The worker processes are forked before the writer thread starts. Compression runs in that thread
    # (h5py releases the GIL while HDF5 compresses), overlapping the routing of the next chunk; at most one
    # chunk waits, so memory stays bounded.
    with sigterm_unwinds(), _BlockRouter(model, plan, workers or os.cpu_count() or 1) as router, \
            TraceWriter(out, model=spec.name, num_layers=spec.num_moe_layers, num_experts=spec.num_routed_experts,
                        top_k=spec.top_k, source=source, with_gate_scores=True, with_token_index=True) as writer, \
            concurrent.futures.ThreadPoolExecutor(max_workers=1) as write_thread:
        pending = None
        for experts, gates, seq, index in router:
            if pending is not None:
                pending.result()
            pending = write_thread.submit(writer.append, experts, seq, gate_scores=gates, token_index=index)
            if progress is not None:
                progress(len(experts))
        if pending is not None:
            pending.result()
        writer.set_embeddings(model.embeddings(plan.topics))
    return plan.topics


def engine_steps(sequence_id: np.ndarray, concurrent: int):
    """The rows of a trace stored request after request, grouped as a serving engine would decode them: up to
    ``concurrent`` requests side by side, each engine step taking one token of every running request (in the
    order they joined), a waiting request joining as soon as one ends. Yields one list of row indices per step.
    """
    if concurrent < 1:
        raise TierflowError(f"concurrent requests must be at least 1, got {concurrent}")
    sequence_id = np.asarray(sequence_id)
    if not len(sequence_id):
        return
    starts = np.flatnonzero(np.r_[True, sequence_id[1:] != sequence_id[:-1]])
    ends = np.r_[starts[1:], len(sequence_id)]
    if len(starts) != len(np.unique(sequence_id)):
        ids, runs = np.unique(sequence_id[starts], return_counts=True)
        twice = ids[runs.argmax()]
        raise TierflowError(f"the trace does not store each request's tokens together (sequence {twice} comes "
                            f"back after others): its requests are interleaved already")
    queue = list(zip(starts.tolist(), ends.tolist(), strict=True))
    queue.reverse()  # popped from the end: the first request first
    running: list[list[int]] = []
    while queue or running:
        while queue and len(running) < concurrent:
            running.append(list(queue.pop()))
        yield [row for row, _ in running]
        for request in running:
            request[0] += 1
        running = [request for request in running if request[0] < request[1]]


def engine_order(sequence_id: np.ndarray, concurrent: int) -> np.ndarray:
    """The rows of :func:`engine_steps` in one array: the token order a serving log shows (a permutation)."""
    steps = list(engine_steps(sequence_id, concurrent))
    return np.concatenate(steps).astype(np.int64) if steps else np.empty(0, dtype=np.int64)
