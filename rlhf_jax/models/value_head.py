"""A scalar value head on a policy's trunk: PPO's critic without a second transformer.

The head is a linear map from the policy's final hidden states (after the last norm) to one
value per position, V(s_t) = h_t · w + b, computed in float32. It is its own small module (not
a field of `Transformer`), so the policy's parameters stay exactly a plain `Transformer`'s:
sampling, the reference, checkpoints' `params` item and export see no head. The online-RL
iteration (`steps.rl`, `RLConfig.value_model = "head"`) runs the policy's trunk once per
minibatch and reads both the logits and this head from the same hidden states, so the value
loss's gradient flows into the shared trunk, scaled by `vf_coef` (the shared actor-critic of
Mnih et al. 2016 and of the PPO paper, Schulman et al. 2017, Eq. 9).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import ModelConfig


class ValueHead(nnx.Module):
    """V(h) = h · w + b on hidden states [..., D] -> values [...] (float32).

    Args:
      cfg: the policy's model config (`d_model`, parameter dtype, `init_std`).
      rngs: init randomness.
      init_std: std of `w` at init; None uses `cfg.init_std`, 0 starts from zeros. The bias
        starts at 0, so the first values are close to 0 (they carry no reward scale yet) while
        a non-zero `w` lets the value loss reach the trunk from the first step.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, init_std: float | None = None):
        std = cfg.init_std if init_std is None else float(init_std)
        w = std * jax.random.normal(rngs.params(), (cfg.d_model,), cfg.pdtype)
        self.w = nnx.Param(w, out_sharding=("embed",))
        self.b = nnx.Param(jnp.zeros((1,), cfg.pdtype), out_sharding=(None,))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        w = self.w[...].astype(jnp.float32)
        b = self.b[...].astype(jnp.float32)[0]
        return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), w) + b
