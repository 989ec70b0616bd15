"""Eviction policies: each one's rule on small hand-worked sequences, the shared conformance protocol every
registered policy passes, the two cache scopes, and the learned policy's weights and features."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tierflow.cache import (
    NEVER,
    POLICIES,
    Access,
    CacheContext,
    CacheFullError,
    LayeredCache,
    TierCache,
    make_expert_cache,
    make_policy,
)
from tierflow.cache.learned import (
    FEATURES,
    HORIZONS_STEPS,
    ExpertFeatures,
    Scorer,
    load_scorer,
)
from tierflow.errors import TierflowError
from tierflow.replay import Requests, next_use, replay
from tierflow.trace.synth import ROUTING_PROFILES, generate_arrays


def run(policy, keys, capacity, params=None, scores=None, prefetch=(), steps=None):
    """Replay ``keys`` through a cache of ``capacity`` unit objects; returns (hits per access, cache)."""
    cache = TierCache(make_policy(policy, params, CacheContext(capacity)), capacity)
    following = next_use(np.array(keys))
    hits = []
    for time, key in enumerate(keys):
        access = Access(key, time, score=scores[time] if scores else 0.0,
                        next_use=NEVER if following[time] < 0 else int(following[time]),
                        prefetch=time in prefetch, step=steps[time] if steps else time)
        hit = cache.lookup(key, access)
        if not hit:
            cache.admit(key, 1, access)
        hits.append(hit)
        cache.check_valid()
    return hits, cache


def hit_pattern(hits):
    return "".join("H" if h else "." for h in hits)


# ----------------------------------------------------------------------------------------------- hand-worked


def test_lru_evicts_the_least_recently_used():
    # a b c a d: d evicts b (a was used after b); then b misses and evicts c; a still hits.
    hits, cache = run("lru", list("abcadba"), 3)
    assert hit_pattern(hits) == "...H..H"
    assert set(cache.keys()) == {"a", "d", "b"}


def test_fifo_ignores_hits():
    # a b c a d: d evicts a, the first in, although a was just hit.
    hits, cache = run("fifo", list("abcada"), 3)
    assert hit_pattern(hits) == "...H.."
    assert set(cache.keys()) == {"c", "d", "a"}


def test_lfu_evicts_the_least_frequent_and_breaks_ties_by_recency():
    # Counts a:3 b:1 c:1 when d arrives: b and c tie at 1 and b was used longer ago, so b goes.
    _, cache = run("lfu", list("aaabcd"), 3)
    assert set(cache.keys()) == {"a", "c", "d"}


def test_lfu_counts_restart_when_a_key_returns():
    # At d: a:3 b:2 c:2 -> b (tie with c, older) goes. b returns with count 1, so at e it is the victim,
    # although it was used twice before (libCacheSim's LFU keeps no history).
    hits, cache = run("lfu", list("aabbcacdbe"), 3)
    assert hit_pattern(hits) == ".H.H.HH..."
    assert set(cache.keys()) == {"a", "c", "e"}


def test_belady_evicts_the_farthest_next_use():
    # At d, the residents' next uses are a:4? -- a is used at 5, b at 6, c never: c goes.
    hits, cache = run("belady", list("abcdab"), 3)
    assert hit_pattern(hits) == "....HH"


def test_belady_matches_brute_force_optimum_on_small_sequences():
    rng = np.random.default_rng(3)
    for _ in range(30):
        keys = rng.integers(0, 6, 14).tolist()
        hits, _ = run("belady", keys, 3)
        assert sum(hits) == _optimal_hits(keys, 3)


def _optimal_hits(keys, capacity):
    """The most hits any eviction choice achieves (exhaustive search; every miss is admitted)."""
    best = {frozenset(): 0}
    for key in keys:
        nxt = {}
        for resident, count in best.items():
            if key in resident:
                options = [(resident, count + 1)]
            elif len(resident) < capacity:
                options = [(resident | {key}, count)]
            else:
                options = [((resident - {victim}) | {key}, count) for victim in resident]
            for state, value in options:
                nxt[state] = max(nxt.get(state, -1), value)
        best = nxt
    return max(best.values())


def test_lfu_aging_forgets_old_popularity():
    # a is used 30 times, then b and c alternate 10 times each, then d arrives. Plain counting keeps a (30
    # against 10) and evicts b; with a half-life of 2 steps a's popularity has faded, so a goes.
    keys = ["a"] * 30 + ["b", "c"] * 10 + ["d"]
    steps = list(range(len(keys)))
    _, aged = run("lfu_aging", keys, 3, {"half_life": 2.0}, steps=steps)
    assert set(aged.keys()) == {"b", "c", "d"}
    _, kept = run("lfu_aging", keys, 3, {"half_life": 1e9}, steps=steps)
    assert set(kept.keys()) == {"a", "c", "d"}


def test_lfu_aging_score_is_a_decayed_count():
    policy = make_policy("lfu_aging", {"half_life": 4.0}, CacheContext(4))
    policy.on_insert("k", Access("k", 0, step=0))
    policy.on_hit("k", Access("k", 1, step=4))
    policy.on_hit("k", Access("k", 2, step=8))
    # At step 8 the score is 1 + 2**-1 + 2**-2 = 1.75; it is stored as log2(score) + 8 / half_life.
    assert policy._log_score["k"] == pytest.approx(math.log2(1.75) + 2.0)


def test_lfu_aging_with_a_half_life_too_short_to_count_steps_in_is_lru():
    # steps / half_life overflows to infinity from step 1 on: only the latest access counts, as in LRU, and no
    # score becomes NaN (inf - inf) to scramble the eviction order.
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 12, 400).tolist()
    for half_life in (5e-324, 1e-310):
        hits, cache = run("lfu_aging", keys, 5, {"half_life": half_life})
        assert not any(math.isnan(score) for score in cache.policy._log_score.values())
        assert hits == run("lru", keys, 5)[0]


def test_finemoe_evicts_lowest_probability_times_visits_and_protects_prefetched():
    # a: 2 visits x 0.9; b: 3 visits x 0.1; c: 1 visit x 0.8 -> scores 1.8, 0.3, 0.8: d evicts b.
    keys = list("aabbbcd")
    scores = [0.9, 0.9, 0.1, 0.1, 0.1, 0.8, 0.5]
    _, cache = run("finemoe", keys, 3, {"smoothing": 1.0}, scores=scores)
    assert set(cache.keys()) == {"a", "c", "d"}
    # The same, but c was prefetched (never demanded): it is protected, so b still goes, then on e, with c
    # protected and d (0.5) lowest among a and d, d goes.
    keys = list("aabbbcde")
    scores = [0.9, 0.9, 0.1, 0.1, 0.1, 0.01, 0.5, 0.5]
    _, cache = run("finemoe", keys, 3, {"smoothing": 1.0}, scores=scores, prefetch={5})
    assert set(cache.keys()) == {"a", "c", "e"}


def test_finemoe_a_prefetch_is_not_a_routing():
    # b comes by prefetch (no router weight), then is demanded once at 0.03; a is demanded once at 0.03 later.
    # Both are one visit at 0.03: the tie goes to the least recently used, b.
    policy = make_policy("finemoe", None, CacheContext(2))
    cache = TierCache(policy, 2)
    cache.admit("b", 1, Access("b", 0, prefetch=True))
    assert cache.lookup("b", Access("b", 1, score=0.03))
    cache.admit("a", 1, Access("a", 2, score=0.03))
    assert cache.admit("c", 1, Access("c", 3, score=0.03)) == ["b"]
    # A prefetch that finds its key resident (a read served by a DDR cache) adds no visit and keeps protection.
    policy = make_policy("finemoe", None, CacheContext(3))
    cache = TierCache(policy, 3)
    cache.admit("a", 1, Access("a", 0, score=0.1))
    cache.admit("b", 1, Access("b", 1, prefetch=True))
    assert cache.lookup("b", Access("b", 2, prefetch=True)) and cache.lookup("a", Access("a", 3, prefetch=True))
    assert (policy._visits, policy._probability, policy._protected) == ({"a": 1}, {"a": 0.1}, {"b"})
    # ... nor its recency: of two keys seen once at the same weight, the one demanded first still goes first.
    cache = TierCache(make_policy("finemoe", None, CacheContext(2)), 2)
    cache.admit("a", 1, Access("a", 0, score=0.5))
    cache.admit("b", 1, Access("b", 1, score=0.5))
    assert cache.lookup("a", Access("a", 2, prefetch=True))
    assert cache.admit("c", 1, Access("c", 3, score=0.5)) == ["a"]


def test_finemoe_lifts_the_protection_when_a_faster_tier_uses_the_prefetch():
    """A DDR cache's copy of a prefetched expert (inserted as a prefetch) is protected until HBM uses the expert
    (prefetch_used): then it competes by value again, keeping its place among equal values; other policies
    ignore the call, and a key not resident is ignored."""
    cache = TierCache(make_policy("finemoe", None, CacheContext(3)), 3)
    cache.admit("p", 1, Access("p", 0, prefetch=True))
    cache.admit("q", 1, Access("q", 1, prefetch=True))
    cache.admit("a", 1, Access("a", 2, score=0.5))
    assert cache.admit("b", 1, Access("b", 3, score=0.5)) == ["a"]  # p and q protected: a goes
    cache.prefetch_used("q")
    cache.prefetch_used("p")
    cache.prefetch_used("absent")
    # p and q (no visit here: value 0) now go before b, in their own order (p inserted first), not the calls'.
    assert cache.admit("c", 1, Access("c", 4, score=0.5)) == ["p"]
    assert cache.admit("d", 1, Access("d", 5, score=0.5)) == ["q"]
    lru = TierCache(make_policy("lru", None, CacheContext(2)), 2)
    lru.admit("p", 1, Access("p", 0, prefetch=True))
    lru.admit("a", 1, Access("a", 1))
    lru.prefetch_used("p")
    assert lru.admit("b", 1, Access("b", 2)) == ["p"]


def test_finemoe_reads_a_router_weight_of_zero_as_zero():
    # Half-precision router weights can round to 0: such a visit is worth nothing, not the most.
    cache = TierCache(make_policy("finemoe", None, CacheContext(2)), 2)
    cache.admit(0, 1, Access(0, 0, score=0.0))
    cache.admit(1, 1, Access(1, 1, score=0.5))
    assert cache.admit(2, 1, Access(2, 2, score=0.3)) == [0]
    # Without router weights in the trace every visit weighs 1 (LFU with history): the key seen once goes.
    cache = TierCache(make_policy("finemoe", None, CacheContext(2, router_scores=False)), 2)
    for time, key in enumerate([0, 0, 1, 2]):
        if not cache.lookup(key, Access(key, time)):
            evicted = cache.admit(key, 1, Access(key, time))
    assert evicted == [1] and set(cache.keys()) == {0, 2}


def test_learned_policy_loads_the_shipped_weights():
    scorer = load_scorer()
    assert scorer.w1.shape == (len(FEATURES), scorer.b1.shape[0])
    hits, cache = run("learned", [i % 7 for i in range(200)], 4)
    assert len(cache) == 4


def test_learned_weights_whose_scores_overflow_are_an_error_not_an_arbitrary_order(tmp_path):
    # Finite weights can still overflow float64 when applied (a tiny scale, huge products): the NaN scores
    # they give would rank the residents arbitrarily, with only RuntimeWarnings on stderr.
    default = load_scorer()
    for name, weights in [("tiny_scale", {"scale": np.full_like(default.scale, 5e-324)}),
                          ("huge", {"w1": default.w1 * 1e300, "w2": default.w2 * 1e300})]:
        arrays = {field: getattr(default, field) for field in ("mean", "scale", "w1", "b1", "w2", "b2", "horizons")}
        path = tmp_path / f"{name}.npz"
        Scorer(**{**arrays, **weights}).save(path)
        with pytest.raises(TierflowError, match="score some experts NaN"):
            run("learned", [i % 7 for i in range(50)], 4, {"weights": str(path)})


def test_learned_policy_with_a_recency_scorer_is_lru(tmp_path):
    """A network that predicts 'the longer unused, the less likely needed soon' must evict exactly as LRU does."""
    width = len(FEATURES)
    w1 = np.zeros((width, 1))
    w1[FEATURES.index("log2(1 + steps since last access)"), 0] = 1.0
    path = tmp_path / "recency.npz"
    horizons = len(HORIZONS_STEPS)
    Scorer(np.zeros(width), np.ones(width), w1, np.zeros(1), -np.ones((1, horizons)), np.zeros(horizons)).save(path)
    rng = np.random.default_rng(5)
    for _ in range(5):
        keys = rng.integers(0, 12, 300).tolist()
        learned, _ = run("learned", keys, 5, {"weights": str(path), "rerank_every": 1})
        lru, _ = run("lru", keys, 5)
        assert learned == lru


def test_learned_weights_file_round_trips_and_bad_files_are_errors(tmp_path):
    rng = np.random.default_rng(0)
    horizons = len(HORIZONS_STEPS)
    scorer = Scorer(rng.normal(size=len(FEATURES)), np.ones(len(FEATURES)), rng.normal(size=(len(FEATURES), 4)),
                    np.zeros(4), rng.normal(size=(4, horizons)), rng.normal(size=horizons))
    path = tmp_path / "w.npz"
    scorer.save(path)
    loaded = Scorer.load(path)
    x = rng.normal(size=(5, len(FEATURES)))
    np.testing.assert_allclose(loaded.logits(x), scorer.logits(x))
    # At a trained horizon the output is that horizon's column; between two, it lies between them.
    np.testing.assert_allclose(loaded(x, HORIZONS_STEPS[3]), scorer.logits(x)[:, 3])
    between = loaded(x, (HORIZONS_STEPS[3] * HORIZONS_STEPS[4]) ** 0.5)
    np.testing.assert_allclose(between, scorer.logits(x)[:, 3:5].mean(axis=1))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(TierflowError, match="weights"):
        make_policy("learned", {"weights": str(bad)}, CacheContext(4))
    # Loaded weights are kept by file identity: a file rewritten in place, read through another spelling of its
    # path, gives the new weights (they were kept by the path's text).
    policy_path = tmp_path / "p.npz"
    scorer.save(policy_path)
    assert load_scorer(str(policy_path)) is load_scorer(str(policy_path))
    other = Scorer(scorer.mean, scorer.scale, scorer.w1, scorer.b1, scorer.w2, scorer.b2 + 1.0, scorer.horizons)
    other.save(policy_path)
    respelled = str(tmp_path / "." / "p.npz")
    np.testing.assert_allclose(load_scorer(respelled).logits(x), other.logits(x))
    for damaged in (b"", path.read_bytes()[:2000]):  # empty; cut short (a zip without its directory)
        bad.write_bytes(damaged)
        with pytest.raises(TierflowError, match="not a learned-policy weights file"):
            Scorer.load(bad)
    np.save(tmp_path / "one.npy", scorer.mean)  # one array, not an archive (np.load gives the array itself)
    with pytest.raises(TierflowError, match=r"not a learned-policy weights file \(.* not one \.npy array\)"):
        Scorer.load(tmp_path / "one.npy")
    np.savez(tmp_path / "part.npz", mean=scorer.mean, w1=scorer.w1)
    with pytest.raises(TierflowError, match=r"not a learned-policy weights file \(no array scale, b1, w2, b2, "
                                            r"horizons\)$"):
        Scorer.load(tmp_path / "part.npz")
    arrays = {name: getattr(scorer, name) for name in ("mean", "scale", "w1", "b1", "w2", "b2", "horizons")}
    for name, value, message in [("b1", np.zeros(3), "do not fit"), ("mean", np.zeros(2), "do not fit"),
                                 ("w1", np.zeros(len(FEATURES)), "do not fit"), ("horizons", np.zeros(0), "do not fit"),
                                 ("w2", np.full((4, horizons), np.nan), "NaN"), ("scale", np.zeros(len(FEATURES)),
                                                                                  "zero scale"),
                                 ("horizons", np.arange(horizons) - 1.0, r"horizons must be > 0 and increase"),
                                 ("horizons", np.arange(horizons) + 0.0, r"horizons must be > 0 and increase"),
                                 ("horizons", np.arange(horizons, 0, -1.0), r"horizons must be > 0 and increase"),
                                 ("w1", scorer.w1 + 1j, r"not a learned-policy weights file \(complex numbers in w1\)")]:
        np.savez(bad, **{**arrays, name: value})
        with pytest.raises(TierflowError, match=message):
            Scorer.load(bad)


def test_weights_metadata_reads_without_pickles_whatever_the_seed(tmp_path):
    # train-policy takes any seed >= 0; one beyond 64 bits was stored as a pickled object array, which np.load
    # refuses to read (allow_pickle=False).
    path = tmp_path / "w.npz"
    load_scorer().save(path, seed=2**64, rounds=1)
    with np.load(path) as data:
        assert str(data["seed"]) == str(2**64) and int(data["rounds"]) == 1
    Scorer.load(path)


def test_learned_features_are_recency_frequency_and_layer_distance():
    features = ExpertFeatures(num_layers=4, capacity_steps=0.5)
    features.observe("x", Access("x", 0, layer=3, score=0.7), steps=0.0)
    features.observe("x", Access("x", 10, layer=3, score=0.5), steps=2.0)
    features.observe("y", Access("y", 11, layer=0, score=0.2, step=5), steps=3.0)
    slots = features.resident_slots()
    rows = features.rows(slots, now_steps=6.0, now_token=6, current_layer=1)
    x, y = (dict(zip(FEATURES, row, strict=True)) for row in rows)
    assert x["log2(1 + steps since last access)"] == pytest.approx(math.log2(5.0))
    # x (layer 3, token 2) comes next later in token 6: 4 tokens on; y (layer 0, token 5) next in token 7.
    assert x["log2(tokens from the last access to the next computation of the expert's layer)"] == 2.0
    assert y["log2(tokens from the last access to the next computation of the expert's layer)"] == 1.0
    assert y["used by the previous token at its layer (1 or 0)"] == 0.0
    assert x["used by the previous token at its layer (1 or 0)"] == 0.0
    x_next = dict(zip(FEATURES, features.rows(slots, now_steps=3.5, now_token=3, current_layer=1)[0], strict=True))
    assert x_next["used by the previous token at its layer (1 or 0)"] == 1.0
    assert x["log2(capacity / requests per step)"] == -1.0
    assert x["recency rank among residents (0 most, 1 least recently used)"] == 1.0
    assert y["recency rank among residents (0 most, 1 least recently used)"] == 0.0
    # x: two visits 2 steps apart, seen 4 steps after the last; y: one visit 3 steps ago. Half-life 16:
    # x has (2**-1/8 + 1) * 2**-4/16 = 1.73, y has 2**-3/16 = 0.88: y is the less frequent.
    assert y["decayed-frequency rank among residents (0 most, 1 least frequent; half-life 16 steps)"] == 1.0
    assert x["layer distance ahead of the current layer / num_layers"] == pytest.approx(2 / 4)
    assert y["layer distance ahead of the current layer / num_layers"] == pytest.approx(3 / 4)
    # Half-life 2: (2**-1 + 1) * 2**-2 for x.
    assert x["log2(1 + decayed visits, half-life 2 steps)"] == pytest.approx(math.log2(1 + 1.5 * 0.25))
    assert x["log2(1 + visits)"] == pytest.approx(math.log2(3.0))
    assert x["log2(1 + last reuse gap in steps)"] == pytest.approx(math.log2(3.0))
    assert x["router score of the last access"] == pytest.approx(0.5)


def test_learned_sequence_features_count_visits_within_the_current_request():
    """Each request keeps its own visit counts and token count, so requests whose tokens interleave (decoding
    side by side) do not reset each other's; accesses without a sequence form one of their own; a request
    unseen while MAX_SEQUENCES others came is forgotten."""
    features = ExpertFeatures(num_layers=1)
    for time, (key, sequence) in enumerate([("x", 7), ("x", 7), ("y", 7), ("x", 8), ("y", None)]):
        features.observe(key, Access(key, time, step=time + 10, sequence=sequence), steps=float(time))
    slots = features.resident_slots()

    def column(name, sequence, token=15):
        rows = features.rows(slots, now_steps=5.0, now_token=token, current_layer=0, now_sequence=sequence)
        return rows[:, FEATURES.index(name)].tolist()

    visits = "log2(1 + visits within the current sequence)"
    length = "log2(tokens of the current sequence so far)"
    assert column(visits, 7) == [math.log2(3), 1.0]  # sequence 8's use of x in between does not reset it
    assert column(visits, 8) == [1.0, 0.0]
    assert column(visits, None) == [0.0, 1.0]
    assert column(visits, 9) == [0.0, 0.0]  # never seen
    assert column(length, 7) == [2.0, 2.0]  # its tokens 10, 11, 12 and the current one, not 15 - 10 + 1
    assert column(length, 8, token=13) == [0.0, 0.0]  # token 13 is its only one and the current one
    assert column(length, 8, token=14) == [1.0, 1.0]
    assert column(length, 9) == [0.0, 0.0]
    previous = "used by the current sequence's previous token at its layer (1 or 0)"
    assert column(previous, 7) == [0.0, 0.0]  # its last token (12) used y, but token 15 is its fourth
    assert column(previous, 7, token=12) == [0.0, 1.0]  # during its token 12: y was used by it at layer 0
    assert column(previous, 8, token=13) == [1.0, 0.0]
    assert column(previous, 8, token=14) == [0.0, 0.0]  # the next use of layer 0 comes in its next token
    assert column("log2(sequences among the last 64 tokens)", 7) == [math.log2(3)] * 2  # 7, 8 and none
    for other in range(ExpertFeatures.MAX_SEQUENCES - 1):  # with 8 and None: MAX_SEQUENCES since 7 was seen
        features.observe("y", Access("y", 20 + other, step=20 + other, sequence=100 + other), steps=20.0 + other)
    assert column(visits, 7, token=60) == [0.0, 0.0]
    assert column(length, 7, token=60) == [0.0, 0.0]


def test_learned_features_of_interleaved_requests_are_each_request_alone():
    """Replayed in a serving engine's order (requests side by side), each request's visit counts and length
    at each of its accesses are those of the request replayed alone."""
    from tierflow.trace.synth import engine_order

    arrays = generate_arrays(2, 8, 2, 120, num_sequences=5, seed=3, params=ROUTING_PROFILES["coarse"])
    alone = Requests.from_experts(arrays["experts"], 8, arrays["gate_scores"], sequence_id=arrays["sequence_id"])
    served = alone.tokens_in_order(engine_order(arrays["sequence_id"], 3))
    assert sorted(served.keys.tolist()) == sorted(alone.keys.tolist())
    assert served.sequences[:4 * 3 * 2:4].tolist() != sorted(served.sequences[:4 * 3 * 2:4].tolist())  # interleaved

    def per_request(requests):
        features, seen = ExpertFeatures(num_layers=2), {}
        for i, (key, step, sequence) in enumerate(zip(requests.keys.tolist(), requests.steps.tolist(),
                                                      requests.sequences.tolist(), strict=True)):
            features.observe(key, Access(key, i, layer=key // 8, step=step, sequence=sequence), steps=i / 4)
            row = features.rows(np.array([features.slot_of[key]]), i / 4, step, key // 8, sequence)[0]
            seen.setdefault(sequence, []).append((key, row[15], row[16], row[17]))
        return seen

    assert per_request(served) == per_request(alone)


def test_learned_request_reuse_flag_is_the_previous_token_flag_for_requests_one_at_a_time():
    """Replayed one request after another, "used by the current sequence's previous token" is "used by the
    previous token" at every access except a request's first token (the previous token is another request's)."""
    arrays = generate_arrays(3, 8, 2, 90, num_sequences=3, seed=4, params=ROUTING_PROFILES["coarse"])
    requests = Requests.from_experts(arrays["experts"], 8, sequence_id=arrays["sequence_id"])
    features = ExpertFeatures(num_layers=3)
    first_tokens = set(np.flatnonzero(np.r_[True, np.diff(arrays["sequence_id"]) != 0]).tolist())
    flags = (FEATURES.index("used by the previous token at its layer (1 or 0)"),
             FEATURES.index("used by the current sequence's previous token at its layer (1 or 0)"))
    compared = 0
    for i, (key, step, sequence) in enumerate(zip(requests.keys.tolist(), requests.steps.tolist(),
                                                  requests.sequences.tolist(), strict=True)):
        slots = features.resident_slots()
        if len(slots) and step not in first_tokens:
            rows = features.rows(slots, i / 6, step, key // 8, sequence)
            np.testing.assert_array_equal(rows[:, flags[0]], rows[:, flags[1]])
            compared += len(slots)
        features.observe(key, Access(key, i, layer=key // 8, step=step, sequence=sequence), steps=i / 6)
    assert compared > 1000


@pytest.mark.parametrize(("profile", "shape", "tokens", "scope", "capacity"), [
    ("fine_grained", (16, 64, 8), 150, "global", 256),  # 25% of all experts
    ("fine_grained", (16, 64, 8), 150, "per-layer", 16),
    ("coarse", (32, 8, 2), 300, "global", 26),  # 10%: LRU gets no hit at all
])
def test_learned_beats_lru_and_lfu_on_a_synthetic_trace_it_never_saw(profile, shape, tokens, scope, capacity):
    """The shipped weights on a fresh trace (seed 2024, which no training trace uses): above LRU and LFU by at
    least 2 points of hit rate, and at least a tenth of LRU's gap to Belady closed."""
    num_layers, num_experts, top_k = shape
    arrays = generate_arrays(num_layers, num_experts, top_k, tokens, seed=2024, params=ROUTING_PROFILES[profile])
    requests = Requests.from_experts(arrays["experts"], num_experts, arrays["gate_scores"])
    rate = {policy: replay(requests, policy, [capacity], scope)[0].hit_rate
            for policy in ("lru", "lfu", "learned", "belady")}
    assert rate["learned"] >= max(rate["lru"], rate["lfu"]) + 0.02, rate
    assert rate["learned"] - rate["lru"] >= 0.1 * (rate["belady"] - rate["lru"]), rate


# ----------------------------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("name", POLICIES.names())
def test_every_policy_follows_the_protocol(name):
    """The same protocol for every registered policy: fills to capacity, evicts only unpinned keys, reports
    a full-of-pinned cache as an error without evicting anything, and keeps its ordering in step."""
    cache = TierCache(make_policy(name, None, CacheContext(4, num_layers=2, num_experts=8)), 4)
    following = next_use(np.array([k % 9 for k in range(60)]))
    for time in range(60):
        key = time % 9
        access = Access(key, time, layer=key // 8, score=0.3, step=time // 2,
                        next_use=NEVER if following[time] < 0 else int(following[time]))
        if not cache.lookup(key, access):
            cache.admit(key, 1, access)
        cache.check_valid()
        assert len(cache) <= 4
    for key in list(cache.keys()):
        cache.pin(key)
    with pytest.raises(CacheFullError, match="pinned"):
        cache.admit(99, 1, Access(99, 61))
    assert len(cache) == 4
    cache.unpin(next(iter(cache.keys())))
    evicted = cache.admit(99, 1, Access(99, 62))
    assert len(evicted) == 1 and not cache.is_pinned(evicted[0])
    cache.check_valid()


def test_unknown_policy_and_parameter_list_the_valid_ones():
    with pytest.raises(TierflowError, match="valid: belady, fifo, finemoe, learned, lfu, lfu_aging, lru"):
        make_policy("mru")
    with pytest.raises(TierflowError, match="valid: half_life, keep_history"):
        make_policy("lfu_aging", {"halflife": 3})
    with pytest.raises(TierflowError, match="half_life must be > 0"):
        make_policy("lfu_aging", {"half_life": 0})


# ----------------------------------------------------------------------------------------------- scopes


def test_per_layer_scope_keeps_each_layer_within_its_budget():
    cache = make_expert_cache("lru", "per-layer", [1, 3], num_layers=2, num_experts=10)
    assert isinstance(cache, LayeredCache) and cache.capacity_bytes == 4
    for time, key in enumerate([0, 1, 2, 10, 11, 12, 13, 0]):
        if not cache.lookup(key, Access(key, time, layer=key // 10)):
            cache.admit(key, 1, Access(key, time, layer=key // 10))
        cache.check_valid()
    assert set(cache.caches[0].keys()) == {0} and set(cache.caches[1].keys()) == {11, 12, 13}
    assert cache.stats.hits == 0 and cache.stats.misses == 8


def test_global_scope_is_one_pool():
    cache = make_expert_cache("lru", "global", 3, num_layers=2, num_experts=10)
    assert isinstance(cache, TierCache) and cache.capacity_bytes == 3
    # A numpy integer is a capacity too (it was refused as "per-layer budgets", or failed in per-layer scope).
    assert make_expert_cache("lru", "global", np.int64(3), num_layers=2, num_experts=10).capacity_bytes == 3
    assert make_expert_cache("lru", "per-layer", np.int64(3), num_layers=2, num_experts=10).capacity_bytes == 6
    with pytest.raises(ValueError, match="not resident"):  # as evict and unpin say, not a bare KeyError
        cache.discard(7)


def test_bad_scope_and_budgets_are_errors():
    with pytest.raises(TierflowError, match="valid: global, per-layer"):
        make_expert_cache("lru", "layer", 3, num_layers=2, num_experts=10)
    with pytest.raises(TierflowError, match="got 3 for 2 layers"):
        make_expert_cache("lru", "per-layer", [1, 2, 3], num_layers=2, num_experts=10)


@pytest.mark.parametrize("policy, params, message", [
    ("lfu_aging", {"keep_history": "maybe"}, "cache policy 'lfu_aging': keep_history must be true or false, got 'maybe'"),
    ("finemoe", {"smoothing": True}, "cache policy 'finemoe': smoothing must be a number, got True"),
    ("learned", {"rerank_every": 1.5}, "cache policy 'learned': rerank_every must be an integer, got 1.5"),
    ("learned", {"weights": 5}, "cache policy 'learned': weights must be a string, got 5"),
    ("lfu_aging", {"half_life": float("inf")}, "cache policy 'lfu_aging': half_life must be a finite number, got inf"),
])
def test_plugin_parameters_of_the_wrong_type_are_one_readable_line(policy, params, message):
    with pytest.raises(TierflowError) as caught:
        POLICIES.params(policy, params)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert "Attribute(" not in str(caught.value)


def test_plugin_parameters_of_the_right_type_still_build():
    assert POLICIES.params("learned", {"rerank_every": 2.0}).rerank_every == 2
    assert POLICIES.params("finemoe", {"smoothing": 1}).smoothing == 1.0
    assert POLICIES.params("lfu_aging", {"keep_history": False}).keep_history is False


@pytest.mark.parametrize("name, params, message", [
    ("transition", {"min_observations": -1}, "min_observations must be >= 0"),
    ("oracle", {"seed": -1}, "seed must be >= 0"),
    ("oracle", {"accuracy": float("nan")}, "accuracy must be a finite number"),
])
def test_prefetcher_parameters_out_of_range_are_errors(name, params, message):
    from tierflow.prefetch import PREFETCHERS

    with pytest.raises(TierflowError, match=message):
        PREFETCHERS.params(name, params)


def test_lfu_aging_history_and_finemoe_smoothing_hand_worked():
    # Half-life 1e9: scores are access counts. a a b c (b:1 evicted) b (c:1 evicted) c: with history b counts 2
    # like a, whose accesses are older, so a goes and the last b hits; without, b restarted at 1 and goes.
    keys = list("aabcbcb")
    kept, _ = run("lfu_aging", keys, 2, {"half_life": 1e9, "keep_history": True})
    forgot, _ = run("lfu_aging", keys, 2, {"half_life": 1e9, "keep_history": False})
    assert (hit_pattern(kept), hit_pattern(forgot)) == (".H....H", ".H.....")
    # FineMoE, smoothing 0.25: a at 0.8 then 0.0 -> p = 0.8 + 0.25 (0 - 0.8) = 0.6, 2 visits -> 1.2; c: 0.9, so
    # d evicts c.
    _, cache = run("finemoe", list("aacd"), 2, None, scores=[0.8, 0.0, 0.9, 0.5])
    assert set(cache.keys()) == {"a", "d"}
