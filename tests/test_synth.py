"""The synthetic routing generator: validity, determinism, and statistics that follow its parameters."""

from __future__ import annotations

import attrs
import numpy as np
import pytest

from tierflow.errors import TierflowError
from tierflow.trace import calibration, stats, synth
from tierflow.trace.format import open_trace, validate_trace

FINE = synth.ROUTING_PROFILES["fine_grained"]


def _arrays(tokens=6000, layers=6, experts=64, k=8, seed=0, **overrides):
    params = attrs.evolve(FINE, **overrides)
    return synth.generate_arrays(layers, experts, k, tokens, seed=seed, params=params)


def _reuse(data, k):
    acc = stats.RoutingAccumulator(data["experts"].shape[1], int(data["experts"].max()) + 1, k)
    acc.update(data["experts"], data["sequence_id"])
    return acc.reuse_rate


def test_rows_are_distinct_in_range_and_scores_descend():
    data = _arrays(tokens=5000, experts=16, k=8)
    experts = data["experts"]
    assert experts.min() >= 0 and experts.max() < 16
    ordered = np.sort(experts, axis=2)
    assert not (ordered[..., 1:] == ordered[..., :-1]).any()
    gates = data["gate_scores"]
    np.testing.assert_allclose(gates.sum(axis=2), 1.0, rtol=1e-5)
    assert (np.diff(gates, axis=2) <= 1e-7).all()


def test_sequences_are_contiguous_with_requested_count():
    data = _arrays(tokens=3000)
    seq, index = data["sequence_id"], data["token_index"]
    assert len(np.unique(seq)) == 3000 // FINE.tokens_per_sequence + (3000 % FINE.tokens_per_sequence > 0)
    assert (np.diff(seq) >= 0).all()
    starts = np.r_[True, seq[1:] != seq[:-1]]
    assert (index[starts] == 0).all() and (np.diff(index)[~starts[1:]] == 1).all()
    explicit = synth.generate_arrays(2, 8, 2, 100, num_sequences=7, seed=1, params=FINE)
    assert len(np.unique(explicit["sequence_id"])) == 7


def test_same_seed_same_trace_and_workers_do_not_matter():
    a = synth.generate_arrays(4, 32, 4, 40000, seed=5, params=FINE, workers=1)
    b = synth.generate_arrays(4, 32, 4, 40000, seed=5, params=FINE, workers=2)
    c = synth.generate_arrays(4, 32, 4, 40000, seed=6, params=FINE, workers=1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["experts"], c["experts"])


def test_recorded_states_leave_the_routing_unchanged():
    """``with_states`` exposes the hidden routing states without consuming randomness: same seed, same trace
    (with parallel workers too); the states follow the model (one per token with affinity 0, persisting)."""
    params = attrs.evolve(FINE, affinity=0.0)
    plain = synth.generate_arrays(3, 32, 4, 30000, seed=9, params=params, workers=2)
    recorded = synth.generate_arrays(3, 32, 4, 30000, seed=9, params=params, workers=2, with_states=True)
    for key in plain:
        np.testing.assert_array_equal(plain[key], recorded[key])
    state = recorded["state"]
    assert state.shape == (30000, 3) and state.min() >= 0 and state.max() < params.num_states
    assert (state == state[:, :1]).all()  # no cross-layer affinity: the layer-0 state holds for every layer
    same_sequence = recorded["sequence_id"][1:] == recorded["sequence_id"][:-1]
    kept = (state[1:, 0] == state[:-1, 0])[same_sequence].mean()
    assert kept > params.state_persistence  # persistence plus fresh draws that land on the same state


def test_one_long_sequence_streams_with_carry_across_chunks():
    data = synth.generate_arrays(2, 16, 2, 3 * 32768 + 5, num_sequences=1, seed=2,
                                 params=attrs.evolve(FINE, reuse=0.9, state_persistence=1.0))
    assert (data["sequence_id"] == 0).all()
    # Reuse must not drop at chunk boundaries: compare the boundary tokens' overlap to the average.
    experts = data["experts"]
    overlap = (experts[1:, :, :, None] == experts[:-1, :, None, :]).sum(axis=(1, 2, 3)) / (2 * 2)
    boundaries = [32768, 65536, 98304]
    assert overlap[[b - 1 for b in boundaries]].mean() > 0.6 * overlap.mean()


def test_reuse_parameter_sets_a_floor_on_consecutive_reuse():
    """Each slot copies the previous token's expert with probability ``reuse``; fresh slots add chance overlap."""
    measured = [_reuse(_arrays(reuse=reuse), 8) for reuse in (0.0, 0.3, 0.7, 1.0)]
    # A copied expert that collides with another slot's is redrawn, so a little of the copying is lost.
    assert measured[1] >= 0.9 * 0.3 and measured[2] >= 0.9 * 0.7
    assert measured[3] == pytest.approx(1.0)
    assert measured == sorted(measured) and measured[0] < measured[1] - 0.05


def test_without_state_or_skew_reuse_is_chance_plus_copies():
    """Uniform routing, no state: a fresh slot matches one of the previous token's k experts with chance k/E."""
    flat = dict(skew_first=0.0, skew_last=0.0, state_strength_first=0.0, state_strength_last=0.0,
                topic_divergence=0.0)
    assert _reuse(_arrays(reuse=0.0, experts=64, **flat), 8) == pytest.approx(8 / 64, abs=0.01)


def test_skew_lowers_entropy_and_zero_skew_is_near_uniform():
    flat = _arrays(skew_first=0.0, skew_last=0.0, state_strength_first=0.0, state_strength_last=0.0,
                   topic_divergence=0.0)
    skewed = _arrays(skew_first=2.5, skew_last=2.5)
    def entropy(data):
        counts = np.stack([np.bincount(data["experts"][:, layer].ravel(), minlength=64) for layer in range(6)])
        return stats.entropy_bits(counts) / 6.0
    assert entropy(flat).min() > 0.995
    assert entropy(skewed).max() < entropy(flat).min() - 0.03


def test_topic_divergence_separates_topics():
    def divergence(**overrides):
        data = _arrays(tokens=30000, **overrides)
        s = calibration.synthetic_statistics(data["experts"], data["topic"][data["sequence_id"]], 64, layers=(0, 3, 5))
        return np.mean(s["domain_divergence"])
    assert divergence(topic_divergence=0.9) > 2 * divergence(topic_divergence=0.05)


def test_state_strength_creates_cross_layer_information():
    """Against the same trace with each layer's rows shuffled across tokens (same marginals, no dependence),
    which measures what the estimator reports for independent layers."""
    def mi(strength, shuffle=False):
        data = _arrays(tokens=20000, state_strength_first=strength, state_strength_last=strength, affinity=0.0)
        experts = data["experts"].copy()
        topic = data["topic"][data["sequence_id"]]
        if shuffle:
            rng = np.random.default_rng(0)
            for t in np.unique(topic):
                rows = np.flatnonzero(topic == t)
                for layer in range(experts.shape[1]):
                    experts[rows, layer] = experts[rng.permutation(rows), layer]
        s = calibration.synthetic_statistics(experts, topic, 64, layers=(0, 3, 5))
        return np.mean(s["mutual_information"])
    assert mi(0.0) == pytest.approx(mi(0.0, shuffle=True), abs=0.03)
    assert mi(3.0) > mi(3.0, shuffle=True) + 0.15


def test_embeddings_cluster_by_topic():
    data = _arrays(tokens=20000)
    emb, topic = data["embedding"], data["topic"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    sim = emb @ emb.T
    same = topic[:, None] == topic[None, :]
    off_diagonal = ~np.eye(len(topic), dtype=bool)
    assert sim[same & off_diagonal].mean() > sim[~same].mean() + 0.3


def _defaults_against_real(model_key, seed=0):
    catalog_name, layers, experts, k = calibration.REAL_MODELS[model_key]
    params = synth.SynthParams.for_model(catalog_name)
    data = synth.generate_arrays(layers, experts, k, 40000, seed=seed, params=params, workers=2)
    synthetic = calibration.synthetic_statistics(data["experts"], data["topic"][data["sequence_id"]], experts)
    return synthetic, calibration.real_statistics(model_key)


def test_fine_grained_defaults_reproduce_olmoe_routing():
    """The tolerances the README states for the OLMoE-fitted profile (scripts/calibrate_synth.py)."""
    synthetic, real = _defaults_against_real("olmoe")
    np.testing.assert_allclose(synthetic["entropy"], real["entropy"], atol=0.04)
    np.testing.assert_allclose(synthetic["top10_share"], real["top10_share"], atol=0.08)
    np.testing.assert_allclose(synthetic["domain_divergence"], real["domain_divergence"], atol=0.05)
    mi_near, mi_far = synthetic["mutual_information"]
    assert mi_near == pytest.approx(real["mutual_information"][0], rel=0.3)
    assert real["mutual_information"][1] / 2 <= mi_far <= real["mutual_information"][1]


def test_coarse_defaults_reproduce_mixtral_popularity():
    """Mixtral's near-uniform popularity is reproduced; its weak cross-layer information is not (README)."""
    synthetic, real = _defaults_against_real("mistral")
    np.testing.assert_allclose(synthetic["entropy"], real["entropy"], atol=0.01)
    np.testing.assert_allclose(synthetic["top10_share"], real["top10_share"], atol=0.03)
    np.testing.assert_allclose(synthetic["domain_divergence"], real["domain_divergence"], atol=0.01)
    assert max(synthetic["mutual_information"]) < min(real["mutual_information"])


def test_generate_writes_a_valid_file_with_embeddings(tmp_path):
    out = tmp_path / "t.h5"
    topics = synth.generate("olmoe-1b-7b", 3000, out, seed=3, workers=1)
    meta = validate_trace(out)
    assert (meta.model, meta.num_layers, meta.num_experts, meta.top_k) == ("olmoe-1b-7b", 16, 64, 8)
    assert meta.has_gate_scores and meta.has_token_index and meta.embedding_dim == FINE.embedding_dim
    with open_trace(out) as reader:
        assert reader.embedding().shape[0] == len(topics)
    assert "profile=fine_grained" in meta.source and "seed=3" in meta.source


def test_overrides_are_checked():
    assert FINE.with_overrides(["reuse=0.5"]).reuse == 0.5
    with pytest.raises(TierflowError, match="valid: num_topics"):
        FINE.with_overrides(["nope=1"])
    with pytest.raises(TierflowError, match="reuse must be in"):
        FINE.with_overrides(["reuse=2"])
    with pytest.raises(TierflowError, match="is not a whole number"):
        FINE.with_overrides(["num_topics=x"])


def test_engine_steps_decode_requests_side_by_side():
    """Requests of 3, 1 and 2 tokens (stored one after another), two at a time: the second ends after one
    step and the third takes its place; one at a time is the stored order."""
    sequence_id = np.array([5, 5, 5, 6, 9, 9])
    assert list(synth.engine_steps(sequence_id, 2)) == [[0, 3], [1, 4], [2, 5]]
    assert synth.engine_order(sequence_id, 1).tolist() == list(range(6))
    assert synth.engine_order(sequence_id, 8).tolist() == [0, 3, 4, 1, 5, 2]
    assert synth.engine_order(np.array([], dtype=np.int64), 2).tolist() == []
    with pytest.raises(TierflowError, match="at least 1"):
        list(synth.engine_steps(sequence_id, 0))


@pytest.mark.parametrize(("experts", "k"), [(64, 8), (8, 2)])
def test_routing_concentrated_beyond_double_precision_keeps_rows_distinct(experts, k):
    """At the strongest skew and state tilt a block's top expert can hold all but 1e-14 of its mass: the
    experts drawn after it still come from the others, in range, never a repeat."""
    data = _arrays(tokens=400, layers=4, experts=experts, k=k, seed=3, skew_first=10.0, skew_last=10.0,
                   state_strength_first=20.0, state_strength_last=20.0)
    rows = data["experts"].astype(np.int64)
    assert rows.min() >= 0 and rows.max() < experts
    ordered = np.sort(rows, axis=2)
    assert not (ordered[..., 1:] == ordered[..., :-1]).any()


def test_restricted_draw_follows_the_remaining_probabilities():
    """The fallback draw for a nearly exhausted row: the experts left in the proportions of their own
    probabilities, however small beside the excluded one."""
    log_p = np.log(np.array([[1e-15, 1.0, 2e-15, 1e-15]]))
    tables = synth._LayerTables(np.exp(log_p), None, None, log_p.astype(np.float32), None)
    rng = np.random.default_rng(0)
    draws = synth._draw_restricted(rng, tables, np.zeros(40000, dtype=np.int64), np.full((40000, 1), 1))
    counts = np.bincount(draws, minlength=4) / len(draws)
    assert counts[1] == 0
    np.testing.assert_allclose(counts[[0, 2, 3]], [0.25, 0.5, 0.25], atol=0.02)


@pytest.mark.parametrize(("experts", "topics"), [(64, 12), (300, 3)])
def test_the_memory_check_counts_every_table_the_generator_keeps(experts, topics):
    """trace gen refuses up front what would not fit: its estimate covers the tables it then holds (the urns are
    two bytes an id above 256 experts, the log-probabilities a float32 table beside the float64 ones), and not
    by much more."""
    params = attrs.evolve(synth.ROUTING_PROFILES["fine_grained"], num_topics=topics)
    model = synth.RoutingModel(5, experts, 4, params, seed=0)
    kept = sum(array.nbytes for layer in model.layers for array in attrs.astuple(layer, recurse=False))
    estimate = synth.generator_bytes(5, experts, 100, 1, params)
    assert kept < estimate < 1.5 * kept
