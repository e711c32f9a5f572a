"""Per-token KL estimators between a policy and its reference, from sampled-token log-probs.

This module owns the k1 / k2 / k3 estimators of KL(pi || ref) described in J. Schulman,
"Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html). Tokens are sampled
from the policy pi; with the ratio r = ref(x) / pi(x) = exp(ref_logp - logp):

- k1 = -log r = logp - ref_logp: unbiased, high variance, can be negative per sample.
- k2 = 0.5 * (log r)^2: biased (low bias when pi ~ ref), always >= 0, low variance.
- k3 = (r - 1) - log r: unbiased and always >= 0 (since log r <= r - 1), low variance.

The estimator is chosen by a static string; everything else is a pure `jnp` function.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax.ops.logprobs import masked_sum

Array = jax.Array
KLKind = Literal["k1", "k2", "k3"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_penalty(logp: Array, ref_logp: Array, kind: KLKind = "k1") -> Array:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    Args:
      logp: log pi(x) of the sampled tokens, any shape.
      ref_logp: log ref(x) of the same tokens, same shape.
      kind: "k1", "k2" or "k3" (static).

    Returns:
      Per-token estimates in float32 (at least), same shape as `logp`.
    """
    log_ratio = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)  # log r
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        # expm1 keeps (r - 1) accurate when pi ~ ref, where k3 is a difference of small numbers.
        return jnp.expm1(log_ratio) - log_ratio
    raise ValueError(f"Unknown KL estimator {kind!r}; expected one of {KL_KINDS}")


def sequence_kl(logp_BT: Array, ref_logp_BT: Array, mask_BT: Array, kind: KLKind = "k1") -> Array:
    """Per-sequence KL estimate: the per-token estimate summed over masked-in tokens.

    Args:
      logp_BT: policy log-probs of sampled tokens.
      ref_logp_BT: reference log-probs of the same tokens.
      mask_BT: 1 on completion tokens, 0 on prompt and padding.
      kind: "k1", "k2" or "k3" (static).

    Returns:
      `kl_B`, the summed per-token estimates.
    """
    return masked_sum(kl_penalty(logp_BT, ref_logp_BT, kind), mask_BT, axis=-1)
