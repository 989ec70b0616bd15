"""The Kyung et al. (IEEE CAL 2025) reproduction: its modelling conditions as settings, each checked against a
closed form or an independent recurrence, the headline numbers pinned as golden values
(``scripts/regen_kyung_golden.py`` regenerates them), and ``tierflow paper``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli
from tierflow import paper
from tierflow.catalog import get_model, get_profile
from tierflow.config import load_scenario
from tierflow.energy import PJ
from tierflow.sim.engine import Simulation

GOLDEN = Path(__file__).parent / "golden" / "kyung_paper.json"


def simulate(name, *settings):
    sim = Simulation(load_scenario(name, settings))
    return sim, sim.run()


@pytest.fixture(scope="module")
def paper_rows():
    return paper.run_cells(paper.paper_cells(), workers=2)


# --------------------------------------------------------------------------------------- golden values


def test_every_cell_matches_the_golden_values(paper_rows):
    golden = json.loads(GOLDEN.read_text())
    expected = {(c["model"], c["placement"], c["batch_size"]): c for c in golden["cells"]}
    assert len(paper_rows) == len(expected) == 33  # 6 Mixtral + 5 DeepSeek batch sizes x 3 placements
    for row in paper_rows:
        cell = expected[(row["model"], row["placement"], row["batch_size"])]
        for key, value in cell.items():
            if key.endswith(("_j", "_ms")):
                assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-15), (row["command"], key)


def test_headline_figures_match_the_golden_values(paper_rows):
    golden = json.loads(GOLDEN.read_text())["headline"]
    figures = json.loads(json.dumps(paper.headline(paper_rows)))  # int keys as in the file
    for model, expected in golden.items():
        got = figures[model]
        for key in ("peak_ssd_over_hbm", "peak_ddr_over_hbm"):
            assert got[key]["batch_size"] == expected[key]["batch_size"]
            assert got[key]["ratio"] == pytest.approx(expected[key]["ratio"], rel=1e-9)
        for batch, scale in expected["ssd_scale_matching_ddr"].items():
            assert got["ssd_scale_matching_ddr"][batch] == pytest.approx(scale, rel=1e-9)


def test_the_papers_conclusions_hold(paper_rows):
    """SSD offloading costs several times HBM's energy per token, DDR sits between, and SSD read energy must
    fall by about an order of magnitude (to DDR's 9.2 of 102.4 pJ/bit) before SSD matches DDR."""
    rows = paper.with_ratios(paper_rows)
    for row in rows:
        if row["placement"] == "ddr":
            assert 1.0 < row["ratio_to_hbm"]
        if row["placement"] == "ssd":
            ddr = next(r for r in rows if r["model"] == row["model"] and r["batch_size"] == row["batch_size"]
                       and r["placement"] == "ddr")
            assert row["total_j"] > ddr["total_j"] and row["ratio_to_hbm"] > 4
    for figures in paper.headline(paper_rows).values():
        assert 10 < figures["peak_ssd_over_hbm"]["ratio"] < 14  # the paper: "up to ~12x"
        for scale in figures["ssd_scale_matching_ddr"].values():
            assert scale == pytest.approx(9.2 / 102.4, rel=0.01)


# --------------------------------------------------------------------------------------- SSD energy scaling


def test_repricing_the_ledger_equals_rerunning_with_the_scaled_ssd_energy(paper_rows):
    row = next(r for r in paper_rows if r["model"] == "DeepSeek-R1" and r["placement"] == "ssd"
               and r["batch_size"] == 16)
    _, results = simulate("kyung_deepseek_r1", "placement=ssd", "workload.batch_size=16",
                          f"energy.ssd_read_pj_per_bit={102.4 * 0.3}")
    assert results.summary["energy_j_per_token"]["total"] == pytest.approx(row["total_j_ssd_x0.3"], rel=1e-12)


def test_the_crossover_scale_prices_the_ssd_cell_at_the_ddr_total(paper_rows):
    for entry in paper.scaling_rows(paper.with_ratios(paper_rows)):
        ssd = next(r for r in paper_rows if r["model"] == entry["model"] and r["placement"] == "ssd"
                   and r["batch_size"] == entry["batch_size"])
        scale = entry["scale_matching_ddr"]
        priced = ssd["total_j"] - (1 - scale) * ssd["ssd_j"]
        assert priced == pytest.approx(entry["ddr_j"], rel=1e-12)
        assert entry["scale_matching_hbm"] is None  # static and HBM energy alone exceed HBM-only's total


def test_crossover_scale_edge_cases():
    row = {"total_j": 10.0, "ssd_j": 8.0}
    assert paper.crossover_scale(row, 6.0) == pytest.approx(0.5)
    assert paper.crossover_scale(row, 1.0) is None  # below what the other components cost
    assert paper.crossover_scale(row, 12.0) == 1.0  # already below the target at full SSD energy


# --------------------------------------------------------------------------------------- the conditions


def test_uniform_routing_activates_the_closed_form_number_of_experts():
    for model, batch in (("mixtral-8x7b", 4), ("deepseek-r1-bf16", 64)):
        sim, _ = simulate("kyung_mixtral" if "mixtral" in model else "kyung_deepseek_r1", "placement=hbm",
                          f"workload.batch_size={batch}", "workload.decode_tokens=8")
        spec = get_model(model)
        e, k = spec.num_routed_experts, spec.top_k
        counts = np.array([len(x) for step in sim.workload.steps for x in step.experts])
        expected = e * (1 - (1 - k / e) ** batch)
        assert abs(counts.mean() - expected) < 4 * counts.std() / np.sqrt(len(counts)) + 1e-9
        # every token's experts are distinct, in range, and all experts are used
        rows = np.concatenate([step.rows for step in sim.workload.steps])
        assert all(len(set(r)) == k for r in rows.reshape(-1, k).tolist())
        assert set(np.unique(rows)) == set(range(e))


def test_ahead_copies_follow_the_per_gpu_link_recurrence():
    """Ideal prefetch: each GPU's copies stream back to back in layer order from the first MoE layer; a layer's
    experts start when its attention is done and every GPU's copies of it have landed."""
    sim, results = simulate("kyung_mixtral", "placement=ddr", "workload.batch_size=16")
    compute, step = sim.compute, sim.workload.steps[0]
    bandwidth = get_profile("kyung2025").host_link.bandwidth_bytes_per_s
    gpus, size = sim.plan.gpus, sim.spec.expert_bytes
    context = sim.scenario.workload.context_length
    t = compute.dense_prefix(context).seconds  # copies start once the dense layers are done (none for Mixtral)
    landed = np.full(gpus, float(t))
    for layer, experts in enumerate(step.experts):
        landed += np.bincount(experts % gpus, minlength=gpus) * size / bandwidth
        t = max(t + compute.attention(context, layer).seconds, landed.max())
        t += compute.experts(experts.tolist(), step.tokens_per_expert[layer].tolist()).seconds
    t += compute.lm_head().seconds
    assert results.step_latency_s[0] == pytest.approx(t, rel=1e-9)


def test_ahead_copies_hold_hbm_from_their_start_until_their_layer_has_computed():
    """With copies queued ahead, the GPUs that are not the busiest receive later layers' experts long before
    those layers compute: the peak HBM counts every expert whose copy has begun and whose layer has not finished
    (the same recurrence as above, one step), not one layer's working set."""
    sim, results = simulate("kyung_mixtral", "placement=ddr", "workload.batch_size=4", "workload.decode_tokens=1")
    compute, step = sim.compute, sim.workload.steps[0]
    bandwidth = get_profile("kyung2025").host_link.bandwidth_bytes_per_s
    gpus, size = sim.plan.gpus, sim.spec.expert_bytes
    context = sim.scenario.workload.context_length
    t = compute.dense_prefix(context).seconds
    landed = np.full(gpus, float(t))
    copies = [[] for _ in range(gpus)]  # per GPU: [start, layer] of each copy
    released = []  # per layer: when its expert compute ends
    for layer, experts in enumerate(step.experts):
        for gpu in (experts % gpus).tolist():
            copies[gpu].append((landed[gpu], layer))
            landed[gpu] += size / bandwidth
        t = max(t + compute.attention(context, layer).seconds, landed.max())
        t += compute.experts(experts.tolist(), step.tokens_per_expert[layer].tolist()).seconds
        released.append(t)
    held = max(sum(start <= moment < released[layer] for start, layer in gpu_copies)
               for gpu_copies in copies for moment, _ in gpu_copies)
    working_set = max(np.bincount(e % gpus, minlength=gpus).max() for e in step.experts)
    assert held > working_set  # the case the test is about
    expected = sim.plan.non_expert_bytes_per_gpu + sim.plan.kv_bytes_per_gpu + held * size
    assert results.summary["peak_hbm_bytes"] == expected


def test_offload_takes_hbm_bandwidth_only_when_experts_are_offloaded():
    hbm = get_profile("kyung2025").gpu.hbm.read_bandwidth_bytes_per_s
    for placement, expected in (("hbm", hbm), ("ddr", hbm - 900e9), ("ssd", hbm - 900e9)):
        sim = Simulation(load_scenario("kyung_mixtral", [f"placement={placement}"]))
        assert sim.compute.hbm_bw == pytest.approx(expected)
    sim = Simulation(load_scenario("kyung_mixtral", ["placement=ssd", "timing.offload_takes_hbm_bandwidth=false"]))
    assert sim.compute.hbm_bw == hbm


def test_data_parallel_groups_read_their_own_weight_replicas():
    """Attention TP8 x DP4: each group decodes a quarter of the batch; weights are read once per group."""
    spec = get_model("deepseek-r1-bf16")
    tp8, _ = simulate("kyung_deepseek_r1", "placement=hbm", "workload.batch_size=64")
    tp32, _ = simulate("kyung_deepseek_r1", "placement=hbm", "workload.batch_size=64", "attention_tp=32")
    a8, a32 = tp8.compute.attention(1024, 0), tp32.compute.attention(1024, 0)
    weights = spec.non_expert_bytes_per_moe_layer
    assert a8.hbm_read_bytes - a32.hbm_read_bytes == pytest.approx(3 * weights)  # 4 replicas vs 1
    assert a8.flops == a32.flops
    assert (tp8.compute.tp, tp8.compute.dp, tp8.compute.group_batch) == (8, 4, 16)
    assert tp8.plan.non_expert_bytes_per_gpu == -(-spec.total_non_expert_bytes // 8)


def test_compute_energy_includes_on_chip_traffic():
    sim, results = simulate("kyung_mixtral", "placement=hbm", "workload.batch_size=64")
    ledger, tokens = sim.ledger, results.summary["tokens"]
    expected = (ledger.flops * 0.16 + 8 * (ledger.l1_bytes * 0.16 + ledger.hbm_read_bytes * 0.3)) * PJ / tokens
    assert results.summary["energy_j_per_token"]["compute"] == pytest.approx(expected, rel=1e-12)
    assert ledger.l1_bytes >= ledger.hbm_read_bytes > 0


def test_multi_node_all_to_all_takes_the_network_link():
    sim, _ = simulate("kyung_deepseek_r1", "placement=hbm", "workload.batch_size=64")
    spec, ib = sim.spec, get_profile("kyung2025").internode
    per_gpu = 64 * spec.top_k * spec.hidden_size * 2 / 32
    # 24 of 32 destinations are on other nodes; the network link is slower than NVLink's 7 local peers.
    assert sim.compute._dispatch_s == pytest.approx(2 * (24 * ib.latency_s + per_gpu * 24 / 32 / ib.bandwidth_bytes_per_s))


@pytest.mark.parametrize("settings, fragments", [
    (["--set", "attention_tp=3"], ["attention_tp", "divide"]),
    (["--set", "timing.expert_copies=ahead", "--set", "cache.enabled=true"], ["cache.enabled = false"]),
    (["--set", "workload.routing=uniform", "--set", "workload.trace=x.h5"], ["uniform"]),
    (["--set", "timing.expert_copies=later"], ["on_demand", "ahead"]),
])
def test_bad_paper_settings_get_one_line(settings, fragments):
    assert_one_line_error(run_cli("simulate", "--scenario", "kyung_mixtral", *settings), *fragments)


def test_paper_command_writes_tables_and_figures(tmp_path):
    result = run_cli("paper", "--no-beyond", "--out", tmp_path, "--json", "--quiet", check_status=0)
    figures = json.loads(result.stdout)
    assert set(figures) == {"Mixtral-8x7B", "DeepSeek-R1"}
    for name in ("paper_table.csv", "paper_table.md", "ssd_scaling.csv", "ssd_scaling.md"):
        assert (tmp_path / name).stat().st_size > 0
    for name in ("paper_energy.png", "ssd_scaling.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "paper_table.csv").read_text().splitlines()
    assert len(lines) == 34 and "tierflow simulate --scenario" in lines[1]


def test_an_interrupted_run_resumes_from_the_saved_cells(tmp_path, monkeypatch):
    cells = [c for c in paper.paper_cells() if c.model == "Mixtral-8x7B" and c.batch in (1, 4)]
    calls = []
    real = paper.run_cell

    def flaky(cell):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(cell)
        return real(cell)

    monkeypatch.setattr(paper, "run_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        paper.run_cells(cells, workers=1, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 3  # the finished cells, whole
    calls.clear()
    monkeypatch.setattr(paper, "run_cell", lambda cell: (calls.append(cell), real(cell))[1])
    resumed = paper.run_cells(cells, workers=1, cache_dir=tmp_path)
    assert calls == cells[3:]  # only the unfinished cells ran again
    assert resumed == paper.run_cells(cells, workers=1)  # and the table is the same as a run from scratch


def test_a_corrupt_saved_cell_is_run_again(tmp_path, monkeypatch):
    cells = paper.paper_cells()[:3]
    calls = []
    monkeypatch.setattr(paper, "run_cell", lambda cell: calls.append(cell) or {"model": cell.model, "total_j": 1.0})
    rows = paper.run_cells(cells, workers=1, cache_dir=tmp_path)
    assert calls == cells
    broken = tmp_path / f"{paper.cell_id(cells[1])}.json"
    broken.write_text('{"model": "half')
    (tmp_path / f"{paper.cell_id(cells[2])}.json").write_text("[1, 2]")
    calls.clear()
    assert paper.run_cells(cells, workers=1, cache_dir=tmp_path) == rows
    assert calls == cells[1:]
    assert paper.load_cached_row(broken) == rows[1]


def test_paper_json_is_valid_json_even_with_non_finite_figures():
    from tierflow.paper_commands import finite_or_null

    text = json.dumps(finite_or_null({"a": {"b": float("nan"), "c": [float("inf"), 1.5]}}), allow_nan=False)
    assert json.loads(text) == {"a": {"b": None, "c": [None, 1.5]}}


def test_a_drive_on_the_offload_link_sends_its_bits_over_it_once():
    """kyung2025-pcie5: the SSD sits on the GPU's one PCIe link, so an SSD bit pays that link's energy once, as a
    DDR bit does (it used to pay it twice)."""
    profile = get_profile("kyung2025-pcie5")
    assert profile.ssd_link == profile.host_link and profile.host_link.pj_per_bit > 0
    link_pj = {}
    for placement in ("ddr", "ssd"):
        sim, results = simulate("kyung_mixtral", f"placement={placement}", "hardware=kyung2025-pcie5",
                                "workload.batch_size=1")
        bits = 8 * sum(results.summary["bytes_moved"].values())
        link_pj[placement] = results.summary["energy_j_per_token"]["link"] * results.summary["tokens"] / bits / PJ
        assert sim.memories[0].paths[placement].route.via is None
    assert link_pj["ssd"] == pytest.approx(profile.host_link.pj_per_bit, rel=1e-9)
    assert link_pj["ddr"] == pytest.approx(link_pj["ssd"], rel=1e-9)


def test_the_real_ssd_variants_keep_the_papers_zero_link_energy():
    """kyung2025-nvme changes only the drive's timing: no energy on its Gen5 x4 link (the paper charges links
    nothing), so its link component is kyung2025's, 0; with the PCIe host link (-pcie5-nvme) only that link costs,
    as in kyung2025-pcie5."""
    def link_j(hardware):
        scenario = load_scenario("kyung_mixtral", ["placement=ssd", f"hardware={hardware}", "workload.decode_tokens=1"])
        return Simulation(scenario).run().summary["energy_j_per_token"]["link"]

    assert link_j("kyung2025") == link_j("kyung2025-nvme") == 0.0
    pcie5 = link_j("kyung2025-pcie5")
    assert pcie5 > 0 and link_j("kyung2025-pcie5-nvme") == pytest.approx(pcie5, rel=1e-9)
