"""The model catalog: shapes, dtypes and derived sizes of the MoE models tierflow simulates.

Every row cites where its numbers come from. The shapes are those of the named Hugging Face repo's
``config.json``; this machine cannot reach the Hub, so each value was checked against public copies of
that file (test fixtures and config tables in other projects) and against ``docs/reference/models.md``.

Conventions used throughout:

- A *parameter* is one weight; bytes are ``params x bytes_per_param`` rounded to whole bytes.
- One multiply-add per weight per token, counted as 2 FLOPs.
- An expert is a SwiGLU MLP with gate, up and down projections: ``3 x hidden x intermediate`` weights.
- Norm weights, biases, attention sinks and quantization padding are left out (each under 0.2% of a layer).
- Layers are numbered as in the model (0 .. num_layers - 1); the MoE layers are the last ``num_moe_layers``.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
from attrs import validators as v

from tierflow.catalog.lookup import lookup

BF16_BYTES = 2.0
# DeepSeek's FP8 release: e4m3 weights plus one float32 scale per 128 x 128 block (README_WEIGHTS.md).
FP8_BLOCK_SCALED_BYTES = 1.0 + 4.0 / (128 * 128)
# MXFP4 (GPT-OSS experts): 4-bit values plus one 8-bit shared scale per 32 values = 4.25 bits.
MXFP4_BYTES = 4.25 / 8

_positive_int = [v.instance_of(int), v.gt(0)]
_non_negative_int = [v.instance_of(int), v.ge(0)]


@attrs.frozen(kw_only=True)
class GqaAttention:
    """Grouped-query attention (plain multi-head attention when ``num_kv_heads == num_heads``)."""

    kind: ClassVar[str] = "gqa"
    num_heads: int = attrs.field(validator=_positive_int)
    num_kv_heads: int = attrs.field(validator=_positive_int)
    head_dim: int = attrs.field(validator=_positive_int)

    def params(self, hidden_size: int) -> int:
        """Weights of the q, k, v and o projections."""
        q_and_o = 2 * hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * hidden_size * self.num_kv_heads * self.head_dim
        return q_and_o + k_and_v

    def kv_elements_per_token(self) -> int:
        """Cached values per token per layer: one key and one value vector per KV head."""
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def kv_heads(self) -> int:
        """Heads of the KV cache: a tensor-parallel group splits the cache at most this many ways."""
        return self.num_kv_heads

    def context_flops_per_token(self, attended_tokens: int) -> float:
        """FLOPs of one new token's scores (q.k) and weighted value sum over ``attended_tokens`` cached tokens."""
        return 2.0 * self.num_heads * self.head_dim * attended_tokens * 2


@attrs.frozen(kw_only=True)
class MlaAttention:
    """DeepSeek multi-head latent attention: keys and values cached as one low-rank latent per token."""

    kind: ClassVar[str] = "mla"
    num_heads: int = attrs.field(validator=_positive_int)
    q_lora_rank: int = attrs.field(validator=_non_negative_int)  # 0: queries are not compressed
    kv_lora_rank: int = attrs.field(validator=_positive_int)
    qk_nope_head_dim: int = attrs.field(validator=_positive_int)
    qk_rope_head_dim: int = attrs.field(validator=_positive_int)
    v_head_dim: int = attrs.field(validator=_positive_int)

    def params(self, hidden_size: int) -> int:
        """Weights of q_a/q_b (or q), kv_a (latent + shared RoPE key), kv_b and o projections."""
        q_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank:
            q = hidden_size * self.q_lora_rank + self.q_lora_rank * self.num_heads * q_head_dim
        else:
            q = hidden_size * self.num_heads * q_head_dim
        kv_a = hidden_size * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
        o = self.num_heads * self.v_head_dim * hidden_size
        return q + kv_a + kv_b + o

    @property
    def kv_heads(self) -> int:
        """The latent is one head that every query head reads: each GPU of a tensor-parallel group keeps all of
        it (why serving systems run MLA attention data-parallel)."""
        return 1

    def kv_elements_per_token(self) -> int:
        """Cached values per token per layer: the KV latent plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def context_flops_per_token(self, attended_tokens: int) -> float:
        """FLOPs over the cache in the weight-absorbed decode form (FlashMLA, vLLM, the seed paper's artifact).

        Each head scores against the cached latent + RoPE key and sums the cached latents; kv_b is folded
        into the query and output sides, so its weights are counted once per token in :meth:`params`.
        """
        scores = 2.0 * self.num_heads * (self.kv_lora_rank + self.qk_rope_head_dim) * attended_tokens
        values = 2.0 * self.num_heads * self.kv_lora_rank * attended_tokens
        return scores + values


def _sliding_layers_in_range(instance: ModelSpec, attribute, value: tuple[int, ...]) -> None:
    if any(not 0 <= layer < instance.num_layers for layer in value):
        raise ValueError(f"{attribute.name} must hold layer indices in 0..{instance.num_layers - 1}, got {value}")
    if value and instance.sliding_window_tokens == 0:
        raise ValueError(f"{attribute.name} is set but sliding_window_tokens is 0")


@attrs.frozen(kw_only=True)
class ModelSpec:
    """One MoE model: the shapes and dtypes that decide how many bytes and FLOPs each token costs."""

    name: str = attrs.field(validator=v.instance_of(str))  # catalog key, lower-case
    display_name: str
    num_layers: int = attrs.field(validator=_positive_int)
    num_moe_layers: int = attrs.field(validator=_positive_int)
    first_moe_layer: int = attrs.field(validator=_non_negative_int)
    num_routed_experts: int = attrs.field(validator=_positive_int)
    num_shared_experts: int = attrs.field(validator=_non_negative_int)
    top_k: int = attrs.field(validator=_positive_int)
    hidden_size: int = attrs.field(validator=_positive_int)
    expert_intermediate_size: int = attrs.field(validator=_positive_int)
    shared_expert_intermediate_size: int = attrs.field(validator=_non_negative_int)  # per shared expert
    dense_intermediate_size: int = attrs.field(validator=_non_negative_int)  # FFN of the dense layers
    vocab_size: int = attrs.field(validator=_positive_int)
    attention: GqaAttention | MlaAttention = attrs.field(validator=v.instance_of((GqaAttention, MlaAttention)))
    bytes_per_param: float = attrs.field(validator=v.gt(0))  # routed expert weights
    non_expert_bytes_per_param: float = attrs.field(validator=v.gt(0))  # attention, shared experts, dense FFN
    # Embeddings, LM head and router stay BF16 in every release here (FP8 and MXFP4 quantize neither). FP8
    # weights (FP8_BLOCK_SCALED_BYTES) run their GEMMs at a GPU's FP8 rate; MXFP4 is dequantized to BF16 on the
    # GPUs here (Hopper has no FP4 tensor cores), so it runs at the BF16 rate.
    unquantized_bytes_per_param: float = attrs.field(default=BF16_BYTES, validator=v.gt(0))
    # The KV cache holds activations, BF16 in every row, even where the weights are FP8.
    kv_bytes_per_element: float = attrs.field(default=BF16_BYTES, validator=v.gt(0))
    sliding_window_tokens: int = attrs.field(default=0, validator=_non_negative_int)
    sliding_window_layers: tuple[int, ...] = attrs.field(default=(), converter=tuple,
                                                         validator=_sliding_layers_in_range)
    source: str = attrs.field(validator=v.min_len(1))

    def __attrs_post_init__(self) -> None:
        if self.first_moe_layer + self.num_moe_layers > self.num_layers:
            raise ValueError(f"{self.name}: MoE layers {self.first_moe_layer}..{self.first_moe_layer + self.num_moe_layers - 1}"
                             f" exceed num_layers {self.num_layers}")
        if self.top_k > self.num_routed_experts:
            raise ValueError(f"{self.name}: top_k {self.top_k} exceeds num_routed_experts {self.num_routed_experts}")
        if bool(self.num_shared_experts) != bool(self.shared_expert_intermediate_size):
            raise ValueError(f"{self.name}: num_shared_experts and shared_expert_intermediate_size must both be 0 or both > 0")
        if bool(self.num_dense_layers) != bool(self.dense_intermediate_size):
            raise ValueError(f"{self.name}: dense layers and dense_intermediate_size must both be 0 or both > 0")

    # --- layer counts -------------------------------------------------------------------------

    @property
    def num_dense_layers(self) -> int:
        """Layers with a dense FFN instead of experts."""
        return self.num_layers - self.num_moe_layers

    # --- weight formats -------------------------------------------------------------------------

    @property
    def fp8_experts(self) -> bool:
        """Whether the routed experts' GEMMs run on FP8 weights."""
        return self.bytes_per_param == FP8_BLOCK_SCALED_BYTES

    @property
    def fp8_non_expert(self) -> bool:
        """Whether attention's projections, the shared experts and the dense FFN run on FP8 weights."""
        return self.non_expert_bytes_per_param == FP8_BLOCK_SCALED_BYTES

    # --- parameters -----------------------------------------------------------------------------

    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    @property
    def shared_expert_params_per_layer(self) -> int:
        """Weights of all shared experts of one MoE layer."""
        return self.num_shared_experts * 3 * self.hidden_size * self.shared_expert_intermediate_size

    @property
    def router_params_per_layer(self) -> int:
        """Weights of one MoE layer's router (hidden x routed experts)."""
        return self.hidden_size * self.num_routed_experts

    @property
    def attention_params_per_layer(self) -> int:
        """Weights of one layer's attention projections."""
        return self.attention.params(self.hidden_size)

    @property
    def dense_ffn_params(self) -> int:
        """Weights of one dense layer's FFN (0 when the model has no dense layers)."""
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (no row here ties them)."""
        return 2 * self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """Every weight of the model (norms and biases aside)."""
        return (self.num_moe_layers * (self.num_routed_experts * self.expert_params
                                       + self.shared_expert_params_per_layer + self.router_params_per_layer)
                + self.num_dense_layers * self.dense_ffn_params
                + self.num_layers * self.attention_params_per_layer
                + self.embedding_params)

    # --- bytes ----------------------------------------------------------------------------------

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert as stored (scales included), the unit the caches move."""
        return round(self.expert_params * self.bytes_per_param)

    @property
    def shared_expert_bytes_per_layer(self) -> int:
        """Bytes of all shared experts of one MoE layer."""
        return round(self.shared_expert_params_per_layer * self.non_expert_bytes_per_param)

    @property
    def router_bytes_per_layer(self) -> int:
        """Bytes of one MoE layer's router."""
        return round(self.router_params_per_layer * self.unquantized_bytes_per_param)

    @property
    def attention_bytes_per_layer(self) -> int:
        """Bytes of one layer's attention projections."""
        return round(self.attention_params_per_layer * self.non_expert_bytes_per_param)

    @property
    def dense_ffn_bytes(self) -> int:
        """Bytes of one dense layer's FFN."""
        return round(self.dense_ffn_params * self.non_expert_bytes_per_param)

    @property
    def non_expert_bytes_per_moe_layer(self) -> int:
        """Bytes an MoE layer reads besides its routed experts: attention, shared experts, router."""
        return self.attention_bytes_per_layer + self.shared_expert_bytes_per_layer + self.router_bytes_per_layer

    @property
    def non_expert_bytes_per_dense_layer(self) -> int:
        """Bytes of a dense layer: attention plus its FFN."""
        return self.attention_bytes_per_layer + self.dense_ffn_bytes

    @property
    def embedding_bytes(self) -> int:
        """Bytes of the input embedding plus the LM head."""
        return round(self.embedding_params * self.unquantized_bytes_per_param)

    @property
    def total_expert_bytes(self) -> int:
        """Bytes of every routed expert of every MoE layer."""
        return self.num_moe_layers * self.num_routed_experts * self.expert_bytes

    @property
    def total_non_expert_bytes(self) -> int:
        """Bytes of everything that is not a routed expert (what stays resident in HBM when offloading)."""
        return (self.num_moe_layers * self.non_expert_bytes_per_moe_layer
                + self.num_dense_layers * self.non_expert_bytes_per_dense_layer
                + self.embedding_bytes)

    @property
    def activated_expert_bytes_per_token(self) -> int:
        """Routed-expert bytes one token touches at batch 1 with no reuse: MoE layers x top-k x expert."""
        return self.num_moe_layers * self.top_k * self.expert_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """KV-cache bytes one token adds to one (full-attention) layer."""
        return round(self.attention.kv_elements_per_token() * self.kv_bytes_per_element)

    # --- per-token work ------------------------------------------------------------------------

    @property
    def expert_flops_per_token(self) -> float:
        """FLOPs of one token through one routed expert."""
        return 2.0 * self.expert_params

    @property
    def lm_head_flops_per_token(self) -> float:
        """FLOPs of the LM head for one token."""
        return 2.0 * self.vocab_size * self.hidden_size

    def attended_tokens(self, context_len: int, layer: int | None = None) -> int:
        """Tokens one new token attends to at ``layer`` (None: a full-attention layer), itself included."""
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        if layer is not None and not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in 0..{self.num_layers - 1}, got {layer}")
        if layer in self.sliding_window_layers:
            return min(context_len, self.sliding_window_tokens)
        return context_len

    def attention_flops_per_token(self, context_len: int, layer: int | None = None) -> float:
        """FLOPs of one new token through one layer's attention, with ``context_len`` tokens in context.

        ``2 x attention_params_per_layer`` for the projections, plus the work over the attended cache:
        GQA ``4 x heads x head_dim x L`` (q.k scores and the weighted value sum);
        MLA ``2 x heads x (kv_lora_rank + rope_dim) x L + 2 x heads x kv_lora_rank x L`` (absorbed form).
        ``L`` is :meth:`attended_tokens`; softmax and RoPE are left out (under 1%).
        """
        attended = self.attended_tokens(context_len, layer)
        return 2.0 * self.attention_params_per_layer + self.attention.context_flops_per_token(attended)

    def non_expert_flops_per_token_per_moe_layer(self, context_len: int, layer: int | None = None) -> float:
        """FLOPs of one token through an MoE layer besides its routed experts: attention, shared experts, router."""
        return (self.attention_flops_per_token(context_len, layer)
                + 2.0 * (self.shared_expert_params_per_layer + self.router_params_per_layer))

    def non_expert_flops_per_token_per_dense_layer(self, context_len: int, layer: int | None = None) -> float:
        """FLOPs of one token through a dense layer: attention plus the dense FFN."""
        return self.attention_flops_per_token(context_len, layer) + 2.0 * self.dense_ffn_params

    def kv_bytes(self, context_len: int, batch: int = 1) -> int:
        """KV-cache bytes of the whole model for ``batch`` sequences of ``context_len`` tokens each.

        Sliding-window layers keep at most the window.
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        cached_tokens = sum(self.attended_tokens(context_len, layer) for layer in range(self.num_layers))
        return cached_tokens * self.kv_bytes_per_token_per_layer * batch


# --- rows ---------------------------------------------------------------------------------------

_CHECKED = ("values as in that repo's config.json, checked against public copies of the file "
            "(the Hub itself was not reachable); sizes against docs/reference/models.md")


def _source(repo: str, note: str = "") -> str:
    return f"huggingface.co/{repo} config.json; {_CHECKED}{'; ' + note if note else ''}"


_DEEPSEEK_V3_SHAPE = dict(
    num_layers=61,                          # num_hidden_layers (MTP module not counted)
    num_moe_layers=58,                      # 61 - first_k_dense_replace
    first_moe_layer=3,                      # first_k_dense_replace
    num_routed_experts=256,                 # n_routed_experts
    num_shared_experts=1,                   # n_shared_experts
    top_k=8,                                # num_experts_per_tok
    hidden_size=7168,                       # hidden_size
    expert_intermediate_size=2048,          # moe_intermediate_size
    shared_expert_intermediate_size=2048,   # moe_intermediate_size (shared experts have the routed width)
    dense_intermediate_size=18432,          # intermediate_size
    vocab_size=129280,                      # vocab_size
    attention=MlaAttention(
        num_heads=128,                      # num_attention_heads
        q_lora_rank=1536,                   # q_lora_rank
        kv_lora_rank=512,                   # kv_lora_rank
        qk_nope_head_dim=128,               # qk_nope_head_dim
        qk_rope_head_dim=64,                # qk_rope_head_dim
        v_head_dim=128,                     # v_head_dim
    ),
)

_BF16_NOTE = ("BF16 weights as produced by inference/fp8_cast_bf16.py of github.com/deepseek-ai/DeepSeek-V3, "
              "the format the seed energy paper (Kyung et al., CAL 2025) models")
_FP8_NOTE = "FP8 e4m3 with one float32 scale per 128x128 block (README_WEIGHTS.md), the released format"

_GPT_OSS_ATTENTION = GqaAttention(
    num_heads=64,                           # num_attention_heads
    num_kv_heads=8,                         # num_key_value_heads
    head_dim=64,                            # head_dim
)
_GPT_OSS_NOTE = ("experts MXFP4 (blocks + 8-bit scales per 32 values = 4.25 bits; per-expert BF16 biases, 0.13%, "
                 "left out), attention/router/embeddings BF16; layer_types alternate sliding (even) and full")

_ROWS = (
    ModelSpec(
        name="deepseek-v3", display_name="DeepSeek-V3 (FP8)", **_DEEPSEEK_V3_SHAPE,
        bytes_per_param=FP8_BLOCK_SCALED_BYTES, non_expert_bytes_per_param=FP8_BLOCK_SCALED_BYTES,
        source=_source("deepseek-ai/DeepSeek-V3", _FP8_NOTE),
    ),
    ModelSpec(
        name="deepseek-r1", display_name="DeepSeek-R1 (FP8)", **_DEEPSEEK_V3_SHAPE,
        bytes_per_param=FP8_BLOCK_SCALED_BYTES, non_expert_bytes_per_param=FP8_BLOCK_SCALED_BYTES,
        source=_source("deepseek-ai/DeepSeek-R1", "same architecture as DeepSeek-V3; " + _FP8_NOTE),
    ),
    ModelSpec(
        name="deepseek-v3-bf16", display_name="DeepSeek-V3 (BF16)", **_DEEPSEEK_V3_SHAPE,
        bytes_per_param=BF16_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        source=_source("deepseek-ai/DeepSeek-V3", _BF16_NOTE),
    ),
    ModelSpec(
        name="deepseek-r1-bf16", display_name="DeepSeek-R1 (BF16)", **_DEEPSEEK_V3_SHAPE,
        bytes_per_param=BF16_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        source=_source("deepseek-ai/DeepSeek-R1", _BF16_NOTE),
    ),
    ModelSpec(
        name="mixtral-8x7b", display_name="Mixtral-8x7B",
        num_layers=32,                      # num_hidden_layers
        num_moe_layers=32,                  # every layer is MoE
        first_moe_layer=0,
        num_routed_experts=8,               # num_local_experts
        num_shared_experts=0,
        top_k=2,                            # num_experts_per_tok
        hidden_size=4096,                   # hidden_size
        expert_intermediate_size=14336,     # intermediate_size (the expert width in Mixtral's config)
        shared_expert_intermediate_size=0,
        dense_intermediate_size=0,
        vocab_size=32000,                   # vocab_size
        attention=GqaAttention(
            num_heads=32,                   # num_attention_heads
            num_kv_heads=8,                 # num_key_value_heads
            head_dim=128,                   # hidden_size / num_attention_heads
        ),
        bytes_per_param=BF16_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        source=_source("mistralai/Mixtral-8x7B-v0.1", "BF16; sliding_window null"),
    ),
    ModelSpec(
        name="mixtral-8x22b", display_name="Mixtral-8x22B",
        num_layers=56,                      # num_hidden_layers
        num_moe_layers=56,                  # every layer is MoE
        first_moe_layer=0,
        num_routed_experts=8,               # num_local_experts
        num_shared_experts=0,
        top_k=2,                            # num_experts_per_tok
        hidden_size=6144,                   # hidden_size
        expert_intermediate_size=16384,     # intermediate_size (the expert width in Mixtral's config)
        shared_expert_intermediate_size=0,
        dense_intermediate_size=0,
        vocab_size=32768,                   # vocab_size
        attention=GqaAttention(
            num_heads=48,                   # num_attention_heads
            num_kv_heads=8,                 # num_key_value_heads
            head_dim=128,                   # hidden_size / num_attention_heads
        ),
        bytes_per_param=BF16_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        source=_source("mistralai/Mixtral-8x22B-v0.1", "BF16; sliding_window null; 141B parameters, 39B active"),
    ),
    ModelSpec(
        name="qwen1.5-moe-a2.7b", display_name="Qwen1.5-MoE-A2.7B",
        num_layers=24,                      # num_hidden_layers
        num_moe_layers=24,                  # decoder_sparse_step 1: every layer is MoE
        first_moe_layer=0,
        num_routed_experts=60,              # num_experts
        num_shared_experts=1,               # one shared expert with its own width
        top_k=4,                            # num_experts_per_tok
        hidden_size=2048,                   # hidden_size
        expert_intermediate_size=1408,      # moe_intermediate_size
        shared_expert_intermediate_size=5632,  # shared_expert_intermediate_size
        dense_intermediate_size=0,          # intermediate_size 5632 describes no layer here
        vocab_size=151936,                  # vocab_size
        attention=GqaAttention(
            num_heads=16,                   # num_attention_heads
            num_kv_heads=16,                # num_key_value_heads
            head_dim=128,                   # hidden_size / num_attention_heads
        ),
        bytes_per_param=BF16_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        source=_source("Qwen/Qwen1.5-MoE-A2.7B", "BF16; shared_expert_gate (hidden x 1) left out"),
    ),
    ModelSpec(
        name="qwen3-30b-a3b", display_name="Qwen3-30B-A3B",
        num_layers=48,                      # num_hidden_layers
        num_moe_layers=48,                  # mlp_only_layers [], decoder_sparse_step 1
        first_moe_layer=0,
        num_routed_experts=128,             # num_experts
        num_shared_experts=0,
        top_k=8,                            # num_experts_per_tok
        hidden_size=2048,                   # hidden_size
        expert_intermediate_size=768,       # moe_intermediate_size
        shared_expert_intermediate_size=0,
        dense_intermediate_size=0,          # intermediate_size 6144 describes no layer here
        vocab_size=151936,                  # vocab_size
        attention=GqaAttention(
            num_heads=32,                   # num_attention_heads
            num_kv_heads=4,                 # num_key_value_heads
            head_dim=128,                   # head_dim
        ),
        bytes_per_param=BF16_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        source=_source("Qwen/Qwen3-30B-A3B", "BF16"),
    ),
    ModelSpec(
        name="qwen3-235b-a22b", display_name="Qwen3-235B-A22B",
        num_layers=94,                      # num_hidden_layers
        num_moe_layers=94,                  # mlp_only_layers [], decoder_sparse_step 1
        first_moe_layer=0,
        num_routed_experts=128,             # num_experts
        num_shared_experts=0,
        top_k=8,                            # num_experts_per_tok
        hidden_size=4096,                   # hidden_size
        expert_intermediate_size=1536,      # moe_intermediate_size
        shared_expert_intermediate_size=0,
        dense_intermediate_size=0,          # intermediate_size 12288 describes no layer here
        vocab_size=151936,                  # vocab_size
        attention=GqaAttention(
            num_heads=64,                   # num_attention_heads
            num_kv_heads=4,                 # num_key_value_heads
            head_dim=128,                   # head_dim
        ),
        bytes_per_param=BF16_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        source=_source("Qwen/Qwen3-235B-A22B", "BF16; tie_word_embeddings false"),
    ),
    ModelSpec(
        name="olmoe-1b-7b", display_name="OLMoE-1B-7B-0924",
        num_layers=16,                      # num_hidden_layers
        num_moe_layers=16,                  # every layer is MoE
        first_moe_layer=0,
        num_routed_experts=64,              # num_experts
        num_shared_experts=0,
        top_k=8,                            # num_experts_per_tok
        hidden_size=2048,                   # hidden_size
        expert_intermediate_size=1024,      # intermediate_size (the expert width in OLMoE's config)
        shared_expert_intermediate_size=0,
        dense_intermediate_size=0,
        vocab_size=50304,                   # vocab_size
        attention=GqaAttention(
            num_heads=16,                   # num_attention_heads
            num_kv_heads=16,                # num_key_value_heads
            head_dim=128,                   # hidden_size / num_attention_heads
        ),
        bytes_per_param=BF16_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        source=_source("allenai/OLMoE-1B-7B-0924", "BF16"),
    ),
    ModelSpec(
        name="deepseek-v2-lite", display_name="DeepSeek-V2-Lite",
        num_layers=27,                      # num_hidden_layers
        num_moe_layers=26,                  # 27 - first_k_dense_replace
        first_moe_layer=1,                  # first_k_dense_replace
        num_routed_experts=64,              # n_routed_experts
        num_shared_experts=2,               # n_shared_experts
        top_k=6,                            # num_experts_per_tok
        hidden_size=2048,                   # hidden_size
        expert_intermediate_size=1408,      # moe_intermediate_size
        shared_expert_intermediate_size=1408,  # moe_intermediate_size
        dense_intermediate_size=10944,      # intermediate_size
        vocab_size=102400,                  # vocab_size
        attention=MlaAttention(
            num_heads=16,                   # num_attention_heads
            q_lora_rank=0,                  # q_lora_rank null: queries are not compressed
            kv_lora_rank=512,               # kv_lora_rank
            qk_nope_head_dim=128,           # qk_nope_head_dim
            qk_rope_head_dim=64,            # qk_rope_head_dim
            v_head_dim=128,                 # v_head_dim
        ),
        bytes_per_param=BF16_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        source=_source("deepseek-ai/DeepSeek-V2-Lite", "BF16"),
    ),
    ModelSpec(
        name="gpt-oss-20b", display_name="gpt-oss-20b",
        num_layers=24,                      # num_hidden_layers
        num_moe_layers=24,                  # every layer is MoE
        first_moe_layer=0,
        num_routed_experts=32,              # num_local_experts
        num_shared_experts=0,
        top_k=4,                            # num_experts_per_tok / experts_per_token
        hidden_size=2880,                   # hidden_size
        expert_intermediate_size=2880,      # intermediate_size
        shared_expert_intermediate_size=0,
        dense_intermediate_size=0,
        vocab_size=201088,                  # vocab_size
        attention=_GPT_OSS_ATTENTION,
        bytes_per_param=MXFP4_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        sliding_window_tokens=128,          # sliding_window
        sliding_window_layers=tuple(range(0, 24, 2)),  # layer_types: sliding_attention at even layers
        source=_source("openai/gpt-oss-20b", _GPT_OSS_NOTE),
    ),
    ModelSpec(
        name="gpt-oss-120b", display_name="gpt-oss-120b",
        num_layers=36,                      # num_hidden_layers
        num_moe_layers=36,                  # every layer is MoE
        first_moe_layer=0,
        num_routed_experts=128,             # num_local_experts
        num_shared_experts=0,
        top_k=4,                            # num_experts_per_tok / experts_per_token
        hidden_size=2880,                   # hidden_size
        expert_intermediate_size=2880,      # intermediate_size
        shared_expert_intermediate_size=0,
        dense_intermediate_size=0,
        vocab_size=201088,                  # vocab_size
        attention=_GPT_OSS_ATTENTION,
        bytes_per_param=MXFP4_BYTES, non_expert_bytes_per_param=BF16_BYTES,
        sliding_window_tokens=128,          # sliding_window
        sliding_window_layers=tuple(range(0, 36, 2)),  # layer_types: sliding_attention at even layers
        source=_source("openai/gpt-oss-120b", _GPT_OSS_NOTE),
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _ROWS}


def model_names() -> list[str]:
    """The catalog keys, sorted."""
    return sorted(MODELS)


def get_model(name: str) -> ModelSpec:
    """The catalog row for ``name`` (case-insensitive); :class:`TierflowError` listing valid names if unknown."""
    return lookup(MODELS, name, "model", "models")
