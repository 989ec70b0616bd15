"""Retrain the learned policy's shipped weights (src/tierflow/cache/data/learned_default.npz).

    python scripts/train_default_policy.py [--work-dir DIR] [--out PATH] [--rounds 2] [--dagger-tokens 300]

Training data are synthetic traces only, with seeds that no evaluation uses (the table in
docs/cache-policies.md replays DeepSeek-R1 seed 0 and the Mixtral fixture seed 7; the design choices were
compared on validation traces of seeds 31 to 33): several model shapes, both routing profiles (fine-grained:
DeepSeek, Qwen, OLMoE, gpt-oss; coarse: Mixtral), and some with generator parameters moved away from the
calibrated profiles (more or less reuse, longer or shorter routing states), so that the network does not learn
one generator's constants. The same as ``tierflow train-policy`` on these traces; same inputs and seed, same
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
# (catalog model, tokens, seed, generator overrides).
TRAINING_TRACES = [
    ("deepseek-r1", 800, 101, ()),
    ("qwen3-30b-a3b", 1500, 102, ()),
    ("olmoe-1b-7b", 2000, 103, ()),
    ("mixtral-8x7b", 5000, 104, ()),
    ("gpt-oss-20b", 2500, 105, ()),
    ("deepseek-v2-lite", 1500, 106, ("reuse=0.15",)),
    ("mixtral-8x7b", 4000, 107, ("reuse=0.45", "state_persistence=0.8")),
    ("qwen1.5-moe-a2.7b", 2000, 108, ("state_persistence=0.4", "tokens_per_sequence=256")),
]


def training_traces(work_dir: Path) -> list[Path]:
    paths = []
    for model, tokens, seed, overrides in TRAINING_TRACES:
        path = work_dir / f"train-{model}-seed{seed}.h5"
        if not path.exists():
            generate(model, tokens, path, seed=seed, params=SynthParams.for_model(model).with_overrides(overrides))
        paths.append(path)
    return paths


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
        paths = training_traces(work_dir)
        report = training.train([read_requests(path) for path in paths], args.out, seed=args.seed,
                                rounds=args.rounds, later_tokens=args.dagger_tokens, sources=[path.name for path in paths])
    print(f"wrote {args.out}: {report}")


if __name__ == "__main__":
    main()
