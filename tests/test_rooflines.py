"""Whole steps against rooflines written out by hand from the models' shapes and the datasheet figures, not from
the simulator's own compute model: every FLOP, byte, transfer and joule of a one-token run is derived here.

The figures are those of the catalog's profiles (each cited there): H100 SXM 989.4 TFLOPS dense BF16 and
3.352 TB/s HBM3; H200 989.4 / 1978.8 TFLOPS dense BF16 / FP8 and 4.8 TB/s HBM3e; PCIe Gen5 x16 35.2 GB/s with
5 us per copy; NVLink 4 380 GB/s a direction with 0.8 us per message; pJ/bit: DDR5 read 9.2, PCIe PHY 11.4,
HBM3 4.2; background power 70 W per H100 (with its HBM) and 57 W for its host DDR5.
"""

from __future__ import annotations

import numpy as np
import pytest

from tierflow.catalog import get_model
from tierflow.config import load_scenario
from tierflow.sim.engine import Simulation
from tierflow.trace.format import write_trace


def _one_token(tmp_path, model: str, num_layers: int, num_experts: int, top_k: int, scenario: str, settings):
    """Every layer routes the token to experts 0..k-1; one sequence, one decode step."""
    path = tmp_path / "token.h5"
    experts = np.tile(np.arange(top_k, dtype=np.int64), (1, num_layers, 1))
    write_trace(path, experts, np.zeros(1, dtype=np.int64), model=model, num_experts=num_experts, source="hand")
    sim = Simulation(load_scenario(scenario, ["workload.decode_tokens=1", "workload.batch_size=1",
                                              "workload.context_length=1024", *settings]), path)
    return sim, sim.run().summary


def test_olmoe_from_ddr_on_one_h100(tmp_path):
    """OLMoE-1B-7B on one H100, experts in DDR, a cold cache: each of the 16 layers copies its 8 experts one after
    another over PCIe Gen5 x16 before computing."""
    layers, k, n, hidden, heads, head_dim = 16, 8, 64, 2048, 16, 128
    sim, s = _one_token(tmp_path, "olmoe-1b-7b", layers, n, k, "ddr_offload", [
        "model=olmoe-1b-7b", "hardware=h100-pcie5", "gpus=1", "placement=ddr", "cache.capacity_experts=128",
        "prefetch.policy=none"])
    expert = 3 * hidden * 1024 * 2  # gate, up, down of 1,024 columns, BF16
    copy = 5e-6 + expert / 35.2e9
    stall = layers * k * copy
    attention_weights = 4 * hidden * heads * head_dim + hidden * n  # q, k, v, o and the router
    kv = 1024 * 2 * heads * head_dim * 2  # K and V of 1,024 tokens, BF16
    attention_flops = 2 * attention_weights + 4 * heads * head_dim * 1024
    attention_bytes = attention_weights * 2 + kv
    vocab = 50304
    flops = layers * (attention_flops + k * 2 * 3 * hidden * 1024) + 2 * vocab * hidden
    read = layers * (attention_bytes + k * expert) + vocab * hidden * 2
    latency = (layers * (max(attention_flops / 989.4e12, attention_bytes / 3.352e12)
                         + max(k * 2 * 3 * hidden * 1024 / 989.4e12, k * expert / 3.352e12))
               + max(2 * vocab * hidden / 989.4e12, vocab * hidden * 2 / 3.352e12) + stall)
    assert s["stall_s_per_token"] == pytest.approx(stall, rel=1e-9)
    assert s["latency_s_per_token"]["mean"] == pytest.approx(latency, rel=1e-9)
    assert s["bytes_moved"] == {"ddr->hbm": layers * k * expert}
    assert (sim.ledger.flops, sim.ledger.hbm_read_bytes) == (pytest.approx(flops), pytest.approx(read))
    bits = 8 * layers * k * expert
    energy = s["energy_j_per_token"]
    assert energy["ddr"] == pytest.approx(bits * 9.2e-12, rel=1e-9)
    assert energy["link"] == pytest.approx(bits * 11.4e-12, rel=1e-9)
    assert energy["hbm"] == pytest.approx((bits + 8 * read) * 4.2e-12, rel=1e-9)  # written in, read by compute
    assert energy["static"] == pytest.approx((70 + 57) * latency, rel=1e-9)
    spec = get_model("olmoe-1b-7b")
    assert s["peak_hbm_bytes"] == spec.total_non_expert_bytes + spec.kv_bytes(1025, 1) + 128 * expert


def test_deepseek_r1_in_hbm_on_eight_h200(tmp_path):
    """DeepSeek-R1 (FP8) on 8 x H200, every expert in HBM: MLA attention tensor-parallel over 8 GPUs (its latent
    KV on every GPU), weight GEMMs at the FP8 rate and the rest at BF16, a ring all-reduce after each attention
    (two in each of the 3 dense layers), the token's 8 experts one per GPU with an all-to-all each way."""
    layers, hidden, gpus, context = 58, 7168, 8, 1024
    sim, s = _one_token(tmp_path, "deepseek-r1", layers, 256, 8, "hbm_only", [])
    fp8 = 1 + 4 / 128**2  # one byte a weight plus a 4-byte scale per 128 x 128 block
    bf16_rate, fp8_rate, hbm_bw = 989.4e12, 1978.8e12, 4.8e12
    attention = hidden * 1536 + 1536 * 128 * 192 + hidden * 576 + 512 * 128 * 256 + 128 * 128 * hidden  # MLA
    shared, router = 3 * hidden * 2048, hidden * 256
    latent = 576 * 2  # BF16 bytes a token per layer
    context_flops = 2 * 128 * 576 * context + 2 * 128 * 512 * context  # absorbed MLA over the cache
    all_reduce = 2 * (gpus - 1) * (0.8e-6 + hidden * 2 / gpus / 380e9)
    all_to_all = 2 * ((gpus - 1) * 0.8e-6 + gpus * hidden * 2 / gpus * (gpus - 1) / gpus / 380e9)

    def tensor_parallel(ffn: int, with_router: bool, all_reduces: int) -> float:
        weights = (attention + ffn) * fp8 + (router * 2 if with_router else 0)
        compute = (2 * (attention + ffn + (router if with_router else 0)) / fp8_rate + context_flops / bf16_rate) / gpus
        return max((weights / gpus + context * latent) / hbm_bw, compute) + all_reduces * all_reduce

    expert = round(3 * hidden * 2048 * fp8)
    experts = max(2 * 3 * hidden * 2048 / fp8_rate, expert / hbm_bw) + all_to_all
    vocab = 129280
    head = max(2 * vocab * hidden / gpus / bf16_rate, vocab * hidden * 2 / gpus / hbm_bw)
    dense = tensor_parallel(3 * hidden * 18432, False, 2)
    latency = 3 * dense + layers * (tensor_parallel(shared, True, 1) + experts) + head
    assert s["latency_s_per_token"]["mean"] == pytest.approx(latency, rel=1e-9)
    assert s["bytes_moved"] == {} and s["stall_s_per_token"] == 0
    spec = sim.spec
    expected_peak = -(-spec.total_non_expert_bytes // gpus) + 61 * 1025 * latent + 32 * layers * expert
    assert s["peak_hbm_bytes"] == pytest.approx(expected_peak, abs=1)
