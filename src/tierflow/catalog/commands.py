"""``tierflow catalog models | hardware``: list the catalog as tables, or as JSON with ``--json``."""

from __future__ import annotations

import attrs
import click

from tierflow.catalog.hardware import PROFILES, HardwareProfile
from tierflow.catalog.models import BF16_BYTES, FP8_BLOCK_SCALED_BYTES, MODELS, MXFP4_BYTES, ModelSpec

_DTYPE_NAMES = {BF16_BYTES: "BF16", FP8_BLOCK_SCALED_BYTES: "FP8", MXFP4_BYTES: "MXFP4"}

# Derived figures included in `catalog models --json`, so consumers need not recompute them.
_MODEL_DERIVED = (
    "num_dense_layers", "expert_params", "expert_bytes", "expert_flops_per_token", "attention_params_per_layer",
    "attention_bytes_per_layer", "kv_bytes_per_token_per_layer", "shared_expert_bytes_per_layer",
    "router_bytes_per_layer", "dense_ffn_bytes", "non_expert_bytes_per_moe_layer",
    "non_expert_bytes_per_dense_layer", "embedding_bytes", "total_expert_bytes", "total_non_expert_bytes",
    "activated_expert_bytes_per_token", "total_params",
)


def register(group: click.Group) -> None:
    group.add_command(catalog)


@click.group()
def catalog() -> None:
    """List the model and hardware catalogs, with the source of every number."""


@catalog.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def models(as_json):
    """The MoE models: shapes, dtypes, bytes per expert."""
    if as_json:
        from tierflow.cli import echo_json

        echo_json({name: _model_record(spec) for name, spec in MODELS.items()})
    else:
        click.echo(_table(
            ("model", "layers (MoE)", "experts x top-k", "shared", "hidden / expert", "dtype", "MB/expert",
             "experts GB", "resident GB", "params B"),
            [_model_row(spec) for spec in MODELS.values()],
        ))


@catalog.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def hardware(as_json):
    """The hardware profiles: GPU, host link, SSD, energies."""
    if as_json:
        from tierflow.cli import echo_json

        echo_json({name: _profile_record(profile) for name, profile in PROFILES.items()})
    else:
        click.echo(_table(
            ("profile", "GPU", "HBM", "TFLOPS", "host link GB/s", "SSD", "SSD GB/s", "SSD pJ/bit", "GDS"),
            [_profile_row(profile) for profile in PROFILES.values()],
        ))
        click.echo("\nEvery number's source: `tierflow catalog hardware --json`.")


def _model_record(spec: ModelSpec) -> dict:
    record = attrs.asdict(spec)
    record["attention"]["kind"] = spec.attention.kind
    record.update({name: getattr(spec, name) for name in _MODEL_DERIVED})
    return record


def _model_row(spec: ModelSpec) -> tuple[str, ...]:
    shared = f"{spec.num_shared_experts} x {spec.shared_expert_intermediate_size}" if spec.num_shared_experts else "-"
    return (
        spec.name,
        f"{spec.num_layers} ({spec.num_moe_layers})",
        f"{spec.num_routed_experts} x {spec.top_k}",
        shared,
        f"{spec.hidden_size} / {spec.expert_intermediate_size}",
        _DTYPE_NAMES.get(spec.bytes_per_param, f"{spec.bytes_per_param:g} B"),
        f"{spec.expert_bytes / 1e6:.1f}",
        f"{spec.total_expert_bytes / 1e9:.1f}",
        f"{spec.total_non_expert_bytes / 1e9:.2f}",
        f"{spec.total_params / 1e9:.1f}",
    )


def _profile_record(profile: HardwareProfile) -> dict:
    record = attrs.asdict(profile)
    record["static_power_w"] = profile.static_power_w
    record["sources"] = {**record.get("sources", {}), "static_power_w": (
        "[DER] per GPU: the sum of gpu, gpu.hbm, ddr (its share per GPU) and ssd static_power_w, each cited there")}
    return record


def _profile_row(profile: HardwareProfile) -> tuple[str, ...]:
    return (
        profile.name,
        profile.gpu.name,
        _capacity(profile.gpu.hbm.capacity_bytes),
        f"{profile.gpu.peak_flops / 1e12:.1f}",
        f"{profile.host_link.bandwidth_bytes_per_s / 1e9:.1f}",
        profile.ssd.name,
        f"{profile.ssd.read_bandwidth_bytes_per_s / 1e9:.2f}",
        f"{profile.ssd.read_pj_per_bit:.1f}",
        "yes" if profile.gpudirect_storage else "no",
    )


def _capacity(capacity_bytes: float) -> str:
    """Binary sizes as GiB (the artifact's 80 GiB H100), vendor decimal sizes as GB."""
    if capacity_bytes % 2**30 == 0:
        return f"{capacity_bytes / 2**30:.0f} GiB"
    return f"{capacity_bytes / 1e9:.0f} GB"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
