"""The decoder-only transformer (Flax NNX) for GPT-2-style and Llama-style models, with a KV cache.

Conventions:
- `attention_mask_BT` is 1 on real tokens and 0 on padding; padding may be on either side.
  Position ids default to the number of real tokens before each token, so a left-padded prompt
  gives the same logits as the unpadded one.
- With a cache (`init_cache`), a call writes its K/V into slots `[cache_index, cache_index+T)`
  and attends over every slot whose `attention_mask_BS` entry is 1 and whose slot is not in the
  future; the caller owns the slot mask (the sampler marks prompt padding 0).
- Parameters are stored in `param_dtype` and computed in `compute_dtype`; logits are fp32.
- Every parameter carries logical axis names (see `rlhf_jax.partitioning`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.partitioning import with_logical_constraint as wlc

Cache = list[dict[str, jax.Array]]
# Logical axes of each cache buffer and the index of its slot (length) axis.
CACHE_AXES = ("batch", "act_kv_heads", "length", None)
CACHE_LENGTH_AXIS = 2


def _param(rngs: nnx.Rngs, shape, names, cfg: ModelConfig, *, std=None, value=None) -> nnx.Param:
    if value is not None:
        arr = jnp.full(shape, value, cfg.pdtype)
    else:
        std = cfg.init_std if std is None else std
        arr = std * jax.random.normal(rngs.params(), shape, cfg.pdtype)
    return nnx.Param(arr, out_sharding=names)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last axis, computed in fp32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dim: int | None = None, kind=None):
        self.kind, self.eps = kind or cfg.norm, cfg.norm_eps
        dim = cfg.d_model if dim is None else dim
        self.scale = _param(rngs, (dim,), ("norm",), cfg, value=1.0)
        if self.kind == "layernorm":
            self.bias = _param(rngs, (dim,), ("norm",), cfg, value=0.0)

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
        x = x * self.scale[...].astype(jnp.float32)
        if self.kind == "layernorm":
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies [head_dim/2] (fp32), with the config's frequency scaling.

    "linear" divides every frequency by the factor (positions / factor). "llama3" is Llama
    3.1's scaling (Meta's reference code, `apply_scaling`): wavelengths shorter than
    `original_max_len / high_freq_factor` are kept, those longer than
    `original_max_len / low_freq_factor` are divided by the factor, and the band between is
    interpolated linearly in `original_max_len / wavelength`.
    """
    half = cfg.head_dim // 2
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, half, dtype=np.float64) / half))
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        inv = inv / factor
    elif cfg.rope_scaling == "llama3":
        wavelen = 2 * np.pi / inv
        old = cfg.rope_original_max_len
        low_wavelen, high_wavelen = old / cfg.rope_low_freq_factor, old / cfg.rope_high_freq_factor
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(
            wavelen > low_wavelen, inv / factor, np.where(wavelen < high_wavelen, inv, mid)
        )
    return inv.astype(np.float32)


def rope(
    x_BTNH: jax.Array, positions_BT: jax.Array, theta: float, inv_freq: Any = None
) -> jax.Array:
    """Rotary embedding, half-split pairing (the Hugging Face Llama convention)."""
    half = x_BTNH.shape[-1] // 2
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) / half))
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # B T H/2
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def _allowed(
    q_slot_T: jax.Array, num_slots: int, mask_BS: jax.Array, window: int | None = None
) -> jax.Array:
    """[B, T, S] attention pattern: causal by slot, real keys only, and with a sliding
    `window` only the keys less than `window` slots back (the query's own slot included).

    Slots, not position ids, measure the window, as `transformers` does (its cache positions):
    the two agree wherever the real tokens are contiguous (one padded side, or a left-padded
    prompt followed by its completion in the sampler).
    A padding query attends to itself only, so its (ignored) output stays finite.
    """
    k_slot = jnp.arange(num_slots)
    causal = k_slot[None, :] <= q_slot_T[:, None]
    if window is not None:
        causal = causal & (k_slot[None, :] > q_slot_T[:, None] - window)
    allowed = causal[None] & mask_BS[:, None, :].astype(bool)
    return allowed | (k_slot[None, :] == q_slot_T[:, None])[None]


def _cached_attention(q_BTNH, k_BKSH, v_BKSH, mask_BS, q_slot_T, window=None) -> jax.Array:
    """Grouped-query attention of T queries over the cache (layout [B, K, S, H]); [B, T, N, H]."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    q = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k_BKSH, preferred_element_type=jnp.float32)
    scores = scores * (H**-0.5)
    allowed = _allowed(q_slot_T, k_BKSH.shape[2], mask_BS, window)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BTNH.dtype)
    out = jnp.einsum("bkgts,bksh->btkgh", probs, v_BKSH)
    return out.reshape(B, T, N, H)


def _reduce_attention(q_B1NH, k_BKSH, v_BKSH, mask_BS, q_slot_1, window=None) -> jax.Array:
    """`_cached_attention` for one query per row, as multiply-and-sum reductions.

    Same numbers as the einsum form (fp32 scores, probabilities cast to the compute dtype,
    fp32 accumulation of the values); XLA emits reduction kernels instead of batched matmuls
    with a single row.
    """
    B, _, N, H = q_B1NH.shape
    K = k_BKSH.shape[1]
    q = q_B1NH.reshape(B, K, N // K, 1, H).astype(jnp.float32)
    scores = (q * k_BKSH[:, :, None].astype(jnp.float32)).sum(-1) * (H**-0.5)  # B K G S
    allowed = _allowed(q_slot_1, k_BKSH.shape[2], mask_BS, window)[:, 0]  # B S
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_B1NH.dtype)
    out = (probs[..., None].astype(jnp.float32) * v_BKSH[:, :, None].astype(jnp.float32)).sum(3)
    return out.astype(q_B1NH.dtype).reshape(B, 1, N, H)


class Attention(nnx.Module):
    """Multi-head / grouped-query attention through `jax.nn.dot_product_attention`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, path: str = "attn"):
        self.cfg = cfg
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_dim
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5  # GPT-2's residual scaling
        if cfg.fused_qkv:  # [d, (q, k, v), heads, head_dim]; multi-head attention only
            self.wqkv = _param(rngs, (d, 3, h, hd), ("embed", None, "heads", "head_dim"), cfg)
        else:
            self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg)
            self.wk = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
            self.wv = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
        self.wo = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), cfg, std=out_std)
        if cfg.use_bias or cfg.qkv_bias:
            if cfg.fused_qkv:
                self.bqkv = _param(rngs, (3, h, hd), (None, "heads", "head_dim"), cfg, value=0.0)
            else:
                self.bq = _param(rngs, (h, hd), ("heads", "head_dim"), cfg, value=0.0)
                self.bk = _param(rngs, (k, hd), ("kv_heads", "head_dim"), cfg, value=0.0)
                self.bv = _param(rngs, (k, hd), ("kv_heads", "head_dim"), cfg, value=0.0)
        if cfg.use_bias:
            self.bo = _param(rngs, (d,), ("norm",), cfg, value=0.0)
        if cfg.qk_norm:
            self.q_norm = Norm(cfg, rngs, dim=hd, kind="rmsnorm")
            self.k_norm = Norm(cfg, rngs, dim=hd, kind="rmsnorm")
        for name, n_in in (("wq", 1), ("wk", 1), ("wv", 1), ("wo", 2)):
            if not cfg.fused_qkv or name == "wo":
                lora.add_adapter(self, name, f"{path}/{name}", cfg, rngs, n_in)

    def _use_cudnn(self, right_padded: bool, dt) -> bool:
        """cuDNN flash attention: full causal forward, right padding only, half precision,
        no sliding window (the XLA path applies the window through its mask)."""
        impl = self.cfg.attention_impl
        return (
            right_padded
            and self.cfg.sliding_window is None
            and impl in ("auto", "cudnn")
            and (impl == "cudnn" or jax.default_backend() == "gpu")
            and dt in (jnp.bfloat16, jnp.float16)
        )

    def _project(self, x_BTD):
        """Q [B, T, N, H], K and V [B, T, K, H] in the input's dtype."""
        dt = x_BTD.dtype
        if self.cfg.fused_qkv:
            qkv = jnp.einsum("btd,dcnh->btcnh", x_BTD, self.wqkv[...].astype(dt))
            if self.cfg.use_bias or self.cfg.qkv_bias:
                qkv = qkv + self.bqkv[...].astype(dt)
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = jnp.einsum("btd,dnh->btnh", x_BTD, self.wq[...].astype(dt))
        k = jnp.einsum("btd,dkh->btkh", x_BTD, self.wk[...].astype(dt))
        v = jnp.einsum("btd,dkh->btkh", x_BTD, self.wv[...].astype(dt))
        if self.cfg.lora_rank:
            q = lora.apply(self, "wq", x_BTD, q, 1, self.cfg)
            k = lora.apply(self, "wk", x_BTD, k, 1, self.cfg)
            v = lora.apply(self, "wv", x_BTD, v, 1, self.cfg)
        if self.cfg.use_bias or self.cfg.qkv_bias:
            q, k, v = (
                q + self.bq[...].astype(dt),
                k + self.bk[...].astype(dt),
                v + self.bv[...].astype(dt),
            )
        return q, k, v

    def __call__(self, x_BTD, positions_BT, mask_BS, cache, cache_index, right_padded):
        cfg, dt = self.cfg, x_BTD.dtype
        q, k, v = self._project(x_BTD)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.pos_emb == "rope":
            inv_freq = None if cfg.rope_scaling == "none" else rope_inv_freq(cfg)
            q = rope(q, positions_BT, cfg.rope_theta, inv_freq)
            k = rope(k, positions_BT, cfg.rope_theta, inv_freq)
        q = wlc(q, ("batch", "length", "act_heads", None))
        k = wlc(k, ("batch", "length", "act_kv_heads", None))
        v = wlc(v, ("batch", "length", "act_kv_heads", None))
        T = x_BTD.shape[1]
        if cache is not None:
            # Cache layout [B, K, S, H]: batch and kv-head lead, as the batched matmuls of
            # decode attention want them, so no per-step transpose of the whole cache.
            kc = jax.lax.dynamic_update_slice_in_dim(
                cache["k"], k.swapaxes(1, 2).astype(cache["k"].dtype), cache_index, axis=2
            )
            vc = jax.lax.dynamic_update_slice_in_dim(
                cache["v"], v.swapaxes(1, 2).astype(cache["v"].dtype), cache_index, axis=2
            )
            cache = {"k": kc, "v": vc}
            q_slot = cache_index + jnp.arange(T)
            attend = _reduce_attention if T == 1 and cfg.decode_attention == "reduce" else None
            out = (attend or _cached_attention)(
                q, kc.astype(dt), vc.astype(dt), mask_BS, q_slot, cfg.sliding_window
            )
        elif self._use_cudnn(right_padded, dt):
            lengths = mask_BS.astype(jnp.int32).sum(-1)
            out = jax.nn.dot_product_attention(
                q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation="cudnn"
            )
        else:
            allowed = _allowed(jnp.arange(T), k.shape[1], mask_BS, cfg.sliding_window)
            out = jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="xla")
        out = wlc(out, ("batch", "length", "act_heads", None))
        y = jnp.einsum("btnh,nhd->btd", out, self.wo[...].astype(dt))
        if cfg.lora_rank:
            y = lora.apply(self, "wo", out, y, 2, cfg)
        if cfg.use_bias:
            y = y + self.bo[...].astype(dt)
        return y, cache


class MLP(nnx.Module):
    """GELU (GPT-2, tanh approximation) or SwiGLU (Llama) feed-forward block."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, path: str = "mlp"):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.d_ff
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.wi = _param(rngs, (d, f), ("embed", "mlp"), cfg)
        if cfg.mlp == "swiglu":
            self.wg = _param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.wo = _param(rngs, (f, d), ("mlp", "embed"), cfg, std=out_std)
        if cfg.use_bias:
            self.bi = _param(rngs, (f,), ("mlp",), cfg, value=0.0)
            if cfg.mlp == "swiglu":
                self.bg = _param(rngs, (f,), ("mlp",), cfg, value=0.0)
            self.bo = _param(rngs, (d,), ("norm",), cfg, value=0.0)
        for name, n_in in (("wi", 1), ("wg", 1), ("wo", 1)):
            if hasattr(self, name):
                lora.add_adapter(self, name, f"{path}/{name}", cfg, rngs, n_in)

    def __call__(self, x_BTD):
        cfg, dt = self.cfg, x_BTD.dtype
        h = x_BTD @ self.wi[...].astype(dt)
        if cfg.lora_rank:
            h = lora.apply(self, "wi", x_BTD, h, 1, cfg)
        if cfg.use_bias:
            h = h + self.bi[...].astype(dt)
        if cfg.mlp == "swiglu":
            g = x_BTD @ self.wg[...].astype(dt)
            if cfg.lora_rank:
                g = lora.apply(self, "wg", x_BTD, g, 1, cfg)
            if cfg.use_bias:
                g = g + self.bg[...].astype(dt)
            h = jax.nn.silu(g) * h
        else:
            h = jax.nn.gelu(h, approximate=True)
        h = wlc(h, ("batch", "length", "act_mlp"))
        y = h @ self.wo[...].astype(dt)
        if cfg.lora_rank:
            y = lora.apply(self, "wo", h, y, 1, cfg)
        if cfg.use_bias:
            y = y + self.bo[...].astype(dt)
        return y


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, layer: int = 0):
        self.ln1 = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs, path=f"blocks/{layer}/attn")
        self.ln2 = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs, path=f"blocks/{layer}/mlp")

    def __call__(self, x, positions, mask, cache=None, cache_index=None, right_padded=False):
        a, cache = self.attn(self.ln1(x), positions, mask, cache, cache_index, right_padded)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return wlc(x, ("batch", "length", "act_embed")), cache


def _block_call(block, x, positions, mask, right_padded):
    return block(x, positions, mask, None, None, right_padded)[0]


_remat_block_call = nnx.remat(_block_call, static_argnums=(4,))


def default_positions(attention_mask_BT: jax.Array) -> jax.Array:
    """Position id = number of real tokens before this one (0 on leading padding)."""
    return jnp.maximum(jnp.cumsum(attention_mask_BT.astype(jnp.int32), axis=1) - 1, 0)


class Transformer(nnx.Module):
    """Decoder-only language model.

    `forward` returns final hidden states (after the last norm) and the updated cache;
    `unembed` maps hidden states to fp32 logits; `__call__` does both.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, lm_head: bool = True):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        if cfg.pos_emb == "learned":
            self.pos_embed = _param(
                rngs, (cfg.max_seq_len, cfg.d_model), ("pos", "embed"), cfg, std=0.01
            )
        self.blocks = nnx.List([Block(cfg, rngs, layer=i) for i in range(cfg.n_layers)])
        self.ln_f = Norm(cfg, rngs)
        if lm_head and not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

    def forward(
        self,
        input_ids_BT: jax.Array,
        attention_mask_BT: jax.Array | None = None,
        positions_BT: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        cache_index: jax.Array | int | None = None,
        right_padded: bool = False,
    ) -> tuple[jax.Array, Cache | None]:
        """Hidden states [B, T, D] in compute dtype, and the new cache (None without one).

        Args:
          input_ids_BT: token ids.
          attention_mask_BT: 1 = real token. Without a cache it is over the T inputs; with a
            cache it is over the S cache slots (after this call's writes).
          positions_BT: position ids; default counts real tokens (no cache) — required with a
            cache.
          cache: from `init_cache`; written at `cache_index`.
          right_padded: promise that padding is only on the right, which allows the cuDNN
            flash-attention kernel on GPU.
        """
        cfg = self.cfg
        B, T = input_ids_BT.shape
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones((B, T), jnp.int32)
        if positions_BT is None:
            if cache is not None:
                raise ValueError("positions_BT is required when decoding with a cache")
            positions_BT = default_positions(attention_mask_BT)
        # Gather from tables whose embed axis is all-gathered first (as FSDP does anyway), so
        # the partitioner does not fall back to replicating the gathered activations.
        table = wlc(self.embed[...], ("vocab", None))
        x = jnp.take(table, input_ids_BT, axis=0).astype(cfg.dtype)
        if cfg.pos_emb == "learned":
            pos_table = wlc(self.pos_embed[...], ("pos", None))
            x = x + jnp.take(pos_table, positions_BT, axis=0).astype(cfg.dtype)
        x = wlc(x, ("batch", "length", "act_embed"))
        new_cache = [] if cache is not None else None
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x, c = block(x, positions_BT, attention_mask_BT, cache[i], cache_index)
                new_cache.append(c)
            elif cfg.remat:
                x = _remat_block_call(block, x, positions_BT, attention_mask_BT, right_padded)
            else:
                x, _ = block(x, positions_BT, attention_mask_BT, None, None, right_padded)
        return self.ln_f(x), new_cache

    def unembed(self, hidden_BTD: jax.Array) -> jax.Array:
        """fp32 logits [B, T, V] from hidden states (works on any leading shape)."""
        dt = hidden_BTD.dtype
        if self.cfg.tie_embeddings:
            w_DV = self.embed[...].astype(dt).T
        else:
            w_DV = self.lm_head[...].astype(dt)
        logits = jnp.einsum("...d,dv->...v", hidden_BTD, w_DV, preferred_element_type=jnp.float32)
        if logits.ndim == 3:
            logits = wlc(logits, ("batch", "length", "act_vocab"))
        return logits

    def __call__(
        self,
        input_ids_BT,
        attention_mask_BT=None,
        positions_BT=None,
        *,
        cache=None,
        cache_index=None,
        right_padded=False,
    ) -> Any:
        """Logits [B, T, V] (fp32); with a cache, `(logits, new_cache)`."""
        hidden, new_cache = self.forward(
            input_ids_BT,
            attention_mask_BT,
            positions_BT,
            cache=cache,
            cache_index=cache_index,
            right_padded=right_padded,
        )
        logits = self.unembed(hidden)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        """Zeroed K/V cache: per layer `{"k","v"}` of shape [B, n_kv_heads, S, head_dim]."""
        cfg = self.cfg
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        dtype = dtype or cfg.dtype
        return [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(cfg.n_layers)
        ]
