"""A learned eviction policy: a small neural network estimates, for each resident expert, the probability that
it is needed again within a horizon, and the expert least likely to be needed is evicted.

Features (one row per resident expert, computed when the cache needs room; see :data:`FEATURES`): recency
(steps since the expert's last access, tokens between that access and the next computation of its layer, and
its recency rank among the residents), frequency (decayed visit counts at three half-lives, their rank among
the residents, total visits), reuse-distance history (the last gap between accesses and a running mean of gaps),
the router score of the last access, the expert's layer and its distance ahead of the layer being computed (in
a global pool the experts of the next layers are needed soonest), the cache's size in decode steps of
requests, and the expert's visits within the current request (``Access.sequence``) with that request's length
so far: a request's topic sets which experts are popular, so counts restarted at each request estimate it
without the previous request's counts mixed in (each request keeps its own counts, so requests that decode side
by side, their tokens interleaved in a serving log, do not reset each other's), whether the current request's
previous token used the expert, and how many requests the last tokens came from (one when requests decode one
at a time). Per-key history is kept after eviction, so a returning expert
brings its frequency with it. The counters are updated incrementally at each access; time is ``Access.time /
(num_layers * top_k)`` steps.

The network (one hidden ReLU layer, numpy only) has one output per horizon of :data:`HORIZONS_STEPS`: the
log-odds that the expert is used again within that many decode steps, a survival curve of its time to next use.
``tierflow train-policy`` fits it to the true future at sampled eviction decisions (see
:mod:`tierflow.cache.training`). Belady evicts the expert used farthest in the future; under uncertainty, what
costs a miss is an expert needed before the cache would have turned over, so the policy ranks by the probability
of use within a horizon that grows with the cache: ``HORIZON_PER_CAPACITY`` times the cache's capacity in decode
steps of requests (``capacity / requests_per_step``, at least ``MIN_HORIZON_STEPS``), unless the ``horizon``
parameter fixes it. Default weights ship in ``data/learned_default.npz``, trained only on synthetic traces
(scripts/train_default_policy.py).

Ranking every resident at every eviction would cost O(capacity) per miss, so the policy ranks all of them at
once and then evicts in that order for up to ``rerank_every`` evictions; experts accessed since the ranking are
skipped (their features changed) and the next ranking sees them again.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict, deque
from importlib import resources
from pathlib import Path

import attrs
import numpy as np

from tierflow.atomic import atomic_write
from tierflow.cache.base import POLICIES, Policy
from tierflow.errors import TierflowError
from tierflow.registry import non_negative

HALF_LIVES_STEPS = (2.0, 16.0, 128.0)
FEATURES = (
    "log2(1 + steps since last access)",
    "log2(tokens from the last access to the next computation of the expert's layer)",
    "used by the previous token at its layer (1 or 0)",
    "recency rank among residents (0 most, 1 least recently used)",
    "decayed-frequency rank among residents (0 most, 1 least frequent; half-life 16 steps)",
    "layer distance ahead of the current layer / num_layers",
    "log2(1 + decayed visits, half-life 2 steps)",
    "log2(1 + decayed visits, half-life 16 steps)",
    "log2(1 + decayed visits, half-life 128 steps)",
    "log2(1 + visits)",
    "log2(1 + last reuse gap in steps)",
    "log2(1 + running mean reuse gap in steps)",
    "router score of the last access",
    "layer / num_layers",
    "log2(capacity / requests per step)",
    "log2(1 + visits within the current sequence)",
    "log2(tokens of the current sequence so far)",
    "used by the current sequence's previous token at its layer (1 or 0)",
    "log2(sequences among the last 64 tokens)",
)
NUM_FEATURES = len(FEATURES)
# The network's outputs: log-odds of a next use within each of these horizons (decode steps).
HORIZONS_STEPS = tuple(2.0 ** np.arange(-2, 10))
# The horizon the policy ranks by, per decode step of requests the cache holds, and its floor: every layer comes
# again within a step, so under one step every expert behind the current layer is written off at once, and a
# two-step floor gives every expert at least two chances of reuse (both chosen on validation traces, see
# docs/cache-policies.md).
HORIZON_PER_CAPACITY = 1.0
MIN_HORIZON_STEPS = 2.0
_GAP_SMOOTHING = 0.25
DEFAULT_WEIGHTS = "learned_default.npz"


# ----------------------------------------------------------------------------------------------- the network


_ARRAYS = ("mean", "scale", "w1", "b1", "w2", "b2", "horizons")


@attrs.frozen(eq=False)
class Scorer:
    """``x -> relu((x - mean) / scale @ w1 + b1) @ w2 + b2``: for each of ``horizons`` (decode steps), the
    log-odds that a key is used again within it."""

    mean: np.ndarray
    scale: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray  # (hidden, horizons)
    b2: np.ndarray  # (horizons,)
    horizons: np.ndarray = attrs.field(factory=lambda: np.array(HORIZONS_STEPS))

    def hidden(self, features: np.ndarray) -> np.ndarray:
        return np.maximum((features - self.mean) / self.scale @ self.w1 + self.b1, 0.0)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """(rows, horizons): the log-odds of a next use within each horizon."""
        return self.hidden(features) @ self.w2 + self.b2

    def output_at(self, horizon_steps: float) -> tuple[np.ndarray, float]:
        """The output weights for one horizon, interpolated linearly in ``log2`` of the horizon between the
        trained ones (clamped to their range)."""
        position = np.interp(np.log2(horizon_steps), np.log2(self.horizons), np.arange(len(self.horizons)))
        low = int(np.floor(position))
        high = min(low + 1, len(self.horizons) - 1)
        share = position - low
        w = (1 - share) * self.w2[:, low] + share * self.w2[:, high]
        return w, float((1 - share) * self.b2[low] + share * self.b2[high])

    def __call__(self, features: np.ndarray, horizon_steps: float) -> np.ndarray:
        """The log-odds of a next use within ``horizon_steps``, one per row."""
        w, b = self.output_at(horizon_steps)
        return self.hidden(features) @ w + b

    def save(self, path, **metadata) -> None:
        """Write the weights to ``path`` (an .npz file), atomically."""
        arrays = {name: getattr(self, name) for name in _ARRAYS}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as file:  # a file object: np.savez would add ".npz" to a temporary's name
                np.savez(file, **arrays, features=np.array(FEATURES),
                         **{k: _metadata_array(v) for k, v in metadata.items()})

        atomic_write(path, write)

    @classmethod
    def load(cls, path) -> Scorer:
        not_weights = f"{path}: not a learned-policy weights file"
        try:
            data = np.load(path)
        except OSError as error:
            raise TierflowError(f"{path}: cannot read the weights: {error.strerror or error}") from None
        except (ValueError, EOFError, zipfile.BadZipFile):  # EOFError: an empty file; ValueError: any other file
            raise TierflowError(f"{not_weights} (an .npz archive train-policy writes)") from None
        if not isinstance(data, np.lib.npyio.NpzFile):  # one .npy array
            raise TierflowError(f"{not_weights} (an .npz archive train-policy writes, not one .npy array)")
        with data:
            missing = [name for name in _ARRAYS if name not in data.files]
            if missing:
                raise TierflowError(f"{not_weights} (no array {', '.join(missing)})")
            try:
                stored = {name: data[name] for name in _ARRAYS}
                complex_arrays = [name for name, array in stored.items() if np.iscomplexobj(array)]
                if complex_arrays:  # a cast to float64 would drop their imaginary parts, with only a warning
                    raise ValueError(f"complex numbers in {', '.join(complex_arrays)}")
                arrays = {name: np.asarray(array, dtype=np.float64) for name, array in stored.items()}
                features = tuple(str(f) for f in data["features"]) if "features" in data else None
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # a member cut short or not numbers
                raise TierflowError(f"{not_weights} ({' '.join(str(error).split())})") from None
        if features is not None and features != FEATURES:
            raise TierflowError(f"{path}: weights were trained on other features; retrain with train-policy")
        shapes = ", ".join(f"{name} {arrays[name].shape}" for name in _ARRAYS)
        w1, horizons = arrays["w1"], arrays["horizons"].reshape(-1)
        hidden = w1.shape[1] if w1.ndim == 2 else -1
        if (w1.shape != (NUM_FEATURES, hidden) or hidden < 1 or not len(horizons)
                or arrays["w2"].size != hidden * len(horizons)
                or arrays["b1"].reshape(-1).shape != (hidden,) or arrays["b2"].reshape(-1).shape != horizons.shape
                or arrays["mean"].reshape(-1).shape != (NUM_FEATURES,)
                or arrays["scale"].reshape(-1).shape != (NUM_FEATURES,)):
            raise TierflowError(f"{path}: weight shapes do not fit {NUM_FEATURES} features ({shapes})")
        if not all(np.isfinite(a).all() for a in arrays.values()) or not np.all(arrays["scale"] != 0):
            raise TierflowError(f"{path}: weights hold NaN, infinite values or a zero scale")
        if not np.all(np.diff(horizons) > 0) or not horizons[0] > 0:  # the policy reads their log2
            raise TierflowError(f"{path}: horizons must be > 0 and increase, got {horizons.tolist()}")
        return cls(mean=arrays["mean"].reshape(-1), scale=arrays["scale"].reshape(-1), w1=w1,
                   b1=arrays["b1"].reshape(-1), w2=arrays["w2"].reshape(hidden, len(horizons)),
                   b2=arrays["b2"].reshape(-1), horizons=horizons)


def _metadata_array(value) -> np.ndarray:
    """A metadata value as an array np.load reads without pickles: a value numpy can only hold as an object
    (an integer beyond 64 bits, such as a train-policy seed of 2**64) is stored as its text."""
    array = np.asarray(value)
    return np.asarray(str(value)) if array.dtype == object else array


_SCORERS: dict = {}  # loaded weights, by file identity: another spelling of a path, or a rewritten file, is seen


def load_scorer(weights: str = "") -> Scorer:
    """The scorer from a weights file; ``""`` means the default weights shipped in the package."""
    with resources.as_file(resources.files("tierflow.cache") / "data" / DEFAULT_WEIGHTS) as default:
        path = Path(weights) if weights else default
        try:
            stat = path.stat()
        except OSError:
            return Scorer.load(path)  # the error names the file
        key = (str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key not in _SCORERS:
            if len(_SCORERS) >= 16:  # a long-lived process that trains and loads many files
                _SCORERS.clear()
            _SCORERS[key] = Scorer.load(path)
        return _SCORERS[key]


# ----------------------------------------------------------------------------------------------- features


class ExpertFeatures:
    """Per-key access statistics, kept incrementally, and the feature rows of the resident keys.

    History (visits, decayed counts, gaps) outlives residency; each resident key also has a row (a *slot*) in
    one table, written at each of its accesses, so that the features of all residents are computed at once.
    """

    FIELDS = ("last_step", "layer", "visits", "decayed_0", "decayed_1", "decayed_2", "last_gap", "mean_gap",
              "score", "next_use", "last_token", "version")
    LAST_STEP, LAYER, VISITS, DECAYED, LAST_GAP, MEAN_GAP, SCORE, NEXT_USE, LAST_TOKEN, VERSION = (
        0, 1, 2, 3, 6, 7, 8, 9, 10, 11)
    NO_SEQUENCE = -1  # the sequence of accesses whose driver does not name one
    # Requests whose per-expert visits are kept, the most recently seen: a serving log interleaves as many
    # requests as the engine decodes side by side; a request unseen while this many others came is forgotten.
    MAX_SEQUENCES = 32
    RECENT_TOKENS = 64  # the window in which the requests decoding side by side are counted

    def __init__(self, num_layers: int, capacity_steps: float = 1.0):
        """``capacity_steps``: the cache's capacity in decode steps of requests (a feature of every row)."""
        self.num_layers = num_layers
        self.log_capacity_steps = float(np.log2(max(capacity_steps, 1e-3)))
        self.history: dict = {}  # key -> [last_step, visits, decayed x3, last_gap, mean_gap]
        # sequence -> (key -> [visits within it, its token count at the last]), and sequence -> [its last token
        # seen, its tokens seen], the most recently seen sequence last: counted per request, so that requests
        # decoding side by side (their tokens interleaved) do not restart each other's counts
        self.sequence_visits: OrderedDict = OrderedDict()
        self.sequence_tokens: dict = {}
        self.recent = deque()  # the sequence of each of the last RECENT_TOKENS tokens, and how often each is there
        self.recent_count: dict = {}
        self.last_token = None
        self.slot_of: dict = {}
        self.keys: list = []
        self.free: list[int] = []
        self.table = np.zeros((0, len(self.FIELDS)))

    def observe(self, key, access, steps: float) -> None:
        """Count an access (hit or insertion) of a resident key at time ``steps``; ``access.step`` (else the
        whole steps) numbers the token."""
        token = access.step if access.step is not None else int(steps)
        self._count_in_sequence(key, self.NO_SEQUENCE if access.sequence is None else access.sequence, token)
        record = self.history.get(key)
        if record is None:
            record = self.history[key] = [steps, 1, 1.0, 1.0, 1.0, 0.0, 0.0]
        else:
            gap = steps - record[0]
            record[0] = steps
            record[1] += 1
            for i, half_life in enumerate(HALF_LIVES_STEPS):
                record[2 + i] = record[2 + i] * 2.0 ** (-gap / half_life) + 1.0
            record[5] = gap
            record[6] = gap if record[1] == 2 else record[6] + _GAP_SMOOTHING * (gap - record[6])
        slot = self.slot_of.get(key)
        if slot is None:
            slot = self._allocate(key)
        version = self.table[slot, self.VERSION] + 1
        self.table[slot] = (*record[:1], access.layer, *record[1:], access.score, access.next_use, token, version)

    def _count_in_sequence(self, key, sequence, token: int) -> None:
        if token != self.last_token:
            self.last_token = token
            self._enter_recent(sequence)
        visits = self.sequence_visits.get(sequence)
        if visits is None:
            if len(self.sequence_visits) >= self.MAX_SEQUENCES:
                forgotten, _ = self.sequence_visits.popitem(last=False)
                del self.sequence_tokens[forgotten]
            visits = self.sequence_visits[sequence] = {}
            tokens = self.sequence_tokens[sequence] = [token, 1]
        else:
            self.sequence_visits.move_to_end(sequence)
            tokens = self.sequence_tokens[sequence]
            if tokens[0] != token:
                tokens[0] = token
                tokens[1] += 1
        entry = visits.get(key)
        if entry is None:
            visits[key] = [1, tokens[1]]
        else:
            entry[0] += 1
            entry[1] = tokens[1]

    def _enter_recent(self, sequence) -> None:
        recent, count = self.recent, self.recent_count
        recent.append(sequence)
        count[sequence] = count.get(sequence, 0) + 1
        if len(recent) > self.RECENT_TOKENS:
            gone = recent.popleft()
            count[gone] -= 1
            if not count[gone]:
                del count[gone]

    def _allocate(self, key) -> int:
        if not self.free:
            old = len(self.keys)
            extra = max(16, old)
            self.table = np.concatenate([self.table, np.zeros((extra, len(self.FIELDS)))])
            self.keys.extend([None] * extra)
            self.free = list(range(old + extra - 1, old - 1, -1))
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.keys[slot] = key
        return slot

    def remove(self, key) -> None:
        slot = self.slot_of.pop(key)
        self.keys[slot] = None
        self.free.append(slot)

    def resident_slots(self) -> np.ndarray:
        return np.fromiter(self.slot_of.values(), dtype=np.int64, count=len(self.slot_of))

    def rows(self, slots: np.ndarray, now_steps: float, now_token: int, current_layer: int,
             now_sequence=None) -> np.ndarray:
        """The feature rows (see :data:`FEATURES`) of the keys in ``slots`` at time ``now_steps``, during token
        ``now_token`` of sequence ``now_sequence`` at ``current_layer``; ranks are among these keys, so pass
        every resident."""
        c = self.table[slots].T
        age = np.maximum(now_steps - c[self.LAST_STEP], 0.0)
        decayed = c[self.DECAYED:self.DECAYED + 3] * np.exp2(-age / np.array(HALF_LIVES_STEPS)[:, None])
        # The layers after the current one are still to come in this token; the others come in the next.
        next_token = now_token + (c[self.LAYER] <= current_layer)
        tokens_between = np.maximum(next_token - c[self.LAST_TOKEN], 1.0)
        last = max(len(slots) - 1, 1)
        rows = np.empty((len(slots), NUM_FEATURES))
        rows[:, 0] = np.log2(1.0 + age)
        rows[:, 1] = np.log2(tokens_between)
        rows[:, 2] = tokens_between == 1.0
        rows[:, 3] = _ranks(-c[self.LAST_STEP]) / last
        rows[:, 4] = _ranks(-decayed[1]) / last
        rows[:, 5] = np.mod(c[self.LAYER] - current_layer, self.num_layers) / self.num_layers
        rows[:, 6:9] = np.log2(1.0 + decayed.T)
        rows[:, 9] = np.log2(1.0 + c[self.VISITS])
        rows[:, 10] = np.log2(1.0 + c[self.LAST_GAP])
        rows[:, 11] = np.log2(1.0 + c[self.MEAN_GAP])
        rows[:, 12] = c[self.SCORE]
        rows[:, 13] = c[self.LAYER] / self.num_layers
        rows[:, 14] = self.log_capacity_steps
        sequence = self.NO_SEQUENCE if now_sequence is None else now_sequence
        tokens = self.sequence_tokens.get(sequence)  # [last token seen, tokens seen]
        so_far = 1 if tokens is None else tokens[1] + (tokens[0] != now_token)  # the current token included
        rows[:, 16] = np.log2(so_far)
        visits = self.sequence_visits.get(sequence)
        if visits:
            keys, none = self.keys, (0, 0)
            mine = np.array([visits.get(keys[slot], none) for slot in slots.tolist()], dtype=np.float64)
            rows[:, 15] = np.log2(1.0 + mine[:, 0])
            # As feature 2, within the request: its token that last computed the expert's layer is the current
            # one for the layers computed already, else the one before.
            rows[:, 17] = (mine[:, 0] > 0) & (mine[:, 1] == so_far - (c[self.LAYER] > current_layer))
        else:
            rows[:, 15] = 0.0
            rows[:, 17] = 0.0
        rows[:, 18] = np.log2(max(len(self.recent_count), 1))
        return rows


def _ranks(values: np.ndarray) -> np.ndarray:
    """0 for the smallest value, len - 1 for the largest (ties in slot order)."""
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def steps_to_next_use(next_use: np.ndarray, now_time: float, accesses_per_step: float) -> np.ndarray:
    """The training target: decode steps until each key's next use (``inf`` when there is none)."""
    return np.where(np.isinf(next_use), np.inf, (next_use - now_time) / accesses_per_step)


# ----------------------------------------------------------------------------------------------- the policy


@attrs.frozen
class LearnedParams:
    weights: str = attrs.field(default="", validator=attrs.validators.instance_of(str),
                               metadata={"help": "weights file from `tierflow train-policy` (default: shipped)"})
    horizon: float = attrs.field(default=0.0, converter=float, validator=non_negative,
                                 metadata={"help": "decode steps within which a use is predicted; the least "
                                                   "likely expert is evicted (0: the capacity in steps of "
                                                   "requests, at least 2)"})
    rerank_every: int = attrs.field(default=0, converter=int, validator=non_negative,
                                    metadata={"help": "evictions between two rankings of all residents "
                                                      "(0: one per 64 residents)"})


@POLICIES.register
class Learned(Policy):
    """Evict the expert a small neural network predicts least likely to be needed soon (trained on the future)."""

    name = "learned"
    Params = LearnedParams

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        num_layers = context.num_layers if context is not None else 1
        capacity_steps = context.capacity_items / context.requests_per_step if context is not None else 1.0
        self.features = ExpertFeatures(num_layers, capacity_steps)
        self.scorer = load_scorer(self.params.weights)
        self.horizon_steps = self.params.horizon or max(MIN_HORIZON_STEPS, HORIZON_PER_CAPACITY * capacity_steps)
        self._ranked = np.empty(0, dtype=np.int64)  # resident slots, the least likely to be used last
        self._ranked_versions = np.empty(0)
        self._unused = 0
        self._evictions_left = 0

    def on_insert(self, key, access):
        self.features.observe(key, access, self.clock(access))

    def on_hit(self, key, access):
        self.features.observe(key, access, self.clock(access))

    def on_remove(self, key):
        self.features.remove(key)

    def ordered_keys(self):
        return self.features.slot_of.keys()

    def clock(self, access) -> float:
        """Time in decode steps, to the access: ``Access.time`` over the accesses of one step
        (``num_layers * top_k``), so that two accesses of one step still have an order."""
        context = self.context
        return access.time / (context.num_layers * context.top_k) if context is not None else float(access.time)

    def token(self, access) -> int:
        """The token (decode step) of the access: ``Access.step``, else the whole steps of :meth:`clock`."""
        return access.step if access.step is not None else int(self.clock(access))

    def victim(self, evictable, access):
        for attempt in range(2):
            if attempt or self._evictions_left <= 0:
                self._rank(access)
            found = self._next_ranked(evictable)
            if found is not None:
                self._evictions_left -= 1
                return found
        return None

    def _rank(self, access) -> None:
        """Order every resident key by predicted chance of use within the horizon (least likely last) and start
        a new run of evictions."""
        features = self.features
        slots = features.resident_slots()
        rows = features.rows(slots, self.clock(access), self.token(access), access.current_layer, access.sequence)
        with np.errstate(over="ignore", invalid="ignore"):
            log_odds = self.scorer(rows, self.horizon_steps)
        if np.isnan(log_odds).any():  # NaN has no place in an order: the ranking would be arbitrary
            raise TierflowError(f"learned policy: the weights {self.params.weights or '(shipped)'} score some "
                                "experts NaN (their values overflow float64); retrain with train-policy")
        self._ranked = slots[np.argsort(-log_odds, kind="stable")]
        self._ranked_versions = features.table[self._ranked, features.VERSION]
        self._unused = len(self._ranked)  # entries [0, _unused) may still be taken, from the end
        every = self.params.rerank_every or max(1, len(slots) // 64)
        self._evictions_left = every

    def _next_ranked(self, evictable):
        """The best remaining victim that is unchanged since the ranking and evictable (pinned ones stay)."""
        features = self.features
        table, keys, column = features.table, features.keys, features.VERSION
        ranked, seen = self._ranked, self._ranked_versions
        i = self._unused - 1
        while i >= 0:
            slot = ranked[i]
            key = keys[slot]
            if key is not None and table[slot, column] == seen[i]:
                if evictable(key):
                    seen[i] = -1.0  # taken
                    break
            elif i == self._unused - 1:
                self._unused = i  # removed or accessed since the ranking: never a candidate again
            i -= 1
        else:
            return None
        if i == self._unused - 1:
            self._unused = i
        return key
