"""Compare learned-policy weights on the validation traces of docs/cache-policies.md ("How the design was chosen").

    python scripts/validate_learned.py [--weights FILE] [--param K=V ...] [--work-dir DIR]

Three synthetic traces that neither training (scripts/train_default_policy.py) nor the results table
(scripts/cache_policy_table.py) uses: DeepSeek-R1 (400 tokens, seed 31), Mixtral-8x7B (3,000 tokens, seed 32),
Qwen3-30B-A3B (600 tokens, seed 33), at 10%, 25% and 50% of the pool in both scopes (17 cells: Mixtral
per-layer 10% is below top-k). Prints per cell the hit rates of LRU, the learned policy and Belady, and the
learned policy's share of LRU's gap to Belady; then the mean share, the worst cell and the cells below LRU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from tierflow.replay import read_requests, replay  # noqa: E402
from tierflow.trace.synth import generate  # noqa: E402

VALIDATION_TRACES = [("deepseek-r1", 400, 31), ("mixtral-8x7b", 3000, 32), ("qwen3-30b-a3b", 600, 33)]
FRACTIONS = (0.10, 0.25, 0.50)
SCOPES = ("global", "per-layer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="", help="weights file (default: the shipped weights)")
    parser.add_argument("--param", action="append", default=[], help="another learned-policy parameter K=V")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    params = {"weights": args.weights} if args.weights else {}
    params.update(item.split("=", 1) for item in args.param)
    shares, worst, below = [], None, 0
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        for model, tokens, seed in VALIDATION_TRACES:
            path = work_dir / f"validate-{model}-seed{seed}.h5"
            if not path.exists():
                generate(model, tokens, path, seed=seed, workers=1)
            requests = read_requests(path)
            for scope in SCOPES:
                pool = requests.num_experts * (requests.num_layers if scope == "global" else 1)
                capacities = [round(f * pool) for f in FRACTIONS if round(f * pool) >= requests.top_k]
                lru = replay(requests, "lru", capacities, scope)
                learned = replay(requests, "learned", capacities, scope, params or None)
                belady = replay(requests, "belady", capacities, scope)
                for capacity, a, b, c in zip(capacities, lru, learned, belady, strict=True):
                    share = (b.hit_rate - a.hit_rate) / (c.hit_rate - a.hit_rate)
                    shares.append(share)
                    below += share < 0
                    cell = f"{model} {scope} {capacity}"
                    if worst is None or share < worst[0]:
                        worst = (share, cell)
                    print(f"{cell}: lru {a.hit_rate:.4f} learned {b.hit_rate:.4f} belady {c.hit_rate:.4f} "
                          f"closed {share:.1%}", flush=True)
    print(f"mean closed {sum(shares) / len(shares):.1%} over {len(shares)} cells; worst {worst[0]:+.0%} "
          f"({worst[1]}); {below} below LRU")


if __name__ == "__main__":
    main()
