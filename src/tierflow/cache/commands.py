"""``tierflow replay | plugins | train-policy``: cache-only replay, the plugin listing, and training the learned
policy."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tierflow.atomic import check_writable
from tierflow.errors import TierflowError
from tierflow.paths import OutputFile


def register(group: click.Group) -> None:
    group.add_command(replay)
    group.add_command(plugins)
    group.add_command(train_policy)


def parse_capacities(text: str, option: str = "--capacity") -> list[int]:
    """``N[,N...]``: positive integers, else a one-line error naming the bad item."""
    capacities = []
    for item in text.split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            value = None
        if value is None or value < 1 or str(value) != item.lstrip("+"):
            raise TierflowError(f"{option}: {item!r} is not a positive integer (expected N[,N...])")
        if value > 2**63 - 1:
            raise TierflowError(f"{option}: {item} is too large (at most {2**63 - 1})")
        capacities.append(value)
    return capacities


def parse_params(items) -> dict:
    """``KEY=VALUE`` policy parameters; a value is read as JSON when it parses (numbers, true/false), else text."""
    params = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TierflowError(f"--param {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        params[key.strip()] = value
    return params


INTERLEAVE_HELP = ("Replay as a serving engine decoding N requests side by side would meet them: their tokens "
                   "interleaved (for a trace that stores each request's tokens together, as `trace gen` writes).")


@click.command()
@click.argument("trace_path", metavar="TRACE", type=click.Path(path_type=Path))
@click.option("--policy", default="lru", show_default=True, help="Eviction policy (see `tierflow plugins`).")
@click.option("--capacity", "capacity_text", default=None, metavar="N[,N...]",
              help="Capacities to replay: experts in the pool (global) or slots per layer (per-layer).")
@click.option("--scope", default="global", show_default=True, help="global (one pool) or per-layer (fixed slots).")
@click.option("--layer-slots", "layer_slots_text", default=None, metavar="N,N,...",
              help="Per-layer scope: one budget per MoE layer (instead of --capacity); replayed as one capacity.")
@click.option("--param", "param_items", multiple=True, metavar="KEY=VALUE", help="A policy parameter.")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Replay only the file's first N rows.")
@click.option("--decode-only", is_flag=True,
              help="Skip prefill rows (phase 0), as the simulator does; without it every row is replayed.")
@click.option("--interleave", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help=INTERLEAVE_HELP)
@click.option("--mrc", is_flag=True, help="LRU's hit rate at every capacity, from one stack-distance pass.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per capacity.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def replay(trace_path, policy, capacity_text, scope, layer_slots_text, param_items, tokens, decode_only, interleave,
           mrc, as_json, quiet):
    """Replay a trace through one cache (no timing) and count hits and misses.

    Requests are the trace's expert activations in file order (tokens, then layers, then the top-k experts),
    prefill rows included unless --decode-only; every miss is admitted.
    """
    from tierflow import replay as replay_module
    from tierflow.cache import POLICIES
    from tierflow.cache.scope import check_scope

    check_scope(scope)
    params = parse_params(param_items)
    POLICIES.params(policy, params)
    if layer_slots_text is not None:
        if capacity_text is not None or mrc:
            raise TierflowError("--layer-slots is the capacity: leave out --capacity and --mrc")
        if scope != "per-layer":
            raise TierflowError("--layer-slots needs --scope per-layer")
        capacities = [parse_capacities(layer_slots_text, "--layer-slots")]
    elif mrc:
        if policy != "lru" or params:
            raise TierflowError("--mrc computes LRU's curve: it takes no other --policy and no --param")
        if capacity_text is not None:
            raise TierflowError("--mrc reports every capacity: leave out --capacity")
    elif capacity_text is None:
        raise TierflowError("--capacity is required (or ask for --mrc or --layer-slots)")
    else:
        capacities = parse_capacities(capacity_text)
    requests = replay_module.read_requests(trace_path, max_tokens=tokens, decode_only=decode_only)
    requests = requests.interleaved(interleave)
    if mrc:
        capacities, hits = replay_module.lru_mrc(requests, scope)
        results = [replay_module.ReplayResult("lru", int(c), scope, len(requests), int(h))
                   for c, h in zip(capacities.tolist(), hits.tolist(), strict=True)]
    else:
        # The reference path drives a cache access by access (a learned policy at a few hundred thousand accesses a
        # second at best); the fast path is one vectorised pass and shows no bar.
        total = 0 if replay_module.uses_fast_path(policy, params) else len(requests) * len(capacities)
        with _replay_progress(total, f"replaying {policy}", quiet) as bar:
            results = replay_module.replay(requests, policy, capacities, scope, params, progress=bar.update)
    if as_json:
        from tierflow.cli import echo_json

        echo_json([result.to_json() for result in results])
    else:
        click.echo(format_results(results))


PROGRESS_MIN_ACCESSES = 1_000_000  # a shorter replay is over in a few seconds: no bar


def _replay_progress(accesses: int, label: str, quiet: bool):
    """A progress bar on stderr counting replayed accesses; hidden when quiet, for none (a replay's fast path) and
    for under :data:`PROGRESS_MIN_ACCESSES`."""
    from tierflow.progress import progress_bar

    return progress_bar(accesses, label, quiet or not accesses or accesses < PROGRESS_MIN_ACCESSES)


def format_results(results) -> str:
    """A plain-text table of replay results."""
    header = ("policy", "scope", "capacity", "requests", "hits", "misses", "hit_rate")
    rows = [(r.policy, r.scope, ",".join(map(str, r.capacity)) if isinstance(r.capacity, tuple) else str(r.capacity),
             str(r.requests), str(r.hits), str(r.misses),
             "n/a" if r.hit_rate is None else f"{r.hit_rate:.4f}")
            for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join(lines)


def plugin_families() -> dict[str, list[dict]]:
    """Every registered plugin family: cache policies and prefetchers."""
    from tierflow.cache import POLICIES
    from tierflow.prefetch import PREFETCHERS

    return {"cache policies": POLICIES.describe(), "prefetchers": PREFETCHERS.describe()}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def plugins(as_json):
    """List every cache policy and prefetcher with its parameters and defaults."""
    families = plugin_families()
    if as_json:
        from tierflow.cli import echo_json

        echo_json({family.replace(" ", "_"): rows for family, rows in families.items()})
        return
    lines = []
    width = max((len(row["name"]) for rows in families.values() for row in rows), default=0)
    for family, rows in families.items():
        lines.append(f"{family}:")
        for row in rows:
            lines.append(f"  {row['name']:<{width}}  {row['summary']}")
            for param in row["params"]:
                lines.append(f"      {param['name']}={param['default']!r}  {param['help']}")
    click.echo("\n".join(lines))


@click.command("train-policy")
@click.argument("traces", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=OutputFile(), required=True,
              help="Weights file to write (.npz), for `--param weights=FILE` of the learned policy.")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Use only each trace's first N rows.")
@click.option("--decode-only", is_flag=True, help="Skip prefill rows (phase 0), as the simulator does.")
@click.option("--interleave", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help=INTERLEAVE_HELP)
@click.option("--fractions", default="0.05,0.1,0.25,0.5", show_default=True,
              help="Cache sizes to imitate Belady at, as fractions of the pool's experts.")
@click.option("--driver", default="lru", show_default=True,
              help="Policy whose cache states are sampled (labels always come from the true future, as Belady's).")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sampling rounds: each after the first is driven by the learned policy of the round before.")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--hidden", type=click.IntRange(min=1, max=4096), default=32, show_default=True, help="Hidden units.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Same seed and inputs, same weights.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_policy(traces, out, tokens, decode_only, interleave, fractions, driver, rounds, epochs, hidden, seed,
                 quiet):
    """Train the learned eviction policy to imitate Belady on TRACE files (see tierflow.cache.training)."""
    from tierflow.cache import POLICIES, training
    from tierflow.replay import read_requests

    POLICIES.get(driver)
    if out.suffix != ".npz":
        raise TierflowError(f"--out {out}: a weights file is named *.npz")
    check_writable(out)
    try:
        capacity_fractions = [float(f) for f in fractions.split(",")]
    except ValueError:
        raise TierflowError(f"--fractions {fractions!r}: expected numbers like 0.1,0.25") from None
    if not all(0.0 < f < 1.0 for f in capacity_fractions):
        raise TierflowError(f"--fractions {fractions!r}: each must be in (0, 1)")
    seen: dict = {}
    for path in traces:
        seen.setdefault(Path(path).resolve(), []).append(str(path))
    for names in seen.values():
        if len(names) > 1:
            click.echo(f"tierflow: note: {names[0]} is given {len(names)} times: each counts as a training trace of "
                       "its own (its examples weigh that many times)", err=True)
    requests_list = [read_requests(path, max_tokens=tokens, decode_only=decode_only).interleaved(interleave)
                     for path in traces]
    total = training.training_accesses(requests_list, capacity_fractions, rounds)
    with _replay_progress(total, "sampling evictions", quiet) as bar:
        report = training.train(
            requests_list, out, capacity_fractions=capacity_fractions, driver=driver, rounds=rounds, epochs=epochs,
            hidden=hidden, seed=seed, sources=[Path(path).name for path in traces], progress=bar.update,
        )
    click.echo(f"wrote {out}: {report.examples} examples from {report.decisions} decisions, {report.rounds} "
               f"round(s), {report.epochs} epochs, cross-entropy {report.train_loss:.3f}", err=True)
