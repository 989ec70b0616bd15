"""The catalog: model sizes against docs/reference/models.md, hardware numbers against their sources,
the seed paper's constants exactly, and closed-form checks of the derived per-token figures."""

import json

import attrs
import click
import pytest
from click.testing import CliRunner

from tierflow.catalog import HardwareProfile, ModelSpec, get_model, get_profile, model_names, profile_names
from tierflow.catalog.commands import register
from tierflow.catalog.hardware import PROFILES, SAMSUNG_990_PRO, Link, _revised
from tierflow.catalog.models import MODELS
from tierflow.errors import TierflowError

GiB = 2**30

# MB per expert (decimal) from docs/reference/models.md.
REFERENCE_MB_PER_EXPERT = {
    "deepseek-v3": 44.0,
    "deepseek-r1": 44.0,
    "deepseek-v3-bf16": 88.1,
    "deepseek-r1-bf16": 88.1,
    "mixtral-8x7b": 352,
    "mixtral-8x22b": 604,
    "qwen1.5-moe-a2.7b": 17.3,
    "qwen3-30b-a3b": 9.44,
    "qwen3-235b-a22b": 37.7,
    "olmoe-1b-7b": 12.6,
    "deepseek-v2-lite": 17.3,
    "gpt-oss-20b": 13.2,
    "gpt-oss-120b": 13.2,
}

# Total parameters the model cards publish, in billions.
PUBLISHED_PARAMS_B = {
    "deepseek-v3": 671, "mixtral-8x7b": 46.7, "qwen1.5-moe-a2.7b": 14.3, "qwen3-30b-a3b": 30.5,
    "olmoe-1b-7b": 6.9, "deepseek-v2-lite": 15.7, "gpt-oss-20b": 21, "gpt-oss-120b": 117, "mixtral-8x22b": 141,
    "qwen3-235b-a22b": 235,
}


# Active parameters per token the model cards publish, in billions, where they count the embeddings as the catalog
# does (DeepSeek-V2-Lite's and GPT-OSS's published figures leave some of them out).
PUBLISHED_ACTIVE_PARAMS_B = {
    "deepseek-v3": 37, "mixtral-8x7b": 12.9, "mixtral-8x22b": 39, "qwen1.5-moe-a2.7b": 2.7, "qwen3-30b-a3b": 3.3,
    "qwen3-235b-a22b": 22, "olmoe-1b-7b": 1.3,
}


# --- models --------------------------------------------------------------------------------------

def test_the_catalog_has_exactly_the_reference_rows():
    assert set(model_names()) == set(REFERENCE_MB_PER_EXPERT)


@pytest.mark.parametrize("name, reference_mb", sorted(REFERENCE_MB_PER_EXPERT.items()))
def test_expert_bytes_match_the_reference_within_one_percent(name, reference_mb):
    assert get_model(name).expert_bytes / 1e6 == pytest.approx(reference_mb, rel=0.01)


@pytest.mark.parametrize("name, published_b", sorted(PUBLISHED_PARAMS_B.items()))
def test_total_params_match_the_model_cards_within_two_percent(name, published_b):
    assert get_model(name).total_params / 1e9 == pytest.approx(published_b, rel=0.02)


@pytest.mark.parametrize("name, published_b", sorted(PUBLISHED_ACTIVE_PARAMS_B.items()))
def test_active_params_match_the_model_cards_within_two_percent(name, published_b):
    spec = get_model(name)
    idle = (spec.num_routed_experts - spec.top_k) * spec.expert_params * spec.num_moe_layers
    assert (spec.total_params - idle) / 1e9 == pytest.approx(published_b, rel=0.02)


@pytest.mark.parametrize("spec", MODELS.values(), ids=MODELS.keys())
def test_layer_counts_add_up_and_moe_layers_follow_the_dense_ones(spec: ModelSpec):
    assert spec.num_dense_layers + spec.num_moe_layers == spec.num_layers
    assert spec.first_moe_layer == spec.num_dense_layers
    assert spec.source.strip()


def test_deepseek_r1_fp8_moves_about_20_4_gb_of_routed_experts_per_token_without_reuse():
    spec = get_model("deepseek-r1")
    assert spec.activated_expert_bytes_per_token == 58 * 8 * spec.expert_bytes
    assert spec.activated_expert_bytes_per_token / 1e9 == pytest.approx(20.4, rel=0.01)


def test_the_seed_paper_energies_give_the_models_md_joules_per_token():
    """models.md: ~18.1 J/token from SSD, ~2.9 J from DDR, ~0.69 J when already in HBM (DeepSeek-R1 FP8)."""
    bits = get_model("deepseek-r1").activated_expert_bytes_per_token * 8
    paper = get_profile("kyung2025")
    hbm = paper.gpu.hbm
    ssd_j = bits * (paper.ssd.read_pj_per_bit + hbm.write_pj_per_bit + hbm.read_pj_per_bit) * 1e-12
    ddr_j = bits * (paper.ddr.read_pj_per_bit + hbm.write_pj_per_bit + hbm.read_pj_per_bit) * 1e-12
    hbm_j = bits * hbm.read_pj_per_bit * 1e-12
    assert (ssd_j, ddr_j, hbm_j) == pytest.approx((18.1, 2.9, 0.69), rel=0.01)


def test_gqa_attention_flops_and_kv_bytes_match_the_closed_form():
    spec = get_model("qwen3-30b-a3b")
    hidden, heads, kv_heads, head_dim, layers = 2048, 32, 4, 128, 48
    projections = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o + k, v
    for context in (1, 1024, 32768):
        expected_flops = 2 * projections + 2 * heads * head_dim * context * 2  # q.k scores + weighted values
        assert spec.attention_flops_per_token(context) == expected_flops
        assert spec.kv_bytes(context, batch=3) == layers * (2 * kv_heads * head_dim) * 2 * context * 3
    assert spec.attention_params_per_layer == projections == 18_874_368


def test_mla_attention_flops_and_kv_bytes_match_the_closed_form():
    spec = get_model("deepseek-r1")
    hidden, heads, q_rank, kv_rank, nope, rope, v_dim, layers = 7168, 128, 1536, 512, 128, 64, 128, 61
    projections = (hidden * q_rank + q_rank * heads * (nope + rope)   # q_a, q_b
                   + hidden * (kv_rank + rope)                        # kv_a with the shared RoPE key
                   + kv_rank * heads * (nope + v_dim)                 # kv_b
                   + heads * v_dim * hidden)                          # o
    for context in (1, 1024, 32768):
        # Absorbed decode: scores against latent + RoPE key, then a weighted sum of latents.
        expected_flops = 2 * projections + 2 * heads * (kv_rank + rope) * context + 2 * heads * kv_rank * context
        assert spec.attention_flops_per_token(context) == expected_flops
        assert spec.kv_bytes(context, batch=2) == layers * (kv_rank + rope) * 2 * context * 2
    assert spec.attention_params_per_layer == projections == 187_105_280


def test_sliding_window_layers_attend_to_and_cache_at_most_the_window():
    spec = get_model("gpt-oss-120b")
    assert spec.attended_tokens(8192, layer=0) == 128
    assert spec.attended_tokens(8192, layer=1) == 8192
    assert spec.attention_flops_per_token(8192, layer=0) == spec.attention_flops_per_token(128)
    per_token = 2 * 8 * 64 * 2  # k and v, 8 KV heads of 64, BF16
    assert spec.kv_bytes(8192) == (18 * 128 + 18 * 8192) * per_token


def test_model_names_are_case_insensitive():
    assert get_model("  DeepSeek-R1 ") is get_model("deepseek-r1")


def test_an_unknown_model_lists_the_valid_names():
    with pytest.raises(TierflowError) as error:
        get_model("llama-moe")
    message = str(error.value)
    assert "\n" not in message and "'llama-moe'" in message
    assert all(name in message for name in model_names())


# --- hardware ------------------------------------------------------------------------------------

def _numeric_fields(component) -> list[str]:
    return [field.name for field in attrs.fields(type(component))
            if isinstance(getattr(component, field.name), (int, float))
            and not isinstance(getattr(component, field.name), bool)]


@pytest.mark.parametrize("profile", PROFILES.values(), ids=PROFILES.keys())
def test_every_number_of_every_component_has_a_source(profile: HardwareProfile):
    for role, component in profile.components().items():
        for field in _numeric_fields(component):
            assert component.sources.get(field, "").strip(), f"{profile.name} {role}.{field} has no source"
            assert component.sources[field].lstrip().startswith("["), f"{role}.{field}: source lacks a [P]/[D]/[S]/[DER] tag"


def test_a_component_without_a_source_for_a_number_is_rejected():
    with pytest.raises(ValueError, match="no source for latency_s"):
        Link(name="bare", bandwidth_bytes_per_s=1.0, theoretical_bandwidth_bytes_per_s=1.0, latency_s=0.0,
             pj_per_bit=0.0, sources={"bandwidth_bytes_per_s": "[D] x", "theoretical_bandwidth_bytes_per_s": "[D] x",
                                      "pj_per_bit": "[D] x"})


def test_a_revised_number_needs_a_new_citation():
    with pytest.raises(ValueError, match="needs a citation"):
        _revised(SAMSUNG_990_PRO, read_bandwidth_bytes_per_s=7.0e9)


def test_profile_names_are_case_insensitive():
    assert get_profile("H100-PCIe5") is get_profile("h100-pcie5")


def test_an_unknown_profile_lists_the_valid_names():
    with pytest.raises(TierflowError) as error:
        get_profile("tpu-v5")
    message = str(error.value)
    assert "\n" not in message and "'tpu-v5'" in message
    assert all(name in message for name in profile_names())


class TestKyung2025IsTheSeedPapersSetting:
    """The constants of scale-snu/SSD-offloading (patch/ssd_offloading.patch), as in hardware.md."""

    paper = get_profile("kyung2025")

    def test_peak_flops(self):
        assert self.paper.gpu.peak_flops == 989.4e12

    def test_hbm_bandwidth(self):
        assert self.paper.gpu.hbm.read_bandwidth_bytes_per_s == 3.352e12

    def test_hbm_capacity(self):
        assert self.paper.gpu.hbm.capacity_bytes == 80 * GiB  # the artifact's 80.0 * 1024^3

    def test_hbm_read_energy(self):
        assert self.paper.gpu.hbm.read_pj_per_bit == 4.2

    def test_hbm_write_energy(self):
        assert self.paper.gpu.hbm.write_pj_per_bit == 4.2

    def test_ddr_read_energy(self):
        assert self.paper.ddr.read_pj_per_bit == 9.2

    def test_ssd_read_energy(self):
        assert self.paper.ssd.read_pj_per_bit == 102.4

    def test_energy_per_flop(self):
        assert self.paper.gpu.pj_per_flop == 0.16

    def test_l1_energy(self):
        assert self.paper.gpu.l1_pj_per_bit == 0.16

    def test_l2_energy(self):
        assert self.paper.gpu.l2_pj_per_bit == 0.3

    def test_gpu_background_power_includes_hbm(self):
        assert self.paper.gpu.static_power_w == 70
        assert self.paper.gpu.hbm.static_power_w == 0

    def test_ddr_background_power_per_gpu(self):
        assert self.paper.ddr_static_power_w_per_gpu == 57

    def test_ssd_background_power_is_ignored(self):
        assert self.paper.ssd.static_power_w == 0

    def test_link_energy_is_not_modelled(self):
        assert self.paper.host_link.pj_per_bit == 0
        assert self.paper.ssd_link.pj_per_bit == 0
        assert self.paper.nvlink.pj_per_bit == 0

    def test_offload_link_is_nvlink_c2c_at_900_gb_per_s(self):
        assert self.paper.host_link.bandwidth_bytes_per_s == 900e9
        assert self.paper.ssd_link.bandwidth_bytes_per_s == 900e9

    def test_ssd_keeps_up_with_the_link(self):
        assert self.paper.ssd.read_bandwidth_bytes_per_s == self.paper.ssd_link.bandwidth_bytes_per_s

    def test_nvlink4_bandwidth(self):
        assert self.paper.nvlink.bandwidth_bytes_per_s == 450e9

    def test_ssd_bits_go_straight_to_hbm(self):
        assert self.paper.gpudirect_storage

    def test_end_to_end_cost_of_one_offloaded_bit_used_once(self):
        """hardware.md [DER]: SSD 110.8, DDR 17.6, HBM-resident 4.2 pJ/bit."""
        hbm = self.paper.gpu.hbm
        assert self.paper.ssd.read_pj_per_bit + hbm.write_pj_per_bit + hbm.read_pj_per_bit == pytest.approx(110.8)
        assert self.paper.ddr.read_pj_per_bit + hbm.write_pj_per_bit + hbm.read_pj_per_bit == pytest.approx(17.6)


def test_the_450_gb_per_s_variant_differs_only_in_the_offload_rate():
    fast, slow = get_profile("kyung2025"), get_profile("kyung2025-c2c450")
    assert slow.host_link.bandwidth_bytes_per_s == slow.ssd_link.bandwidth_bytes_per_s == 450e9
    assert slow.ssd.read_bandwidth_bytes_per_s == 450e9
    assert slow.gpu == fast.gpu and slow.nvlink == fast.nvlink
    assert slow.ssd.read_pj_per_bit == fast.ssd.read_pj_per_bit


# --- the commands ----------------------------------------------------------------------------------

@pytest.fixture
def catalog_cli():
    @click.group()
    def root():
        pass

    register(root)
    return lambda *args: CliRunner().invoke(root, ["catalog", *args])


def test_catalog_models_json_is_the_only_stdout_and_carries_derived_sizes(catalog_cli):
    result = catalog_cli("models", "--json")
    assert result.exit_code == 0, result.output
    models = json.loads(result.stdout)
    assert set(models) == set(model_names())
    assert models["deepseek-r1"]["expert_bytes"] == get_model("deepseek-r1").expert_bytes
    assert models["deepseek-r1"]["attention"]["kind"] == "mla"


def test_catalog_hardware_json_carries_every_source(catalog_cli):
    result = catalog_cli("hardware", "--json")
    assert result.exit_code == 0, result.output
    profiles = json.loads(result.stdout)
    assert set(profiles) == set(profile_names())
    assert profiles["kyung2025"]["ssd"]["sources"]["read_pj_per_bit"].startswith("[P]")
    for name, record in profiles.items():  # the profile's own numbers, derived from its components', say so
        assert record["sources"]["static_power_w"].startswith("[DER]"), name


@pytest.mark.parametrize("profile", PROFILES.values(), ids=PROFILES.keys())
def test_every_profile_charges_writes_into_ddr(profile: HardwareProfile):
    """SSD reads staged through DDR and DDR expert caches write there, whichever profile a scenario picks (the
    seed paper's profiles once charged nothing, as the paper's own runs never write to DDR)."""
    assert profile.ddr.write_pj_per_bit > 0


@pytest.mark.parametrize("command", ["models", "hardware"])
def test_catalog_tables_list_every_row(catalog_cli, command):
    result = catalog_cli(command)
    assert result.exit_code == 0, result.output
    names = model_names() if command == "models" else profile_names()
    assert all(name in result.stdout for name in names)


@pytest.mark.parametrize("args", [(), ("trace",), ("catalog",)])
def test_a_group_without_a_subcommand_prints_its_help(args):
    from conftest import run_cli

    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: tierflow {' '.join(args)}".rstrip() + " [OPTIONS] COMMAND")
    assert "Commands:" in result.stdout and result.stderr == ""
