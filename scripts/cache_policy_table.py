"""Regenerate the hit-rate table of docs/cache-policies.md: every cache policy on a synthetic DeepSeek-R1 trace
and on an imported Mixtral-shaped fixture, at 10%, 25% and 50% of all experts, both scopes, with each
policy's gap to Belady.

    python scripts/cache_policy_table.py [--work-dir DIR] [--write docs/cache-policies.md] [--workers 2]

Everything is regenerated from seeds: the DeepSeek-R1 trace with ``tierflow trace gen`` (seed 0), the Mixtral
fixture with scripts/make_mixtral_fixture.py (seed 7). Neither seed is among those the shipped learned-policy
weights were trained on (scripts/train_default_policy.py). Capacities are rounded to whole experts; a capacity
below top-k (Mixtral per-layer at 10%: 0.8 of 8 slots) cannot hold one layer's experts and is shown as n/a.
With ``--write`` the table replaces the lines between the markers in the markdown file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import tempfile
import time
from pathlib import Path

# One process per core already: OpenBLAS threads on top would oversubscribe the cores (the learned policy's
# small matrix products ran several times slower that way). Set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tierflow.replay import read_requests, replay  # noqa: E402

POLICY_ORDER = ["lru", "fifo", "lfu", "lfu_aging", "finemoe", "learned", "belady"]
FRACTIONS = (0.10, 0.25, 0.50)
SCOPES = ("global", "per-layer")
START, END = "<!-- cache-policy-table:start -->", "<!-- cache-policy-table:end -->"

_REQUESTS: dict = {}


def _requests(path):
    if path not in _REQUESTS:
        _REQUESTS[path] = read_requests(path)
    return _REQUESTS[path]


def capacities_for(requests, scope):
    pool = requests.num_experts * (requests.num_layers if scope == "global" else 1)
    return {fraction: round(fraction * pool) for fraction in FRACTIONS}


def run_task(path, policy, scope):
    """Hit rates of one policy in one scope at every fraction (None where the capacity is below top-k)."""
    requests = _requests(path)
    feasible = {f: c for f, c in capacities_for(requests, scope).items() if c >= requests.top_k}
    start = time.perf_counter()
    results = replay(requests, policy, list(feasible.values()), scope)
    rates = {f: r.hit_rate for f, r in zip(feasible, results, strict=True)}
    return path, policy, scope, rates, time.perf_counter() - start


def make_traces(work_dir: Path, deepseek_tokens: int, mixtral_tokens: int) -> dict[str, Path]:
    import make_mixtral_fixture

    from tierflow.trace.synth import generate

    deepseek = work_dir / "deepseek-r1-seed0.h5"
    if not deepseek.exists():
        generate("deepseek-r1", deepseek_tokens, deepseek, seed=0)
    mixtral = work_dir / "mixtral-imported.h5"
    if not mixtral.exists():
        make_mixtral_fixture.main([str(work_dir), "--tokens", str(mixtral_tokens), "--seed", "7"])
    return {f"DeepSeek-R1, synthetic (seed 0, {deepseek_tokens:,} tokens)": deepseek,
            f"Mixtral-8x7B, synthetic routing through the per-step importer (seed 7, {mixtral_tokens:,} tokens)":
                mixtral}


def markdown(traces: dict[str, Path], rates: dict, seconds: dict) -> str:
    lines = []
    for title, path in traces.items():
        requests = _requests(path)
        lines += [f"**{title}**: {len(requests):,} accesses, {requests.num_layers} layers x "
                  f"{requests.num_experts} experts, top-{requests.top_k}.", ""]
        columns = [(scope, f, c) for scope in SCOPES for f, c in capacities_for(requests, scope).items()]
        header = "| policy | " + " | ".join(
            f"{scope} {round(f * 100)}% ({c}{'/layer' if scope == 'per-layer' else ''})"
            for scope, f, c in columns) + " |"
        lines += [header, "|---" * (len(columns) + 1) + "|"]
        for policy in POLICY_ORDER:
            cells = []
            for scope, fraction, _ in columns:
                rate = rates[path, policy, scope].get(fraction)
                bound = rates[path, "belady", scope].get(fraction)
                if rate is None:
                    cells.append("n/a")
                elif policy == "belady":
                    cells.append(f"{rate:.3f}")
                else:
                    cells.append(f"{rate:.3f} ({100 * (rate - bound):+.1f})")
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
        closed = []
        for scope, fraction, _ in columns:
            lru = rates[path, "lru", scope].get(fraction)
            if lru is None:
                closed.append("n/a")
                continue
            learned, bound = rates[path, "learned", scope][fraction], rates[path, "belady", scope][fraction]
            closed.append(f"{(learned - lru) / (bound - lru):.0%}" if bound > lru else "-")
        lines.append("| learned: share of LRU's gap to Belady closed | " + " | ".join(closed) + " |")
        lines.append("")
    total = sum(seconds.values())
    lines.append(f"Hit rate (gap to Belady in percentage points). Replay time {total:.0f} s summed over the worker processes.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="Where traces go (default: a temporary dir).")
    parser.add_argument("--deepseek-tokens", type=int, default=2000)
    parser.add_argument("--mixtral-tokens", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", type=Path, default=None, help="Markdown file whose table to replace.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        traces = make_traces(work_dir, args.deepseek_tokens, args.mixtral_tokens)
        tasks = [(path, policy, scope) for path in traces.values() for policy in POLICY_ORDER for scope in SCOPES]
        tasks.sort(key=lambda task: task[1] != "learned")  # the slowest first
        rates, seconds = {}, {}
        with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
            for path, policy, scope, result, took in pool.map(run_task, *zip(*tasks, strict=True)):
                rates[path, policy, scope] = result
                seconds[path, policy, scope] = took
                print(f"{path.name} {policy} {scope}: {took:.1f} s", file=sys.stderr)
        table = markdown(traces, rates, seconds)
    print(table)
    if args.write:
        text = args.write.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        args.write.write_text(f"{head}{START}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    main()
