"""Retrain the learned policy's shipped weights (src/tierflow/cache/data/learned_default.npz).

    python scripts/train_default_policy.py [--work-dir DIR] [--out PATH]

Training data are synthetic traces only, of several model shapes, with seeds that no evaluation uses (the
table in docs/cache-policies.md replays DeepSeek-R1 seed 0 and the Mixtral fixture seed 7). The same as
``tierflow train-policy`` on these traces with the default options; same inputs and seed, same weights.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tierflow.cache import training
from tierflow.replay import read_requests
from tierflow.trace.synth import generate

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "src" / "tierflow" / "cache" / "data" / "learned_default.npz"
# (catalog model, tokens, seed): fine-grained (DeepSeek, Qwen, OLMoE) and coarse (Mixtral) routing profiles.
TRAINING_TRACES = [
    ("deepseek-r1", 800, 101),
    ("qwen3-30b-a3b", 1500, 102),
    ("olmoe-1b-7b", 2000, 103),
    ("mixtral-8x7b", 5000, 104),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for model, tokens, seed in TRAINING_TRACES:
            path = work_dir / f"train-{model}-seed{seed}.h5"
            if not path.exists():
                generate(model, tokens, path, seed=seed)
            paths.append(path)
        report = training.train([read_requests(path) for path in paths], args.out, seed=args.seed,
                                sources=[path.name for path in paths])
    print(f"wrote {args.out}: {report}")


if __name__ == "__main__":
    main()
