"""Compare learned-policy weights on the validation traces of docs/cache-policies.md ("How the design was chosen").

    python scripts/validate_learned.py [--weights FILE] [--param K=V ...] [--work-dir DIR]

Synthetic traces that neither training (scripts/train_default_policy.py) nor the results table
(scripts/cache_policy_table.py) uses: DeepSeek-R1 (400 tokens, seed 31), Mixtral-8x7B (3,000 tokens, seed 32),
Qwen3-30B-A3B (600 tokens, seed 33), replayed one request after another (the order of ``trace gen`` files), and
two replayed as a serving engine logs them, four requests decoding side by side (the order of
``trace import --format per-step`` files): Mixtral-8x7B (3,000 tokens, seed 34) and DeepSeek-R1 (400 tokens in
8 requests, seed 35). Each at 10%, 25% and 50% of the pool in both scopes (28 cells: Mixtral per-layer 10% is
below top-k). Prints per cell the hit rates of LRU, the learned policy and Belady, and the learned policy's
share of LRU's gap to Belady; then, for each order and for all cells, the mean share, the worst cell and the
cells below LRU.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from tierflow.replay import read_requests, replay  # noqa: E402
from tierflow.trace.synth import generate  # noqa: E402

# (catalog model, tokens, seed, requests (None: the generator's default), requests decoding side by side)
VALIDATION_TRACES = [("deepseek-r1", 400, 31, None, 1), ("mixtral-8x7b", 3000, 32, None, 1),
                     ("qwen3-30b-a3b", 600, 33, None, 1),
                     ("mixtral-8x7b", 3000, 34, None, 4), ("deepseek-r1", 400, 35, 8, 4)]
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
    cells = []  # (share, order, cell)
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        for model, tokens, seed, sequences, concurrent in VALIDATION_TRACES:
            path = work_dir / f"validate-{model}-seed{seed}.h5"
            if not path.exists():
                generate(model, tokens, path, sequences=sequences, seed=seed, workers=1)
            requests = read_requests(path).interleaved(concurrent)
            order = "one request at a time" if concurrent == 1 else "requests side by side"
            for scope in SCOPES:
                pool = requests.num_experts * (requests.num_layers if scope == "global" else 1)
                capacities = [round(f * pool) for f in FRACTIONS if round(f * pool) >= requests.top_k]
                lru = replay(requests, "lru", capacities, scope)
                learned = replay(requests, "learned", capacities, scope, params or None)
                belady = replay(requests, "belady", capacities, scope)
                for capacity, a, b, c in zip(capacities, lru, learned, belady, strict=True):
                    share = (b.hit_rate - a.hit_rate) / (c.hit_rate - a.hit_rate)
                    cell = f"{model} x{concurrent} {scope} {capacity}"
                    cells.append((share, order, cell))
                    print(f"{cell}: lru {a.hit_rate:.4f} learned {b.hit_rate:.4f} belady {c.hit_rate:.4f} "
                          f"closed {share:.1%}", flush=True)
    for order in ("one request at a time", "requests side by side", None):
        chosen = [cell for cell in cells if order in (None, cell[1])]
        worst = min(chosen)
        print(f"{order or 'all'}: mean closed {sum(c[0] for c in chosen) / len(chosen):.1%} over {len(chosen)} "
              f"cells; worst {worst[0]:+.0%} ({worst[2]}); {sum(c[0] < 0 for c in chosen)} below LRU")


if __name__ == "__main__":
    main()
