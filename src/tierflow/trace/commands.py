"""``tierflow trace gen | info | import``."""

from __future__ import annotations

import contextlib
from pathlib import Path

import attrs
import click

from tierflow.paths import OutputFile
from tierflow.progress import progress_bar
from tierflow.trace import importers, stats, synth
from tierflow.trace.format import MAX_EXPERTS, open_trace


PROGRESS_MIN_DECISIONS = 5_000_000  # tokens x MoE layers x top-k of a trace worth a progress bar
PROGRESS_MIN_IMPORT_BYTES = 50_000_000  # JSONL read at about 7 MB/s: a bar from several seconds


def register(group: click.Group) -> None:
    group.add_command(gen)
    group.add_command(info)
    group.add_command(import_)


@click.command()
@click.option("--model", "model_name", required=True, help="Catalog model name (see `tierflow catalog models`).")
@click.option("--tokens", type=click.IntRange(min=1), required=True, help="Number of tokens to generate.")
@click.option("--sequences", type=click.IntRange(min=1), default=None,
              help="Number of sequences (requests); default: one per tokens_per_sequence tokens (512 unless "
                   "set).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed (>= 0); same seed, same file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a generator parameter: " + ", ".join(attrs.fields_dict(synth.SynthParams))
                   + " (see the README).")
@click.option("--out", type=OutputFile(), required=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def gen(model_name, tokens, sequences, seed, overrides, out, quiet):
    """Write a synthetic trace: routing with skew, reuse, per-token routing states and topics (see the README)."""
    from tierflow.catalog import get_model

    params = synth.SynthParams.for_model(model_name).with_overrides(overrides)
    spec = get_model(model_name)
    # A few million routing decisions take a few seconds: no bar below that.
    decisions = tokens * spec.num_moe_layers * spec.top_k
    with progress_bar(tokens, f"generating {spec.name}", quiet or decisions < PROGRESS_MIN_DECISIONS) as bar:
        synth.generate(model_name, tokens, out, sequences=sequences, seed=seed, params=params, progress=bar.update)
    click.echo(f"wrote {out}", err=True)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def info(path, as_json):
    """Validate a whole trace file and summarise it."""
    summary = stats.summarize(path)
    with open_trace(path) as reader:
        mismatch = stats.label_mismatch(reader.meta)
    if mismatch:
        click.echo(f"tierflow: warning: {mismatch}", err=True)
    if as_json:
        from tierflow.cli import echo_json

        echo_json(summary)
    else:
        click.echo(stats.format_summary(summary))


@click.command("import")
@click.option("--format", "fmt", type=click.Choice(sorted(importers.IMPORT_FORMATS)), required=True)
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=OutputFile(), required=True)
@click.option("--model", "model_name", default=None,
              help="Catalog model name; sets num_experts and checks layer count and top-k.")
@click.option("--num-experts", type=click.IntRange(min=1, max=MAX_EXPERTS), default=None,
              help="Experts per layer when --model is not given (default: largest id seen + 1).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def import_(fmt, inputs, out, model_name, num_experts, quiet):
    """Convert routing logs written by inference-engine hooks (JSONL) into a tierflow trace."""
    with contextlib.ExitStack() as stack:

        def progress(files):
            """A bar over the input bytes, once the inputs (folders expanded) are known and checked."""
            size = sum(path.stat().st_size for path in files if path.is_file())  # a missing one: its own error
            bar = stack.enter_context(progress_bar(size, "importing", quiet or size < PROGRESS_MIN_IMPORT_BYTES))
            return bar.update

        warnings = []  # told once the trace is written: a refused import prints its one error line only
        meta = importers.import_trace(fmt, list(inputs), out, model=model_name, num_experts=num_experts,
                                      warn=warnings.append, progress=progress)
    for message in warnings:
        click.echo(f"tierflow: warning: {message}", err=True)
    click.echo(f"wrote {out}: {meta.num_tokens} tokens, {meta.num_layers} layers, top-{meta.top_k}", err=True)
