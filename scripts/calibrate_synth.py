#!/usr/bin/env python3
"""Fit the synthetic generator's routing profiles to the real OLMoE and Mixtral counts.

For each real model it searches the generator parameters that shape popularity and cross-layer structure
(skew at the first and last layer, topic divergence, state strength and concentration, affinity) to match
the statistics of tierflow.trace.calibration (per-layer entropy, top-10% share, rank-aligned cross-layer
mutual information, divergence between domains), then prints the best parameters and a table of real vs
synthetic statistics. Copy the printed parameters into ROUTING_PROFILES in src/tierflow/trace/synth.py.

    python scripts/calibrate_synth.py [--model olmoe|mistral] [--rounds N] [--tokens N]

Temporal parameters (reuse, state persistence) cannot be fitted here: the counts carry no time order.
"""

from __future__ import annotations

import argparse

import attrs
import numpy as np

from tierflow.trace import calibration, synth

FITTED = {
    # name: (low, high)
    "skew_first": (0.0, 3.0),
    "skew_last": (0.0, 3.0),
    "topic_divergence": (0.0, 1.0),
    # Stronger tilts fit the cross-layer information better but make each token's distribution so
    # concentrated that drawing k distinct experts gets slow; two is the practical ceiling.
    "state_strength_first": (0.0, 2.0),
    "state_strength_last": (0.0, 2.0),
    "state_concentration": (0.05, 3.0),
    "affinity": (0.0, 0.5),
    "num_states": (4, 64),
}


def evaluate(params, shape, tokens, seed=0):
    _, layers, experts, top_k = shape
    data = synth.generate_arrays(layers, experts, top_k, tokens, seed=seed, params=params, workers=1)
    topic_of_token = data["topic"][data["sequence_id"]]
    return calibration.synthetic_statistics(data["experts"], topic_of_token, experts)


def search(model_key, rounds, tokens, seed=0, samples=24):
    """Random samples over the box, then coordinate search around the best."""
    shape = calibration.REAL_MODELS[model_key]
    real = calibration.real_statistics(model_key)
    rng = np.random.default_rng(seed)
    best = synth.ROUTING_PROFILES[synth.routing_profile(shape[0])]
    best_distance = calibration.distance(evaluate(best, shape, tokens), real)
    for _ in range(samples):
        draw = {name: rng.uniform(low, high) for name, (low, high) in FITTED.items()}
        draw["num_states"] = int(round(draw["num_states"]))
        trial = attrs.evolve(best, **draw)
        d = calibration.distance(evaluate(trial, shape, tokens), real)
        if d < best_distance:
            best, best_distance = trial, d
    print(f"after {samples} random samples: distance {best_distance:.4f}", flush=True)
    step = 0.5
    for round_ in range(rounds):
        name = list(FITTED)[round_ % len(FITTED)]
        low, high = FITTED[name]
        current = getattr(best, name)
        for candidate in (current * (1 + step * rng.uniform(0.2, 1)), current * (1 - step * rng.uniform(0.2, 1)),
                          current + step * rng.uniform(-0.2, 0.2)):
            value = float(np.clip(candidate, low, high))
            trial = attrs.evolve(best, **{name: round(value) if isinstance(current, int) else value})
            d = calibration.distance(evaluate(trial, shape, tokens), real)
            if d < best_distance:
                best, best_distance = trial, d
        if round_ % len(FITTED) == len(FITTED) - 1:
            step *= 0.8
            print(f"round {round_ + 1}: distance {best_distance:.4f}", flush=True)
    return best, best_distance, real


def table(params, model_key, tokens):
    shape = calibration.REAL_MODELS[model_key]
    real = calibration.real_statistics(model_key)
    synthetic = evaluate(params, shape, tokens, seed=1)
    lines = [f"{'statistic':<20} {'real':>24} {'synthetic':>24}"]
    for name in calibration.STATISTICS:
        fmt = lambda values: " ".join(f"{v:.3f}" for v in values)  # noqa: E731
        lines.append(f"{name:<20} {fmt(real[name]):>24} {fmt(synthetic[name]):>24}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(calibration.REAL_MODELS), default=None)
    parser.add_argument("--rounds", type=int, default=48)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=60000)
    parser.add_argument("--report-only", action="store_true", help="print the table for the shipped defaults")
    args = parser.parse_args()
    for model_key in [args.model] if args.model else sorted(calibration.REAL_MODELS):
        profile = synth.routing_profile(calibration.REAL_MODELS[model_key][0])
        params = synth.ROUTING_PROFILES[profile]
        if not args.report_only:
            params, d, _ = search(model_key, args.rounds, args.tokens, samples=args.samples)
            changed = {k: round(v, 3) for k, v in attrs.asdict(params).items() if k in FITTED}
            print(f"{profile}: {params!r}")
            print(f"{profile}: distance {d:.4f}, parameters {changed}")
        print(f"== {model_key} ({profile}) ==")
        print(table(params, model_key, args.tokens))


if __name__ == "__main__":
    main()
