"""A Mixtral-8x7B-shaped trace that passed through the importer: synthetic routing written out as the per-step
JSONL a vLLM routing hook writes, then imported with ``tierflow trace import --format per-step``.

    python scripts/make_mixtral_fixture.py OUT_DIR [--tokens 10000] [--seed 7]

Writes ``OUT_DIR/mixtral_per_step.jsonl`` and ``OUT_DIR/mixtral-imported.h5``; the same arguments give the
same bytes. There is no real Mixtral decode trace offline: the routing comes from tierflow's synthetic
generator (``coarse`` profile, fitted to Mixtral's public routing statistics), so what this exercises is the
import path and Mixtral's shape (32 MoE layers, 8 experts, top-2), not real routing.

Records follow the per-step format of :mod:`tierflow.trace.importers`: one per (request, layer, token), with
``problem_id``, ``layer``, ``token_idx``, ``experts`` (router order) and ``gating_probs`` (4 decimals). Requests
decode in continuous batches of up to four: each engine step logs every running request at every layer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tierflow.catalog import get_model
from tierflow.trace.synth import SynthParams, engine_steps, generate_arrays

MODEL = "mixtral-8x7b"
CONCURRENT_REQUESTS = 4


def write_per_step_jsonl(path: Path, tokens: int, seed: int) -> None:
    spec = get_model(MODEL)
    arrays = generate_arrays(spec.num_moe_layers, spec.num_routed_experts, spec.top_k, tokens, seed=seed,
                             params=SynthParams.for_model(MODEL))
    experts, gates = arrays["experts"], arrays["gate_scores"]
    sequence_id, token_index = arrays["sequence_id"], arrays["token_index"]
    with open(path, "w") as out:
        for rows in engine_steps(sequence_id, CONCURRENT_REQUESTS):
            for layer in range(spec.num_moe_layers):
                for row in rows:
                    out.write(json.dumps({
                        "problem_id": f"req-{int(sequence_id[row])}", "layer": layer,
                        "token_idx": int(token_index[row]), "experts": experts[row, layer].tolist(),
                        "gating_probs": [round(float(p), 4) for p in gates[row, layer]],
                    }) + "\n")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = args.out_dir / "mixtral_per_step.jsonl"
    trace = args.out_dir / "mixtral-imported.h5"
    write_per_step_jsonl(jsonl, args.tokens, args.seed)
    subprocess.run([sys.executable, "-m", "tierflow", "trace", "import", "--format", "per-step", "--model", MODEL,
                    str(jsonl), "--out", str(trace)], check=True)
    return trace


if __name__ == "__main__":
    main()
