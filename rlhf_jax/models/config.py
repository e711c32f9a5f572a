"""Model configuration: one `ModelConfig` for GPT-2-style and Llama-style decoders, and presets.

The config is a frozen (hashable) dataclass so it can be a static argument of jitted steps. The
gin-facing builder is `model_config(preset=..., **overrides)`; gin files under gin/models/ pick a
preset and override fields.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import gin
import jax.numpy as jnp

from rlhf_jax.errors import SettingsError

DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    The family fields are independent switches; `family` only documents the preset they came
    from. GPT-2 style: learned positions, LayerNorm, GELU MLP, biases, tied embeddings. Llama
    style: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied.
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (multi-head attention)
    d_ff: int = 256
    max_seq_len: int = 128
    family: Literal["gpt2", "llama", "mistral", "qwen2", "qwen3"] = "gpt2"
    pos_emb: Literal["learned", "rope"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    # "auto": cuDNN flash attention on GPU for causal right-padded full forwards, XLA elsewhere.
    attention_impl: Literal["auto", "xla", "cudnn"] = "auto"
    # One [d, 3, heads, head_dim] projection for Q, K and V (one matmul instead of three;
    # multi-head attention only). Same numbers as separate projections; fewer kernels.
    fused_qkv: bool = False
    # How a one-token decode step attends over the cache: "einsum" (batched matmuls) or
    # "reduce" (multiply-and-sum, which XLA emits as reduction kernels). Same numbers; which is
    # faster is a per-device question (benchmarks/bench_generate.py --variants).
    decode_attention: Literal["einsum", "reduce"] = "einsum"
    init_std: float = 0.02
    # Switches for imported Hugging Face families (rlhf_jax.models.hf). Qwen2: biases on the
    # Q/K/V projections only (`use_bias` puts biases everywhere, GPT-2 style).
    qkv_bias: bool = False
    # Qwen3: RMSNorm over head_dim on queries and keys, before RoPE.
    qk_norm: bool = False
    # Width of one attention head when it is not d_model // n_heads (Qwen3, some Llamas).
    attn_head_dim: int | None = None
    # RoPE frequency scaling: "none", "linear" (positions / factor) or "llama3" (Llama 3.1's
    # wavelength-dependent scaling with low/high frequency factors and the original context).
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # Sliding-window attention (Mistral; Qwen2/3 with use_sliding_window): a query attends to
    # itself and the `sliding_window - 1` cache slots before it only (slot distance, as
    # `transformers` counts it); None = full causal attention.
    sliding_window: int | None = None
    # LoRA (Hu et al. 2021, arXiv:2106.09685): rank-`lora_rank` adapters W + (alpha/rank) A B on
    # the projections whose path (`blocks/3/attn/wq`) matches a `lora_targets` regex; 0 = off.
    # See rlhf_jax.models.lora.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("attn/wq$", "attn/wv$")

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SettingsError(f"model_config.{name}={value!r} must be a positive integer")
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1
        ):
            raise SettingsError(f"model_config.n_kv_heads={self.n_kv_heads!r} must be >= 1")
        kv = self.num_kv_heads
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int)
            or isinstance(self.sliding_window, bool)
            or self.sliding_window < 1
        ):
            raise SettingsError(
                f"model_config.sliding_window={self.sliding_window!r} must be None or >= 1"
            )
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # JSON gives lists
        if self.lora_rank < 0:
            raise SettingsError(f"lora_rank={self.lora_rank} must be >= 0")
        if self.lora_rank and self.fused_qkv:
            raise SettingsError("LoRA adapters need separate Q/K/V projections (fused_qkv=False)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SettingsError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.rope_scaling not in ("none", "linear", "llama3"):
            raise SettingsError(f"rope_scaling={self.rope_scaling!r}; 'none', 'linear' or 'llama3'")
        if self.attn_head_dim is None and self.d_model % self.n_heads:
            raise SettingsError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % kv:
            raise SettingsError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={kv}")
        if self.fused_qkv and kv != self.n_heads:
            raise SettingsError(
                f"fused_qkv needs multi-head attention (n_kv_heads={kv} != n_heads={self.n_heads})"
            )
        if self.decode_attention not in ("einsum", "reduce"):
            raise SettingsError(f"decode_attention={self.decode_attention!r}; 'einsum' or 'reduce'")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise SettingsError(f"{name}={getattr(self, name)!r}; choose one of {list(DTYPES)}")

    @property
    def num_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        if self.attn_head_dim is not None:
            return self.attn_head_dim
        return self.d_model // self.n_heads

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def dtype(self):
        return DTYPES[self.compute_dtype]

    @property
    def pdtype(self):
        return DTYPES[self.param_dtype]

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of `Transformer(self)` without LoRA adapters (checked against
        the model in tests)."""
        d, f, hd = self.d_model, self.d_ff, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        if self.use_bias or self.qkv_bias:
            attn += self.n_heads * hd + 2 * self.num_kv_heads * hd
        if self.use_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * hd
        n_mlp_in = 2 if self.mlp == "swiglu" else 1
        mlp = n_mlp_in * d * f + f * d + (n_mlp_in * f + d if self.use_bias else 0)
        norm = d * (2 if self.norm == "layernorm" else 1)
        per_layer = attn + mlp + 2 * norm
        total = self.n_layers * per_layer + norm
        if include_embeddings:
            total += self.vocab_size * d
            if not self.tie_embeddings:
                total += self.vocab_size * d
            if self.pos_emb == "learned":
                total += self.max_seq_len * d
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 6N plus attention), as in PaLM App. B."""
        t = seq_len or self.max_seq_len
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
        return 6.0 * n + 12.0 * self.n_layers * self.d_model * t


PRESETS: dict[str, dict] = {
    # A few hundred thousand parameters: CPU tests and the offline quickstart.
    "tiny": dict(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=128),
    "gpt2": dict(
        vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024
    ),
    "gpt2-medium": dict(
        vocab_size=50257, d_model=1024, n_layers=24, n_heads=16, d_ff=4096, max_seq_len=1024
    ),
    "gpt2-large": dict(
        vocab_size=50257, d_model=1280, n_layers=36, n_heads=20, d_ff=5120, max_seq_len=1024
    ),
    # Llama-style blocks at small sizes (SmolLM-135M-like shape; and a tiny one for tests).
    "llama-tiny": dict(
        vocab_size=2048,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=192,
        max_seq_len=128,
        family="llama",
        pos_emb="rope",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
        norm_eps=1e-6,
    ),
    "llama-small": dict(
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_ff=1536,
        max_seq_len=2048,
        family="llama",
        pos_emb="rope",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
        norm_eps=1e-5,
    ),
}


@gin.configurable
def model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """Builds a `ModelConfig` from a named preset plus field overrides (the gin entry point)."""
    if preset not in PRESETS:
        raise SettingsError(f"unknown model preset {preset!r}; known: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise SettingsError(
            f"unknown ModelConfig field(s) {sorted(unknown)}; known: {sorted(fields)}"
        )
    return ModelConfig(**{**PRESETS[preset], **overrides})
