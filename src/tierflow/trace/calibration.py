"""Routing statistics that tie the synthetic generator to real routing counts.

The real counts (``traces/olmoe-routing-stats``) hold, per model and text domain, how often each expert was
chosen at three layers and rank-aligned cross-layer co-occurrences. :func:`real_statistics` reduces them to
a few numbers; :func:`synthetic_statistics` computes the same numbers on a generated trace, treating each
synthetic topic as a domain. ``scripts/calibrate_synth.py`` fits the generator's defaults by matching them,
and the test suite checks that the shipped defaults still do.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from tierflow.resources import traces_dir
from tierflow.trace.stats import entropy_bits, rank_aligned_counts, top_share

# The counted layers and model shapes of the real data (allenai/OLMoE scripts/run_routing_analysis.py).
REAL_MODELS = {
    # key in routing_counts.json: (catalog model, MoE layers, experts, top-k)
    "olmoe": ("olmoe-1b-7b", 16, 64, 8),
    "mistral": ("mixtral-8x7b", 32, 8, 2),
}
COUNTED_LAYERS = (0, 7, 15)
STATISTICS = ("entropy", "top10_share", "mutual_information", "domain_divergence")
# The generator cannot reach OLMoE's cross-layer information without making routing too concentrated
# to sample quickly (see scripts/calibrate_synth.py), so the fit weighs it less than the popularity shape.
WEIGHTS = {"entropy": 1.0, "top10_share": 1.0, "mutual_information": 0.25, "domain_divergence": 1.0}


def real_counts_path() -> Path:
    return traces_dir() / "olmoe-routing-stats" / "routing_counts.json"


def _js_divergence_bits(p: np.ndarray, q: np.ndarray) -> float:
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return (kl(p, m) + kl(q, m)) / 2


def _miller_madow_mi_bits(joint: np.ndarray) -> float:
    """Plug-in mutual information minus its first-order small-sample bias (Miller-Madow)."""
    joint = np.asarray(joint, dtype=np.float64)
    n = joint.sum()
    p = joint / n
    outer = p.sum(axis=1, keepdims=True) @ p.sum(axis=0, keepdims=True)
    nz = p > 0
    plug_in = float((p[nz] * np.log2(p[nz] / outer[nz])).sum())
    cells = nz.sum() - (joint.sum(axis=1) > 0).sum() - (joint.sum(axis=0) > 0).sum() + 1
    return plug_in - cells / (2 * n * np.log(2))


def _summarise(counts_by_domain: np.ndarray, joints_by_domain: list[list[np.ndarray]]) -> dict[str, list[float]]:
    """counts_by_domain: (domains, counted layers, E); joints: per domain, one matrix per adjacent layer pair."""
    num_experts = counts_by_domain.shape[-1]
    p = counts_by_domain / counts_by_domain.sum(axis=-1, keepdims=True)
    pairs = list(itertools.combinations(range(len(p)), 2))
    return {
        "entropy": (entropy_bits(counts_by_domain) / np.log2(num_experts)).mean(axis=0).tolist(),
        "top10_share": top_share(counts_by_domain, 0.1).mean(axis=0).tolist(),
        "mutual_information": np.mean(
            [[_miller_madow_mi_bits(j) for j in joints] for joints in joints_by_domain], axis=0
        ).tolist(),
        "domain_divergence": [
            float(np.mean([_js_divergence_bits(p[a, layer], p[b, layer]) for a, b in pairs])) if pairs else 0.0
            for layer in range(p.shape[1])
        ],
    }


def real_statistics(model_key: str, path: Path | None = None) -> dict[str, list[float]]:
    """Statistics of the real counts of one model ("olmoe" or "mistral"), averaged over text domains.

    entropy: popularity entropy at each counted layer as a fraction of log2(E); top10_share: share of
    selections going to the most popular 10% of experts; mutual_information: rank-aligned mutual information
    (bits) between counted layers 0->7 and 7->15; domain_divergence: mean pairwise Jensen-Shannon divergence
    (bits) between the domains' popularity at each counted layer.
    """
    data = json.loads((path or real_counts_path()).read_text())[model_key]
    domains = list(data["domains"].values())
    counts = np.array([d["expert_counts"] for d in domains], dtype=np.float64)
    joints = [[np.array(d["crosslayer_rank_aligned_counts"][key]) for key in ("0->7", "7->15")] for d in domains]
    return _summarise(counts, joints)


def synthetic_statistics(experts: np.ndarray, topic_of_token: np.ndarray, num_experts: int,
                         layers=COUNTED_LAYERS) -> dict[str, list[float]]:
    """The same statistics on a generated trace, with each topic standing in for a domain."""
    counts, joints = [], []
    for topic in np.unique(topic_of_token):
        rows = experts[topic_of_token == topic]
        counts.append([np.bincount(rows[:, layer].ravel(), minlength=num_experts) for layer in layers])
        joints.append([rank_aligned_counts(rows, a, b, num_experts) for a, b in itertools.pairwise(layers)])
    return _summarise(np.array(counts, dtype=np.float64), joints)


def distance(synthetic: dict[str, list[float]], real: dict[str, list[float]]) -> float:
    """Sum of squared relative errors over all statistics (what the calibration minimises)."""
    total = 0.0
    for name in STATISTICS:
        s, r = np.array(synthetic[name]), np.array(real[name])
        if name == "entropy":  # compare the distance from uniform, where the differences live
            s, r = 1 - s, 1 - r
        total += WEIGHTS[name] * float((((s - r) / np.maximum(np.abs(r), 0.02)) ** 2).sum())
    return total
