"""Training the learned policy to imitate Belady's MIN (``tierflow train-policy``).

Belady evicts the resident key whose next use is farthest. The network learns that ranking: each training
trace is replayed at several capacities, in both scopes, and at a random sample of eviction decisions every
resident candidate becomes one example: its features as the learned policy computes them at that moment, and
as target the ``log2`` of the steps until its true next use (what Belady ranks by). The network is fitted to
the examples by mean squared error with Adam (numpy only, deterministic for a seed).

Which policy drives the cache while the decisions are sampled matters (imitation learning's distribution
shift): under Belady itself the cache holds only keys with a near future, states the learned policy never
reaches, and a network trained there ranks the learned policy's own cache contents badly. The default
driver is therefore LRU, whose cache states are like the learned policy's; the labels are Belady's either way
(the true future). docs/cache-policies.md gives the measurements behind this choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from tierflow.cache.base import CacheContext, Policy, TierCache, make_policy
from tierflow.cache.learned import NUM_FEATURES, ExpertFeatures, Learned, Scorer, log_steps_to_next_use
from tierflow.cache.scope import LayeredCache


class _Recorder(Policy):
    """A driving policy, watched: the learned policy's features are kept beside it, and at a sample of its
    eviction decisions every candidate becomes an example labelled with its true time to next use (the
    quantity Belady ranks by)."""

    clock = Learned.clock  # the learned policy's time base, so that features match

    def __init__(self, driver: Policy, rng: np.random.Generator, sample_rate: float, max_candidates: int,
                 sink: list):
        super().__init__(None, driver.context)
        self.driver = driver
        self.features = ExpertFeatures(driver.context.num_layers)
        self.rng, self.sample_rate, self.max_candidates, self.sink = rng, sample_rate, max_candidates, sink
        self.accesses_per_step = driver.context.num_layers * driver.context.top_k

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
            rows = features.rows(slots, self.clock(access), access.current_layer)  # ranks need every resident
            pick = np.arange(len(slots))
            if len(slots) > self.max_candidates:
                pick = self.rng.choice(len(slots), self.max_candidates, replace=False)
            targets = log_steps_to_next_use(features.table[slots[pick], features.NEXT_USE], access.time,
                                            self.accesses_per_step)
            self.sink.append((rows[pick], targets))
        return self.driver.victim(evictable, access)


def collect_examples(requests, capacity_fractions: Sequence[float] = (0.05, 0.1, 0.25, 0.5),
                     scopes: Sequence[str] = ("global", "per-layer"), *, seed: int = 0,
                     examples_per_run: int = 100_000, max_candidates: int = 64,
                     drivers: Sequence[tuple[str, dict | None]] = (("lru", None),)):
    """(features, targets, decision) from eviction decisions on one trace's requests, over capacities, scopes
    and driving policies: one row per candidate, ``decision`` numbering the decision it belongs to."""
    from tierflow.replay import next_use

    rng = np.random.default_rng(seed)
    following = next_use(requests.keys)
    next_uses = np.where(following < 0, np.inf, following).tolist()
    scores = requests.scores.tolist() if requests.scores is not None else [0.0] * len(requests)
    steps = requests.steps.tolist()
    keys = requests.keys.tolist()
    rows, targets, groups = [], [], []
    decisions = 0
    runs = [(scope, fraction, driver) for driver in drivers for scope in scopes for fraction in capacity_fractions]
    for scope, fraction, (driver, driver_params) in runs:
        pool_experts = requests.num_experts * (requests.num_layers if scope == "global" else 1)
        capacity = max(requests.top_k, round(fraction * pool_experts))
        if capacity >= pool_experts:
            continue
        sink: list = []
        # Roughly examples_per_run examples: one decision per miss at most, max_candidates each.
        expected_decisions = max(1.0, 0.5 * len(requests))
        sample_rate = min(1.0, examples_per_run / (max_candidates * expected_decisions))
        cache = _recording_cache(requests, scope, capacity, (driver, driver_params), rng, sample_rate,
                                 max_candidates, sink)
        _replay(cache, keys, steps, scores, next_uses, requests.num_experts)
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
        context = CacheContext(budget, requests.num_layers, requests.num_experts, requests.top_k)
        policy = _Recorder(make_policy(name, params, context), rng, sample_rate, max_candidates, sink)
        return TierCache(policy, budget)

    if scope == "global":
        return recorded(capacity)
    return LayeredCache([recorded(capacity) for _ in range(requests.num_layers)], requests.num_experts)


def _replay(cache, keys, steps, scores, next_uses, num_experts) -> None:
    from tierflow.cache.base import Access

    access = Access(0, 0)
    for time, key in enumerate(keys):
        access.key, access.time, access.step = key, time, steps[time]
        access.layer = access.current_layer = key // num_experts
        access.score, access.next_use = scores[time], next_uses[time]
        if not cache.lookup(key, access):
            cache.admit(key, 1, access)


@attrs.frozen
class TrainingReport:
    examples: int
    decisions: int
    epochs: int
    loss: str
    train_loss: float


def _listwise_gradient(predicted, targets, starts):
    """Softmax cross-entropy over each decision's candidates against Belady's choice (the farthest next use;
    ties share the weight): (loss, d loss / d predicted). ``starts``: where each decision's rows begin."""
    counts = np.diff(np.r_[starts, len(predicted)])
    top = np.repeat(np.maximum.reduceat(predicted, starts), counts)
    weights = np.exp(predicted - top)
    probability = weights / np.repeat(np.add.reduceat(weights, starts), counts)
    chosen = (targets >= np.repeat(np.maximum.reduceat(targets, starts), counts) - 1e-9).astype(np.float64)
    chosen /= np.repeat(np.add.reduceat(chosen, starts), counts)
    loss = -float((chosen * np.log(probability + 1e-12)).sum())
    return loss, probability - chosen


def _pairwise_gradient(predicted, targets, starts, lengths, rng):
    """RankNet loss on random pairs within each decision: the candidate used later should score higher.
    Every row is paired with one random other row of its decision; ties are skipped."""
    group_of_row = np.repeat(np.arange(len(starts)), lengths)
    partner = starts[group_of_row] + (rng.random(len(predicted)) * lengths[group_of_row]).astype(np.int64)
    label = (targets > targets[partner]).astype(np.float64)
    keep = targets != targets[partner]
    margin = predicted - predicted[partner]
    probability = 1.0 / (1.0 + np.exp(-np.clip(margin, -30, 30)))
    loss = -float((keep * (label * np.log(probability + 1e-12) + (1 - label) * np.log(1 - probability + 1e-12))).sum())
    grad_pair = keep * (probability - label)
    grad = grad_pair.copy()
    np.add.at(grad, partner, -grad_pair)
    return loss, grad / max(1, int(keep.sum()))


def fit_scorer(features: np.ndarray, targets: np.ndarray, decisions: np.ndarray | None = None, *,
               loss: str = "regression", hidden: int = 32, epochs: int = 6, learning_rate: float = 2e-3,
               batch: int = 2048, seed: int = 0) -> tuple[Scorer, TrainingReport]:
    """Fit the scorer network with Adam; deterministic for a seed.

    ``regression``: mean squared error on ``log2`` steps to next use. ``listwise``: at each decision, the
    softmax over the candidates' scores should pick Belady's victim (needs ``decisions``).
    """
    if len(features) == 0:
        raise ValueError("no training examples")
    rng = np.random.default_rng(seed)
    mean = features.mean(axis=0)
    scale = features.std(axis=0) + 1e-6
    x = (features - mean) / scale
    y = targets.astype(np.float64)
    if decisions is None:
        decisions = np.arange(len(x))
    starts = np.flatnonzero(np.r_[True, decisions[1:] != decisions[:-1]])
    ends = np.r_[starts[1:], len(x)]
    w1 = rng.normal(0.0, np.sqrt(2.0 / NUM_FEATURES), (NUM_FEATURES, hidden))
    b1 = np.zeros(hidden)
    w2 = rng.normal(0.0, np.sqrt(1.0 / hidden), hidden)
    b2 = np.array(y.mean())
    params = [w1, b1, w2, b2]
    moment1 = [np.zeros_like(p) for p in params]
    moment2 = [np.zeros_like(p) for p in params]
    beta1, beta2, step = 0.9, 0.999, 0
    rows_per_decision = max(1, len(x) // len(starts))
    decisions_per_batch = max(1, batch // rows_per_decision)
    total = 0.0
    for _ in range(epochs):
        order = rng.permutation(len(starts))
        total = 0.0
        for first in range(0, len(order), decisions_per_batch):
            chosen = order[first:first + decisions_per_batch]
            lengths = ends[chosen] - starts[chosen]
            pick = np.repeat(starts[chosen] - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(lengths.sum())
            xb, yb = x[pick], y[pick]
            pre = xb @ w1 + b1
            hidden_out = np.maximum(pre, 0.0)
            predicted = hidden_out @ w2 + b2
            if loss == "listwise":
                batch_loss, grad_out = _listwise_gradient(predicted, yb, np.r_[0, np.cumsum(lengths)[:-1]])
                grad_out = grad_out / len(chosen)
            elif loss == "pairwise":
                batch_loss, grad_out = _pairwise_gradient(predicted, yb, np.r_[0, np.cumsum(lengths)[:-1]],
                                                          lengths, rng)
            else:
                error = predicted - yb
                batch_loss = float(error @ error)
                grad_out = 2.0 * error / len(pick)
            total += batch_loss
            grad_hidden = np.outer(grad_out, w2) * (pre > 0)
            grads = [xb.T @ grad_hidden, grad_hidden.sum(axis=0), hidden_out.T @ grad_out, np.array(grad_out.sum())]
            step += 1
            for p, g, m, v in zip(params, grads, moment1, moment2, strict=True):
                m *= beta1
                m += (1 - beta1) * g
                v *= beta2
                v += (1 - beta2) * g * g
                p -= learning_rate * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + 1e-8)
    per = len(starts) if loss == "listwise" else len(x)
    scorer = Scorer(mean, scale, w1, b1, w2, b2)
    return scorer, TrainingReport(len(x), len(starts), epochs, loss, total / per)


def train(requests_list, out, *, capacity_fractions=(0.05, 0.1, 0.25, 0.5), driver: str = "lru",
          loss: str = "regression", epochs: int = 6, hidden: int = 32, seed: int = 0, sources=()) -> TrainingReport:
    """Sample eviction decisions on every trace (cache driven by ``driver``), fit the scorer, write ``out``."""
    parts = [collect_examples(requests, capacity_fractions, seed=seed + i, drivers=((driver, None),))
             for i, requests in enumerate(requests_list)]
    offsets = np.cumsum([0] + [int(g.max()) + 1 if len(g) else 0 for _, _, g in parts])
    features = np.concatenate([f for f, _, _ in parts])
    targets = np.concatenate([t for _, t, _ in parts])
    decisions = np.concatenate([g + offset for (_, _, g), offset in zip(parts, offsets, strict=False)])
    scorer, report = fit_scorer(features, targets, decisions, loss=loss, hidden=hidden, epochs=epochs, seed=seed)
    scorer.save(out, sources=np.array(list(sources) or ["unnamed"]), seed=seed, loss=loss, driver=driver,
                capacity_fractions=np.array(capacity_fractions))
    return report
