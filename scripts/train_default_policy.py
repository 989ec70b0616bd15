"""Retrain the learned policy's shipped weights (src/tierflow/cache/data/learned_default.npz).

    python scripts/train_default_policy.py [--work-dir DIR] [--out PATH] [--rounds 2] [--dagger-tokens 300]

Training data are synthetic traces only, with seeds that no evaluation uses (the table in
docs/cache-policies.md replays DeepSeek-R1 seed 0 and the Mixtral fixture seed 7; the design choices were
compared on validation traces of seeds 31 to 35): several model shapes, both routing profiles (fine-grained:
DeepSeek, Qwen, OLMoE, gpt-oss; coarse: Mixtral), and some with generator parameters moved away from the
calibrated profiles (more or less reuse, longer or shorter routing states), so that the network does not learn
one generator's constants. Half of them are replayed as a serving engine logs them, with 2 to 16 requests
decoding side by side (their tokens interleaved: ``Requests.interleaved``), the order of
``trace import --format per-step`` files; the other half one request after another, the order of ``trace gen``
files. The same as ``tierflow train-policy`` on these traces in these orders; same inputs and seed, same
weights. The rounds after the first sample the learned policy's own cache states on the first
``--dagger-tokens`` tokens of each trace (its replay is slower than LRU's).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tierflow.cache import training
from tierflow.replay import read_requests
from tierflow.trace.synth import SynthParams, generate

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "src" / "tierflow" / "cache" / "data" / "learned_default.npz"
# (catalog model, tokens, seed, generator overrides, requests decoding side by side).
TRAINING_TRACES = [
    ("deepseek-r1", 800, 101, (), 1),
    ("qwen3-30b-a3b", 1500, 102, (), 1),
    ("olmoe-1b-7b", 2000, 103, (), 1),
    ("mixtral-8x7b", 5000, 104, (), 1),
    ("gpt-oss-20b", 2500, 105, (), 1),
    ("deepseek-v2-lite", 1500, 106, ("reuse=0.15",), 1),
    ("mixtral-8x7b", 4000, 107, ("reuse=0.45", "state_persistence=0.8"), 1),
    ("qwen1.5-moe-a2.7b", 2000, 108, ("state_persistence=0.4", "tokens_per_sequence=256"), 1),
    ("deepseek-r1", 800, 109, ("tokens_per_sequence=128",), 4),
    ("qwen3-30b-a3b", 1500, 110, ("tokens_per_sequence=128",), 8),
    ("mixtral-8x7b", 5000, 111, (), 8),
    ("olmoe-1b-7b", 2000, 112, ("tokens_per_sequence=64",), 16),
    ("gpt-oss-20b", 2500, 113, ("tokens_per_sequence=256",), 2),
    ("mixtral-8x7b", 4000, 114, ("reuse=0.45", "tokens_per_sequence=256"), 4),
]


def training_traces(work_dir: Path) -> list[tuple[Path, int]]:
    """Each training trace's file (generated into ``work_dir`` unless there) and its requests side by side."""
    traces = []
    for model, tokens, seed, overrides, concurrent in TRAINING_TRACES:
        path = work_dir / f"train-{model}-seed{seed}.h5"
        if not path.exists():
            generate(model, tokens, path, seed=seed, params=SynthParams.for_model(model).with_overrides(overrides))
        traces.append((path, concurrent))
    return traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dagger-tokens", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        traces = training_traces(work_dir)
        report = training.train([read_requests(path).interleaved(concurrent) for path, concurrent in traces],
                                args.out, seed=args.seed, rounds=args.rounds, later_tokens=args.dagger_tokens,
                                sources=[f"{path.name} x{concurrent}" for path, concurrent in traces])
    print(f"wrote {args.out}: {report}")


if __name__ == "__main__":
    main()
