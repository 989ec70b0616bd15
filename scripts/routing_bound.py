"""How well can any prefetcher that reads routing do on a synthetic trace? A bound from the generator itself.

    python scripts/routing_bound.py TRACE [--deployment ddr] [--batch 1] [--steps 128]
                                    [--thresholds 0.3 0.15 0.08 0.04] [--oracle-accuracy 0.5 0.7 0.85]

In tierflow's synthetic routing model (``tierflow.trace.synth``) each token draws its experts at a layer from
the distribution of its latent routing pattern: its sequence's topic and a routing state (in the
``fine_grained`` profile the state is the same at every layer), plus copies of the previous token's experts.
Routing carries no more about the next layer than which pattern the token follows, so a predictor that is
*told* the pattern bounds every predictor that reads routing (``expert_map``, ``speculative_gate``,
``transition``) up to the copies, which at batch 1 are in the cache anyway.

This script rebuilds the generator's tables from the trace's recorded seed (and checks them against the
trace's embeddings), recovers each decoded token's state by maximum likelihood over all its layers, and runs a
``pattern_oracle`` prefetcher: at layer ``l`` it proposes the experts of layers ``l+1 .. l+lookahead`` whose
chance of being drawn by some token of the batch, ``1 - (1 - p)^k`` under the token's pattern (``p`` its
probability of one draw, a close approximation of drawing k distinct experts), reaches the threshold. It uses
nothing of the draw itself. For comparison it also runs ``none`` and the ``oracle`` with wrong guesses mixed in
(``accuracy`` < 1), which shows how coverage turns into stall on the deployment.

The deployments are the table's (``scripts/prefetch_table.py``); the trace must be a DeepSeek-R1 trace from
``tierflow trace gen`` (the seed is read from the trace's source string).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import attrs
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import prefetch_table

from tierflow.catalog import get_model
from tierflow.errors import TierflowError
from tierflow.prefetch.base import PREFETCHERS, Prefetcher
from tierflow.trace.format import open_trace
from tierflow.trace.synth import SynthParams, _prepare

_GENERATOR: dict = {}  # the rebuilt generator tables, set by main() before any run


def rebuild_generator(path: str, model: str = "deepseek-r1") -> dict:
    """The synthetic model behind ``path``: per-layer log-probabilities of each (topic, state) block, the topic
    of each sequence, and the number of states. Fails unless the rebuilt embeddings are the trace's."""
    with open_trace(path) as reader:
        meta, embeddings = reader.meta, reader.embedding()
    seed = re.search(r"\bseed=(\d+)", meta.source or "")
    if seed is None or "tierflow synthetic" not in meta.source:
        raise TierflowError(f"{path}: not a tierflow synthetic trace (source {meta.source!r})")
    spec = get_model(model)
    params = SynthParams.for_model(spec.name)
    generator, plan = _prepare(spec.num_moe_layers, spec.num_routed_experts, spec.top_k, meta.num_tokens, None,
                               int(seed.group(1)), params)
    if embeddings is None or not np.allclose(generator.embeddings(plan.topics), embeddings, atol=1e-3):
        raise TierflowError(f"{path}: the rebuilt generator does not reproduce the trace's embeddings")
    return {"log_p": np.stack([layer.log_p for layer in generator.layers]), "topics": plan.topics,
            "states": params.num_states, "top_k": spec.top_k}


@PREFETCHERS.register
class PatternOracle(Prefetcher):
    """Knows each token's routing pattern (not its draws): proposes what the pattern makes likely."""

    name = "pattern_oracle"

    @attrs.frozen
    class Params:
        min_probability: float = attrs.field(default=0.3, converter=float,
                                             metadata={"help": "propose experts drawn with at least this chance"})

    def __init__(self, params=None, context=None):
        super().__init__(params, context)
        g = _GENERATOR
        self._log_p, self._topics, self._states, self._k = g["log_p"], g["topics"], g["states"], g["top_k"]
        self._p = np.exp(self._log_p.astype(np.float64))
        self._steps = context.workload.steps
        self._blocks: dict[int, np.ndarray] = {}

    def _step_blocks(self, step: int) -> np.ndarray:
        """Each token's (topic, state) block: the state most likely to have drawn all its layers' experts."""
        if step not in self._blocks:
            s = self._steps[step]
            rows = s.rows.astype(np.int64)  # (batch, L, k)
            topics = self._topics[s.sequence_ids.astype(np.int64)]
            blocks = topics[:, None] * self._states + np.arange(self._states)  # (batch, states)
            layers = np.arange(rows.shape[1])[None, :, None, None]
            loglik = self._log_p[layers, blocks[:, None, :, None], rows[:, :, None, :]].sum(axis=(1, 3))
            self._blocks[step] = blocks[np.arange(len(blocks)), np.argmax(loglik, axis=1)]
        return self._blocks[step]

    def on_routing(self, event):
        c = self.context
        blocks = self._step_blocks(event.step)
        proposals = []
        for target in range(event.layer + 1, min(event.layer + c.lookahead, c.num_layers - 1) + 1):
            drawn = 1.0 - (1.0 - self._p[target, blocks]) ** self._k  # (batch, E)
            need = 1.0 - np.prod(1.0 - drawn, axis=0)
            order = np.argsort(-need, kind="stable")
            proposals += [(target, int(e)) for e in order[need[order] >= self.params.min_probability]]
        return proposals


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--deployment", default="ddr", choices=["ssd", "ddr"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.15, 0.08, 0.04])
    parser.add_argument("--oracle-accuracy", type=float, nargs="+", default=[0.5, 0.7, 0.85])
    args = parser.parse_args(argv)
    _GENERATOR.update(rebuild_generator(args.trace))
    label = prefetch_table.DEEPSEEK
    base = {"label": label, "trace": args.trace, "deployment": args.deployment, "batch": args.batch,
            "steps": args.steps, "max_queued": 1}
    rows = []
    runs = ([("none", [])] + [("oracle", [f"accuracy={a}"]) for a in args.oracle_accuracy]
            + [("pattern_oracle", [f"min_probability={t}"]) for t in args.thresholds])
    for name, params in runs:
        prefetch_table.PARAMS[label, name] = params
        row = prefetch_table.run_one({**base, "prefetcher": name})
        row["prefetcher"] = f"{name} {' '.join(params)}".strip()
        rows.append(row)
    print(prefetch_table.format_rows(rows))
    return rows


if __name__ == "__main__":
    main()
