"""Training the learned policy on the true future (``tierflow train-policy``).

Belady evicts the resident key whose next use is farthest. The network learns what an online policy can know
of that future: each training trace is replayed at several capacities, in both scopes, and at a random sample
of eviction decisions every resident candidate becomes one example: its features as the learned policy computes
them at that moment, and as targets whether its true next use comes within each horizon of
:data:`~tierflow.cache.learned.HORIZONS_STEPS` (one binary label per horizon: a survival curve of its time to
next use). The network is fitted to the examples by binary cross-entropy with Adam (numpy only, deterministic
for a seed).

Which policy drives the cache while the decisions are sampled matters (imitation learning's distribution
shift): under Belady itself the cache holds only keys with a near future, states the learned policy never
reaches. The first round of sampling is driven by LRU, whose cache states are like the learned policy's; with
``rounds > 1`` each further round is driven by the learned policy with the weights of the round before, and the
examples of all rounds are fitted together (DAgger). The labels are the true future either way.
docs/cache-policies.md gives the measurements behind these choices.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np

from tierflow.cache.base import CacheContext, Policy, TierCache, make_policy
from tierflow.cache.learned import (
    HORIZONS_STEPS,
    NUM_FEATURES,
    ExpertFeatures,
    Learned,
    Scorer,
    steps_to_next_use,
)
from tierflow.cache.scope import SCOPES, LayeredCache
from tierflow.errors import TierflowError


class _Recorder(Policy):
    """A driving policy, watched: the learned policy's features are kept beside it, and at a sample of its
    eviction decisions every candidate becomes an example labelled with its true time to next use."""

    clock = Learned.clock  # the learned policy's time base, so that features match
    token = Learned.token

    def __init__(self, driver: Policy, rng: np.random.Generator, sample_rate: float, max_candidates: int,
                 sink: list):
        super().__init__(None, driver.context)
        context = driver.context
        self.driver = driver
        self.features = ExpertFeatures(context.num_layers, context.capacity_items / context.requests_per_step)
        self.rng, self.sample_rate, self.max_candidates, self.sink = rng, sample_rate, max_candidates, sink
        self.accesses_per_step = context.num_layers * context.top_k

    def on_insert(self, key, access):
        self.driver.on_insert(key, access)
        self.features.observe(key, access, self.clock(access))

    def on_hit(self, key, access):
        self.driver.on_hit(key, access)
        self.features.observe(key, access, self.clock(access))

    def on_remove(self, key):
        self.driver.on_remove(key)
        self.features.remove(key)

    def victim(self, evictable, access):
        if self.rng.random() < self.sample_rate:
            features = self.features
            slots = features.resident_slots()
            # Ranks need every resident.
            rows = features.rows(slots, self.clock(access), self.token(access), access.current_layer,
                                 access.sequence)
            pick = np.arange(len(slots))
            if len(slots) > self.max_candidates:
                pick = self.rng.choice(len(slots), self.max_candidates, replace=False)
            targets = steps_to_next_use(features.table[slots[pick], features.NEXT_USE], access.time,
                                        self.accesses_per_step)
            self.sink.append((rows[pick], targets))
        return self.driver.victim(evictable, access)


def _runs(requests, capacity_fractions, scopes, drivers) -> list[tuple[str, int, tuple[str, dict | None]]]:
    """(scope, capacity, driver) of each replay that samples decisions; a capacity that holds the whole pool
    never evicts and is left out."""
    runs = []
    for driver in drivers:
        for scope in scopes:
            for fraction in capacity_fractions:
                pool_experts = requests.num_experts * (requests.num_layers if scope == "global" else 1)
                capacity = max(requests.top_k, round(fraction * pool_experts))
                if capacity < pool_experts:
                    runs.append((scope, capacity, driver))
    return runs


def collect_examples(requests, capacity_fractions: Sequence[float] = (0.05, 0.1, 0.25, 0.5),
                     scopes: Sequence[str] = SCOPES, *, seed: int = 0,
                     examples_per_run: int = 100_000, max_candidates: int = 64,
                     drivers: Sequence[tuple[str, dict | None]] = (("lru", None),), progress=None):
    """(features, steps to next use, decision) from eviction decisions on one trace's requests, over
    capacities, scopes and driving policies: one row per candidate, ``decision`` numbering its decision.
    ``progress`` (if given) is called with the accesses replayed (see :func:`tierflow.replay.drive`)."""
    from tierflow.replay import drive

    rng = np.random.default_rng(seed)
    rows, targets, groups = [], [], []
    decisions = 0
    for scope, capacity, (driver, driver_params) in _runs(requests, capacity_fractions, scopes, drivers):
        sink: list = []
        # Roughly examples_per_run examples: one decision per miss at most, max_candidates each.
        expected_decisions = max(1.0, 0.5 * len(requests))
        sample_rate = min(1.0, examples_per_run / (max_candidates * expected_decisions))
        cache = _recording_cache(requests, scope, capacity, (driver, driver_params), rng, sample_rate,
                                 max_candidates, sink)
        drive(cache, requests, progress, future=True)  # the labels; the driving policy does not read them
        for decision_rows, decision_targets in sink:
            rows.append(decision_rows)
            targets.append(decision_targets)
            groups.append(np.full(len(decision_rows), decisions))
            decisions += 1
    if not rows:
        return np.empty((0, NUM_FEATURES)), np.empty(0), np.empty(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(targets), np.concatenate(groups)


def _recording_cache(requests, scope, capacity, driver, rng, sample_rate, max_candidates, sink):
    name, params = driver

    def recorded(budget):
        context = CacheContext(budget, requests.num_layers, requests.num_experts, requests.top_k,
                               pool_layers=requests.num_layers if scope == "global" else 1,
                               router_scores=requests.scores is not None)
        policy = _Recorder(make_policy(name, params, context), rng, sample_rate, max_candidates, sink)
        return TierCache(policy, budget)

    if scope == "global":
        return recorded(capacity)
    return LayeredCache([recorded(capacity) for _ in range(requests.num_layers)], requests.num_experts)


@attrs.frozen
class TrainingReport:
    examples: int
    decisions: int
    epochs: int
    rounds: int
    train_loss: float


def fit_scorer(features: np.ndarray, steps_to_next: np.ndarray, *, horizons=HORIZONS_STEPS, hidden: int = 32,
               epochs: int = 6, learning_rate: float = 2e-3, batch: int = 2048,
               seed: int = 0) -> tuple[Scorer, float]:
    """Fit the scorer network with Adam, deterministically for a seed: for every horizon, binary cross-entropy
    between its output and whether the example's next use comes within the horizon. Returns the scorer and
    the last epoch's mean loss per example and horizon."""
    if len(features) == 0:
        raise ValueError("no training examples")
    rng = np.random.default_rng(seed)
    horizons = np.asarray(horizons, dtype=np.float64)
    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6
    x = (features - mean) / scale
    labels = (steps_to_next[:, None] <= horizons[None, :]).astype(np.float64)
    w1 = rng.normal(0.0, np.sqrt(2.0 / NUM_FEATURES), (NUM_FEATURES, hidden))
    b1 = np.zeros(hidden)
    w2 = rng.normal(0.0, np.sqrt(1.0 / hidden), (hidden, len(horizons)))
    rate = labels.mean(axis=0).clip(1e-4, 1 - 1e-4)
    b2 = np.log(rate / (1 - rate))
    params = [w1, b1, w2, b2]
    moment1 = [np.zeros_like(p) for p in params]
    moment2 = [np.zeros_like(p) for p in params]
    beta1, beta2, step = 0.9, 0.999, 0
    total = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        total = 0.0
        for first in range(0, len(order), batch):
            pick = order[first:first + batch]
            xb, yb = x[pick], labels[pick]
            pre = xb @ w1 + b1
            hidden_out = np.maximum(pre, 0.0)
            logits = hidden_out @ w2 + b2
            # log(1 + e^z) - y z, and its gradient sigmoid(z) - y, computed stably.
            total += float((np.logaddexp(0.0, logits) - yb * logits).sum())
            grad_out = (1.0 / (1.0 + np.exp(-np.clip(logits, -30, 30))) - yb) / (len(pick) * len(horizons))
            grad_hidden = (grad_out @ w2.T) * (pre > 0)
            grads = [xb.T @ grad_hidden, grad_hidden.sum(axis=0), hidden_out.T @ grad_out, grad_out.sum(axis=0)]
            step += 1
            for p, g, m, v in zip(params, grads, moment1, moment2, strict=True):
                m *= beta1
                m += (1 - beta1) * g
                v *= beta2
                v += (1 - beta2) * g * g
                p -= learning_rate * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + 1e-8)
    return Scorer(mean, scale, w1, b1, w2, b2, horizons), total / (len(x) * len(horizons))


def training_accesses(requests_list, capacity_fractions=(0.05, 0.1, 0.25, 0.5), rounds: int = 1,
                      later_tokens: int | None = None) -> int:
    """The accesses :func:`train` replays in all (what its ``progress`` callback counts to)."""
    total = 0
    for round_index in range(rounds):
        for requests in requests_list:
            if round_index and later_tokens:
                requests = _first_tokens(requests, later_tokens)
            total += len(requests) * len(_runs(requests, capacity_fractions, SCOPES, ((None, None),)))
    return total


def train(requests_list, out, *, capacity_fractions=(0.05, 0.1, 0.25, 0.5), driver: str = "lru",
          rounds: int = 1, later_tokens: int | None = None, epochs: int = 6, hidden: int = 32, seed: int = 0,
          sources=(), progress=None) -> TrainingReport:
    """Sample eviction decisions on every trace, fit the scorer, write ``out``. The first round's cache is
    driven by ``driver``; each further round's by the learned policy with the previous round's weights, on
    each trace's first ``later_tokens`` tokens (all when None). ``progress`` (if given) is called with the
    accesses replayed, :func:`training_accesses` in all."""
    features, targets, decisions = [], [], 0
    scorer, loss = None, float("nan")
    with tempfile.TemporaryDirectory(prefix="tierflow-train-") as work:  # each round's weights, for the next
        for round_index in range(rounds):
            if round_index == 0:
                drivers = ((driver, None),)
            else:
                previous = Path(work) / f"round{round_index}.npz"
                scorer.save(previous)
                drivers = (("learned", {"weights": str(previous)}),)
            for i, requests in enumerate(requests_list):
                if round_index and later_tokens:
                    requests = _first_tokens(requests, later_tokens)
                f, t, g = collect_examples(requests, capacity_fractions, seed=seed + 1000 * round_index + i,
                                           drivers=drivers, progress=progress)
                features.append(f)
                targets.append(t)
                decisions += int(g.max()) + 1 if len(g) else 0
            if not sum(len(f) for f in features):
                raise TierflowError("no eviction decisions to learn from: the traces end before a cache of the "
                                    "smallest --fractions size fills (use longer traces or larger fractions)")
            scorer, loss = fit_scorer(np.concatenate(features), np.concatenate(targets), hidden=hidden,
                                      epochs=epochs, seed=seed)
    scorer.save(out, sources=np.array(list(sources) or ["unnamed"]), seed=seed, driver=driver, rounds=rounds,
                capacity_fractions=np.array(capacity_fractions))
    return TrainingReport(sum(len(f) for f in features), decisions, epochs, rounds, loss)


def _first_tokens(requests, tokens: int):
    """The accesses of a trace's first ``tokens`` tokens."""
    end = tokens * requests.num_layers * requests.top_k
    scores = requests.scores[:end] if requests.scores is not None else None
    sequences = requests.sequences[:end] if requests.sequences is not None else None
    return attrs.evolve(requests, keys=requests.keys[:end], steps=requests.steps[:end], scores=scores,
                        sequences=sequences)

