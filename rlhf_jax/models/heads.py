"""Scalar heads on the transformer trunk: reward models (one score per sequence, read at the last
non-pad token) and value models (one score per token), with optional K-member head ensembles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer


def last_token_index(attention_mask_BT: jax.Array) -> jax.Array:
    """Index of the last real token in each row (works for left or right padding)."""
    T = attention_mask_BT.shape[1]
    idx = jnp.where(attention_mask_BT.astype(bool), jnp.arange(T)[None, :], -1)
    return jnp.maximum(idx.max(axis=1), 0)


class ScalarModel(nnx.Module):
    """Transformer trunk (no LM head) plus `num_heads` linear scalar heads.

    `__call__` returns fp32 scores shaped [B, K] (sequence level) or [B, T, K] (`per_token`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, num_heads: int = 1):
        self.cfg, self.num_heads = cfg, num_heads
        self.trunk = Transformer(cfg, rngs=rngs, lm_head=False)
        w = cfg.init_std * jax.random.normal(rngs.params(), (cfg.d_model, num_heads), cfg.pdtype)
        self.head_w = nnx.Param(w, out_sharding=("embed", None))
        self.head_b = nnx.Param(jnp.zeros((num_heads,), cfg.pdtype), out_sharding=(None,))

    def __call__(
        self,
        input_ids_BT,
        attention_mask_BT=None,
        positions_BT=None,
        *,
        per_token: bool = False,
        right_padded: bool = False,
    ) -> jax.Array:
        if attention_mask_BT is None:
            attention_mask_BT = jnp.ones(input_ids_BT.shape, jnp.int32)
        hidden, _ = self.trunk.forward(
            input_ids_BT, attention_mask_BT, positions_BT, right_padded=right_padded
        )
        if not per_token:
            idx = last_token_index(attention_mask_BT)
            hidden = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
        scores = jnp.einsum(
            "...d,dk->...k", hidden.astype(jnp.float32), self.head_w[...].astype(jnp.float32)
        )
        return scores + self.head_b[...].astype(jnp.float32)
