"""How much of LRU's gap to Belady could any online eviction policy close on a synthetic trace?

    python scripts/cache_ceiling.py [--trace deepseek|mixtral] [--tokens N] [--seed S] [--rules h2,h4,h8,eut]
                                    [--fractions 0.1,0.25,0.5] [--scopes global,per-layer] [--ablate topic,state,reuse]

Belady knows the realised future; no online policy can. This script measures an *informed* policy in between:
it is given the generator's hidden variables that an online policy cannot observe (each sequence's topic, the
current token's routing state, the routing tables of the model that drew the trace), but not the realised
future. From them it computes, for every resident expert, the true probability of its use at each coming
visit of its layer, and evicts the expert least likely to be used within a horizon (rules ``hN``: N decode
steps; ``hcap``: the cache's capacity in steps of requests, at least two, the learned policy's horizon), the
one with the latest expected next use (``eut``), or the one with the lowest hit density (``density``: the best
``P(use within h) / h`` over horizons of 1 to 32 steps, after LHD). Its share of LRU's gap to Belady estimates what is
learnable from the trace at all; if it is small, so is any online policy's.

The probabilities follow src/tierflow/trace/synth.py exactly where they can:

* routing state: known for the current token; for later tokens of the sequence a Markov chain (kept with
  probability ``state_persistence``, else drawn afresh from the topic's state mix), as the generator does;
  both calibrated profiles have no cross-layer affinity, so one state holds for every layer of a token;
* each slot re-selects the previous token's expert with probability ``reuse``: an expert in the last realised
  row of its layer (in the same sequence) is used at the next visit with at least that probability; a use by
  a fresh draw has probability ``(1 - reuse) * pi``, with ``pi`` the chance that the expert is among the
  ``top_k`` distinct draws of the (topic, state) block's distribution (successive sampling, by the usual
  approximation ``pi = 1 - exp(-a p)`` with ``a`` fixed by ``sum(pi) = top_k``);
* a sequence's first token draws every slot afresh, its state from its topic's mix; the next sequence's
  topic is given to the policy too;
* replay serves a row slot by slot: an expert of the current layer not yet used in this token can only be
  among the row's remaining slots, a share ``slots_left / top_k`` of it. ``--whole-row`` credits it with the
  whole row instead: the less exact probability, but the better policy in most cells (docs/cache-policies.md
  gives both; the figures there come from the variant and horizon each cell names).

Two approximations: collisions between copied and fresh slots (re-drawn by the generator) are ignored, and a
fresh draw's state is taken to be the visit's own. The visits of one expert are not independent (the state
persists): the survival probabilities come from the state chain by backward recursion, not from a product.
Ablations drop one hidden quantity: ``topic`` (the topic-averaged tables), ``state`` (the current state
replaced by its topic's mix), ``reuse`` (whether the expert was in the last row is ignored).

The Mixtral trace is replayed as the fixture's engine ran it (scripts/make_mixtral_fixture.py: four requests
side by side, their tokens interleaved). A layer's coming visits are then rows of several requests, each of
which continues its own routing (its topic, its latest realised token's state and row) or starts afresh within
the horizon; the chance of no use is the product of each request's, from the same tables. Only the horizon rules
(``hN``, ``hcap``, ``density``) are computed for such a replay, not ``eut``.

The policy is an analysis tool, not a registered cache policy: it reads the generator's hidden variables.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import attrs  # noqa: E402
import numpy as np  # noqa: E402

from tierflow.cache.base import Access, CacheContext, Policy, TierCache  # noqa: E402
from tierflow.cache.scope import LayeredCache  # noqa: E402
from tierflow.catalog import get_model  # noqa: E402
from tierflow.replay import Requests, lru_hits, replay  # noqa: E402
from tierflow.trace.synth import RoutingModel, SynthParams, engine_order, generate_arrays  # noqa: E402

DENSITY_HORIZONS = (1, 2, 4, 8, 16, 32)
MAX_VISITS = 64  # survival probabilities are tabulated up to this many visits of a layer (decode steps)
TRACES = {  # name -> (catalog model, tokens, seed, requests side by side): the results table's two traces
    "deepseek": ("deepseek-r1", 2000, 0, 1),
    "mixtral": ("mixtral-8x7b", 10_000, 7, 4),  # scripts/make_mixtral_fixture.py's engine: four at a time
}


# ----------------------------------------------------------------------------------------------- hidden state


@attrs.frozen(eq=False)
class Hidden:
    """A regenerated trace with the hidden variables the generator drew it from."""

    experts: np.ndarray  # (tokens, L, k)
    gate_scores: np.ndarray
    sequence_id: np.ndarray  # (tokens,)
    state: np.ndarray  # (tokens,) routing state (the same at every layer: no cross-layer affinity)
    topic: np.ndarray  # (sequences,)
    model: RoutingModel
    interleave: int = 1  # requests decoding side by side in the replay (1: one after another, as generated)

    @property
    def requests(self) -> Requests:
        stored = Requests.from_experts(self.experts, self.model.num_experts, self.gate_scores,
                                       sequence_id=self.sequence_id)
        return stored.tokens_in_order(self.order)

    @property
    def order(self) -> np.ndarray:
        """The generated token behind each replayed row."""
        return engine_order(self.sequence_id, self.interleave)


def regenerate(model_name: str, tokens: int, seed: int, interleave: int = 1) -> Hidden:
    """The trace ``tierflow trace gen`` writes for these arguments (the Mixtral fixture is the same routing
    imported, replayed with ``interleave`` requests side by side), with its hidden variables."""
    spec = get_model(model_name)
    params = SynthParams.for_model(spec.name)
    if params.affinity != 0.0:
        raise SystemExit("the informed policy assumes no cross-layer affinity (one state per token)")
    arrays = generate_arrays(spec.num_moe_layers, spec.num_routed_experts, spec.top_k, tokens, seed=seed,
                             params=params, with_states=True)
    model = RoutingModel(spec.num_moe_layers, spec.num_routed_experts, spec.top_k, params, seed)
    return Hidden(arrays["experts"], arrays["gate_scores"], arrays["sequence_id"], arrays["state"][:, 0],
                  arrays["topic"], model, interleave)


def inclusion(p: np.ndarray, k: int) -> np.ndarray:
    """P(expert among k distinct successive draws) per row of ``p``: ``1 - exp(-a p)``, ``a`` by Newton so
    that the row sums to k (f(a) is concave and increasing: Newton from below converges monotonically)."""
    a = np.full(p.shape[:-1] + (1,), float(k))
    for _ in range(60):
        e = np.exp(-a * p)
        f = (1.0 - e).sum(axis=-1, keepdims=True) - k
        a = a - f / (p * e).sum(axis=-1, keepdims=True)
    return 1.0 - np.exp(-a * p)


class Tables:
    """Survival tables of one topic: ``C[n, l, s, e]``, the probability that expert e of layer l is not used
    in the n visits of its layer that follow a token in state s (by backward recursion over the state chain),
    with their running sums, and ``D[n, l, e]`` for the first n visits of a sequence of this topic."""

    def __init__(self, pi: np.ndarray, mix: np.ndarray, reuse: float, persistence: float, max_visits: int):
        # pi: (L, S, E) inclusion probabilities of the topic's blocks; mix: (S,) its state mix.
        miss = 1.0 - (1.0 - reuse) * pi  # a visit of a continuing token does not use the expert (fresh slots)
        miss_first = 1.0 - pi  # a sequence's first token: every slot fresh
        self.miss = miss.astype(np.float32)
        shape = (max_visits + 1,) + pi.shape
        self.C = np.empty(shape, dtype=np.float32)
        self.D = np.empty((max_visits + 1, pi.shape[0], pi.shape[2]), dtype=np.float32)
        c = np.ones(pi.shape)
        self.C[0] = 1.0
        self.D[0] = 1.0
        for n in range(1, max_visits + 1):
            self.D[n] = np.einsum("s,lse->le", mix, miss_first * c)  # first token fresh, then the chain
            b = miss * c  # B_n = miss * C_{n-1}
            c = persistence * b + (1.0 - persistence) * np.einsum("s,lse->le", mix, b)[:, None, :]
            self.C[n] = c
        self.cumC = np.cumsum(self.C, axis=0, dtype=np.float32)  # sum_{j <= n} C_j
        self.cumD = np.cumsum(self.D, axis=0, dtype=np.float32) - 1.0  # sum_{1 <= j <= n} D_j


class Oracle:
    """Probabilities of use from the generator's hidden variables; shared by every cache of one replay."""

    def __init__(self, hidden: Hidden, ablate: Sequence[str] = (), max_visits: int = MAX_VISITS):
        model, params = hidden.model, hidden.model.params
        self.num_layers, self.num_experts, self.top_k = model.num_layers, model.num_experts, model.top_k
        self.reuse, self.max_visits = params.reuse, max_visits
        self.ablate = set(ablate)
        S = params.num_states
        p = np.stack([t.p for t in model.layers]).reshape(model.num_layers, params.num_topics, S, -1)
        mix = model.state_mix
        if "topic" in self.ablate:  # one average topic for every sequence
            p = p.mean(axis=1, keepdims=True)
            mix = mix.mean(axis=0, keepdims=True)
        self._pi = inclusion(p, model.top_k)  # (L, T, S, E)
        self._mix, self._params = mix, params
        self._tables: dict[int, Tables] = {}
        seq = hidden.sequence_id
        tokens = len(seq)
        starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
        ends = np.r_[starts[1:], tokens]
        index = np.searchsorted(starts, np.arange(tokens), side="right") - 1
        topic = hidden.topic if "topic" not in self.ablate else np.zeros_like(hidden.topic)
        self.seq_start = starts[index]
        self.seq_end = ends[index]
        self.topic = topic[seq]
        self.next_topic = np.r_[topic[seq[starts[1:]]], -1][index]  # -1: no next sequence
        self.state = hidden.state.astype(np.int64)
        self.interleave = hidden.interleave
        self.order = hidden.order  # replayed row -> generated token
        self.experts = hidden.experts

    def tables(self, topic: int) -> Tables:
        if topic not in self._tables:
            self._tables[topic] = Tables(self._pi[:, topic], self._mix[topic], self.reuse,
                                         self._params.state_persistence, self.max_visits)
        return self._tables[topic]

    def survival(self, keys: np.ndarray, last_token: np.ndarray, token: int, current_layer: int,
                 visits: int | None, slots_left: int | None = None, generated_order: bool = False) -> np.ndarray:
        """For each key: the probability of no use in the next ``visits`` visits of its layer (from the
        current token's, if the layer is still to come or the key not yet used in it), or with ``visits``
        None the expected decode steps to its next use (truncated at ``max_visits`` visits).

        ``slots_left``: how many of the current layer's ``top_k`` accesses come after the one being served
        (the replay serves a row slot by slot); a key of the current layer not yet used in this token can
        only be among those, a share ``slots_left / top_k`` of the row. None: the whole row.

        ``token`` and ``last_token`` are replayed rows; with ``generated_order`` they are generated tokens and
        the requests are taken one after another whatever the replay order."""
        if self.interleave > 1 and not generated_order:
            return self._survival_side_by_side(keys, last_token, token, current_layer, visits, slots_left)
        E = self.num_experts
        layer, expert = keys // E, keys % E
        later = (layer > current_layer) | ((layer == current_layer) & (last_token != token))
        first = token + (~later)  # the token of the layer's first coming visit
        end = self.seq_end[token]
        horizon = self.max_visits if visits is None else visits
        m = np.clip(end - first, 0, horizon)  # visits within the current sequence
        alive = (last_token == first - 1) & (first - 1 >= self.seq_start[token])
        if "reuse" in self.ablate:
            alive[:] = False
        factor = np.where(alive, 1.0 - self.reuse, 1.0)
        tables = self.tables(int(self.topic[token]))
        at = self._lookup(layer, expert, token)
        # No use in the first j visits of the current sequence: miss * C_{j-1} from the current token,
        # C_j from the next one.
        miss_now = at(tables.miss[None], np.zeros_like(m))
        if slots_left is not None:  # the current layer's row is partly served: only its remaining slots
            share = np.where(layer == current_layer, slots_left / self.top_k, 1.0)
            miss_now = 1.0 - share * (1.0 - factor * miss_now)
            factor = np.where(later, 1.0, factor)  # folded into miss_now for the current visit
        cur_m = np.where(m == 0, 1.0, factor * np.where(later, miss_now * at(tables.C, np.maximum(m - 1, 0)),
                                                        at(tables.C, m)))
        next_topic = int(self.next_topic[token])
        rest = horizon - m
        if visits is not None:
            if next_topic < 0:
                return cur_m
            after = self.tables(next_topic).D[rest, layer, expert]
            return cur_m * after
        # Expected steps: offset to the first visit plus the sum over j of P(no use in the first j visits).
        within = np.where(later, miss_now * at(tables.cumC, np.maximum(m - 1, 0)),
                          at(tables.cumC, m) - 1.0)
        within = np.where(m == 0, 0.0, factor * within)
        after = 0.0 if next_topic < 0 else self.tables(next_topic).cumD[rest, layer, expert]
        offset = (layer - current_layer + np.where(later, 0, self.num_layers)) / self.num_layers
        return offset + within + cur_m * after

    def _lookup(self, layer, expert, token: int):
        """``at(table, n)``: the entries of a ``(visits, layer, state, expert)`` table for these keys, from token
        ``token``'s routing state (its topic's state mix when the state is ablated: unknown)."""
        if "state" in self.ablate:
            weights = self._mix[int(self.topic[token])]
            return lambda table, n: np.einsum("s,rs->r", weights, table[n, layer, :, expert])
        state = self.state[token]
        return lambda table, n: table[n, layer, state, expert]

    def _survival_side_by_side(self, keys, last_row, row, current_layer, visits, slots_left):
        """:meth:`survival` for a replay of requests side by side (``row`` and ``last_row`` are replayed rows):
        the coming visits of a layer are rows of several requests, each continuing its own routing (its topic, its
        latest realised token's state and row) or starting afresh, so the chance of no use is the product over
        the requests of each one's, from the same tables."""
        if visits is None:
            raise SystemExit("with requests side by side only the horizon rules (hN, hcap, density) are computed")
        E = self.num_experts
        layer, expert = keys // E, keys % E
        later = (layer > current_layer) | ((layer == current_layer) & (last_row != row))
        token = int(self.order[row])
        result = np.ones(len(keys))
        for is_later in (True, False):  # the window of coming rows starts at this row or the next
            chosen = later == is_later
            if not chosen.any():
                continue
            start = row if is_later else row + 1
            window = self.order[start:start + visits]
            product = np.ones(int(chosen.sum()))
            l, e = layer[chosen], expert[chosen]
            sequences = self.seq_start[window]
            for first in np.unique(sequences).tolist():
                tokens = window[sequences == first]
                n, head = len(tokens), int(tokens.min())
                tables = self.tables(int(self.topic[head]))
                if head == self.seq_start[head]:  # the request starts in the window: every slot fresh at first
                    product *= tables.D[n, l, e]
                    continue
                at = self._lookup(l, e, head if head == token else head - 1)  # the current token's state is given
                alive = (self.experts[head - 1, l] == e[:, None]).any(axis=1) & ("reuse" not in self.ablate)
                factor = np.where(alive, 1.0 - self.reuse, 1.0)
                if head != token:
                    product *= factor * at(tables.C, n)
                    continue
                miss_now = factor * at(tables.miss[None], 0)  # the current token's visit
                if slots_left is not None:
                    share = np.where(l == current_layer, slots_left / self.top_k, 1.0)
                    miss_now = 1.0 - share * (1.0 - miss_now)
                product *= miss_now * at(tables.C, n - 1)
            result[chosen] = product
        return result


# ----------------------------------------------------------------------------------------------- the policy


class Informed(Policy):
    """Evict the resident least likely to be used within ``visits`` visits of its layer (or with the latest
    expected next use when ``visits`` is None), by the oracle's probabilities. Ranks all residents at once and
    evicts in that order until the ranking goes stale (:meth:`_moment`) or ``rerank_every`` evictions have
    been made, skipping keys accessed since the ranking."""

    def __init__(self, context: CacheContext, oracle: Oracle, rule: str, rerank_every: int,
                 rerank_at_layers: bool = True, slot_share: bool = True):
        super().__init__(None, context)
        self.oracle = oracle
        capacity_steps = context.capacity_items / context.requests_per_step
        if rule in ("eut", "density"):
            self.visits = None
        elif rule == "hcap":
            self.visits = max(2, round(capacity_steps))
        else:
            self.visits = int(rule.removeprefix("h"))
        self.rule, self.rerank_every = rule, rerank_every
        size = context.num_layers * context.num_experts
        self.last_token = np.full(size, -(1 << 40), dtype=np.int64)
        self.version = np.zeros(size, dtype=np.int64)
        self.resident: dict[int, None] = {}
        self._ranked: list[int] = []
        self._versions: list[int] = []
        self._left = 0
        self._ranked_at: tuple = ()
        self._per_layer = context.pool_layers == 1
        self._at_layers, self._slot_share = rerank_at_layers, slot_share

    def on_insert(self, key, access):
        self.resident[key] = None
        self._touch(key, access)

    def on_hit(self, key, access):
        self._touch(key, access)

    def _touch(self, key, access):
        self.last_token[key] = access.step
        self.version[key] += 1

    def on_remove(self, key):
        del self.resident[key]

    def ordered_keys(self):
        return self.resident.keys()

    def victim(self, evictable, access):
        for attempt in range(2):
            if attempt or self._left <= 0 or self._ranked_at != self._moment(access):
                self._rank(access)
            while self._ranked:
                key = self._ranked.pop()
                if key in self.resident and self.version[key] == self._versions.pop() and evictable(key):
                    self._left -= 1
                    return key
        return None

    def _moment(self, access) -> tuple:
        """When a ranking goes stale: at each token and layer (in a global pool only at each token when
        ``rerank_at_layers`` is off: large pools are slow to rank), and in a per-layer cache (a few residents,
        cheap to rank) at every access, since the share of the current row still to come changes."""
        if self._per_layer:
            return access.step, access.current_layer, access.time
        return access.step, access.current_layer if self._at_layers else None

    def _rank(self, access):
        keys = np.fromiter(self.resident, dtype=np.int64, count=len(self.resident))
        last, survival = self.last_token[keys], self.oracle.survival
        k = self.context.top_k
        # Replay order: a layer's top-k accesses one after another. Without the slot share, a key of the current
        # layer not yet used in this token is credited with the whole row.
        slots_left = k - 1 - access.time % k if self._slot_share else None
        if self.rule == "density":  # hit density: the best chance of use per step of residency, over horizons
            value = -np.max([(1.0 - survival(keys, last, access.step, access.current_layer, h, slots_left)) / h
                             for h in DENSITY_HORIZONS], axis=0)
        else:
            value = survival(keys, last, access.step, access.current_layer, self.visits, slots_left)
        # Evict first (last in the list) the highest survival or expected time; ties to the least recent.
        order = np.lexsort((-self.last_token[keys], value))
        self._ranked = keys[order].tolist()
        self._versions = self.version[keys[order]].tolist()
        self._left = self.rerank_every or max(1, len(keys) // 64)
        self._ranked_at = self._moment(access)


def informed_hits(requests: Requests, oracle: Oracle, rule: str, capacity: int, scope: str,
                  rerank_every: int = 0, rerank_at_layers: bool = True, slot_share: bool = True) -> int:
    """Hits of the informed policy, replayed access by access as :func:`tierflow.replay.replay_reference`."""
    L, E, k = requests.num_layers, requests.num_experts, requests.top_k
    if scope == "global":
        cache = TierCache(Informed(CacheContext(capacity, L, E, k), oracle, rule, rerank_every, rerank_at_layers,
                                   slot_share), capacity)
    else:
        cache = LayeredCache([TierCache(Informed(CacheContext(capacity, L, E, k, pool_layers=1), oracle, rule,
                                                 rerank_every, slot_share=slot_share), capacity)
                              for _ in range(L)], E)
    access = Access(0, 0)
    steps = requests.steps.tolist()
    lookup, admit = cache.lookup, cache.admit
    for t, key in enumerate(requests.keys.tolist()):
        access.key, access.time, access.step = key, t, steps[t]
        access.layer = access.current_layer = key // E
        if not lookup(key, access):
            admit(key, 1, access)
    return cache.stats.hits


# ----------------------------------------------------------------------------------------------- main


def calibration(hidden: Hidden, oracle: Oracle, sample: int = 4000, seed: int = 0) -> tuple[float, float]:
    """(mean predicted, observed) probability that an expert is used at its layer's next visit, over a random
    sample of (token, layer, expert): a check that the oracle's probabilities match the generator."""
    rng = np.random.default_rng(seed)
    tokens, L, _ = hidden.experts.shape
    E = oracle.num_experts
    t = rng.integers(1, tokens - 1, sample)
    layer = rng.integers(0, L, sample)
    expert = rng.integers(0, E, sample)
    # Half the sample among the experts of the previous row, where reuse matters.
    half = sample // 2
    expert[:half] = hidden.experts[t[:half] - 1, layer[:half], rng.integers(0, hidden.experts.shape[2], half)]
    used_before = (hidden.experts[t - 1, layer] == expert[:, None]).any(axis=1)
    predicted = np.empty(sample)
    for i in range(sample):  # at token t, layer 0 computing, key at a later layer: first visit is token t
        last = np.array([t[i] - 1 if used_before[i] else -10])
        keys = np.array([layer[i] * E + expert[i]])
        predicted[i] = 1.0 - oracle.survival(keys, last, int(t[i]), -1, 1, generated_order=True)[0]
    observed = (hidden.experts[t, layer] == expert[:, None]).any(axis=1)
    return float(predicted.mean()), float(observed.mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", choices=sorted(TRACES), default="deepseek")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--rules", default="h2,h4,h8,h16,eut,density")
    parser.add_argument("--fractions", default="0.1,0.25,0.5")
    parser.add_argument("--scopes", default="global,per-layer")
    parser.add_argument("--ablate", default="", help="comma-separated: topic, state, reuse")
    parser.add_argument("--rerank-every", type=int, default=0,
                        help="evictions between rankings at most (0: one ranking per 64 residents)")
    parser.add_argument("--whole-row", action="store_true",
                        help="credit a current-layer key not yet used in this token with the whole row, not only "
                             "the share of it still to come")
    parser.add_argument("--global-rerank", choices=("layer", "token"), default="layer",
                        help="a global pool ranks again at each layer (default) or only at each token")
    args = parser.parse_args(argv)
    model_name, tokens, seed, interleave = TRACES[args.trace]
    tokens = args.tokens or tokens
    seed = seed if args.seed is None else args.seed
    hidden = regenerate(model_name, tokens, seed, interleave)
    oracle = Oracle(hidden, [a for a in args.ablate.split(",") if a])
    requests = hidden.requests
    predicted, observed = calibration(hidden, oracle)
    print(f"{model_name} seed {seed}, {tokens} tokens, {len(requests):,} accesses, {interleave} request(s) side by "
          f"side; ablated: {args.ablate or 'none'}")
    print(f"calibration: predicted P(use at next visit) {predicted:.4f}, observed {observed:.4f}")
    rules = args.rules.split(",")
    print("| scope | capacity | lru | belady | " + " | ".join(f"{r} (closed)" for r in rules) + " |")
    for scope in args.scopes.split(","):
        pool = requests.num_experts * (requests.num_layers if scope == "global" else 1)
        for fraction in (float(f) for f in args.fractions.split(",")):
            capacity = round(fraction * pool)
            if capacity < requests.top_k:
                continue
            n = len(requests)
            lru = lru_hits(requests, [capacity], scope)[0] / n
            belady = replay(requests, "belady", [capacity], scope)[0].hit_rate
            cells = []
            for rule in rules:
                start = time.perf_counter()
                rate = informed_hits(requests, oracle, rule, capacity, scope, args.rerank_every,
                                     args.global_rerank == "layer", not args.whole_row) / n
                closed = (rate - lru) / (belady - lru) if belady > lru else math.nan
                cells.append(f"{rate:.3f} ({closed:.0%})")
                print(f"  {scope} {capacity} {rule}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            print(f"| {scope} | {round(fraction * 100)}% ({capacity}) | {lru:.3f} | {belady:.3f} | "
                  + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
