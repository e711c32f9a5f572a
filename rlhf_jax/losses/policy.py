"""Policy-gradient and value losses for online RL, and how per-token losses are aggregated.

This module owns the per-token losses of PPO and its critic-free relatives: the clipped
surrogate with asymmetric clipping and optional dual clip, at token or sequence level (GSPO),
the clipped-IS-weight loss of CISPO, the clipped value loss, the entropy of the sampling
distribution, the explained variance of a critic, and the four ways of reducing a [B, T] loss to
a scalar (verl's `loss_agg_mode`). The names are registries (`POLICY_LOSS_TYPES`,
`RATIO_LEVELS`, `LOSS_AGG_MODES`, `KL_ESTIMATORS`) so gin can choose each; every choice combines
with every other. Continuous hyperparameters are traceable array arguments.

Losses return per-token values `loss_BT` and their statistics as *sums* over completion tokens
with the token count under "tokens"; `aggregate_loss` returns a sum and its denominator. Summing
both over micro-batches and dividing once gives exactly the full minibatch's value, so gradient
accumulation is exact, as for the DPO losses.

Notation: r_t = pi(y_t) / pi_old(y_t), the importance ratio of the current policy against the
one that sampled the rollout; A_t the advantage; sg the stop-gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.ops.kl import KL_KINDS, kl_penalty
from rlhf_jax.ops.logprobs import entropy_from_logits, masked_mean, masked_sum

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

POLICY_LOSS_TYPES: tuple[str, ...] = ("ppo", "cispo")
RATIO_LEVELS: tuple[str, ...] = ("token", "sequence")
LOSS_AGG_MODES: tuple[str, ...] = (
    "token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
)
KL_ESTIMATORS: tuple[str, ...] = KL_KINDS

# exp() of a log-ratio beyond this overflows nothing but is meaningless (the rollout's tokens
# are then essentially impossible under one of the two policies); clamping keeps a stray value
# from turning the loss into inf. Inside the range the gradient is untouched.
_MAX_LOG_RATIO = 20.0


def _f32(x: ArrayLike) -> Array:
    return jnp.asarray(x, jnp.float32)


def _mask_f32(mask_BT: ArrayLike) -> Array:
    return (jnp.asarray(mask_BT) != 0).astype(jnp.float32)


def importance_log_ratio(
    logps_BT: Array, old_logps_BT: Array, mask_BT: Array, *, ratio_level: str = "token"
) -> Array:
    """log r_t per token, at token or sequence level.

    "token": log pi(y_t) - log pi_old(y_t) (PPO, Schulman et al. 2017).
    "sequence": GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", the GSPO-token
    form): every token carries the length-normalised sequence log-ratio
    log s = mean_t (log pi(y_t) - log pi_old(y_t)) as its value, and the gradient of its own
    log-prob: log s_t = sg(log s) + log pi(y_t) - sg(log pi(y_t)). With one advantage per
    sequence and `seq_mean_token_mean` aggregation this is exactly GSPO's sequence objective;
    per-token advantages also work.

    Args:
      logps_BT: current policy log-probs of the rollout tokens (differentiable).
      old_logps_BT: log-probs of the policy that sampled them (no gradient).
      mask_BT: completion mask.
      ratio_level: "token" or "sequence" (static).

    Returns:
      `log_ratio_BT`, float32, 0 where the mask is 0.

    Raises:
      ValueError: unknown ratio level.
    """
    m = _mask_f32(mask_BT)
    logps = jnp.where(m > 0, _f32(logps_BT), 0.0)
    old = jnp.where(m > 0, jax.lax.stop_gradient(_f32(old_logps_BT)), 0.0)
    log_ratio = logps - old
    if ratio_level == "token":
        return log_ratio
    if ratio_level != "sequence":
        raise ValueError(f"Unknown ratio_level {ratio_level!r}; known: {RATIO_LEVELS}")
    sg = jax.lax.stop_gradient
    seq_B1 = masked_mean(sg(log_ratio), m, axis=-1)[:, None]
    return (seq_B1 + logps - sg(logps)) * m


def _ppo(
    log_ratio: Array, adv: Array, logps: Array, eps_low: Array, eps_high: Array, dual_c
) -> tuple[Array, dict[str, Array]]:
    # Clipped surrogate: Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    # Eq. 7, with separate lower and upper clip ranges (DAPO's clip-higher: Yu et al. 2025,
    # Sec. 3.1): loss = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)).
    ratio = jnp.exp(jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    stats = {"ppo/clipfrac": (clipped > unclipped).astype(jnp.float32)}
    if dual_c is not None:
        # Dual clip: Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep
        # Reinforcement Learning": for A < 0 the loss is also capped at -c A (c > 1), so
        # a huge ratio on a bad action cannot dominate the update; there the gradient is 0.
        bound = -adv * dual_c
        dual_active = (adv < 0) & (loss > bound)
        loss = jnp.where(dual_active, bound, loss)
        stats["ppo/dual_clipfrac"] = dual_active.astype(jnp.float32)
    return loss, stats


def _cispo(
    log_ratio: Array, adv: Array, logps: Array, eps_low: Array, eps_high: Array, dual_c
) -> tuple[Array, dict[str, Array]]:
    # CISPO: MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
    # Attention", Eqs. 4-5: loss = -sg(clip(r, 1 - eps_low, 1 + eps_high)) * A * log pi(y_t).
    # The IS weight is clipped and stopped, never the token: every token keeps a gradient.
    ratio = jnp.exp(jnp.clip(log_ratio, -_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high))
    outside = (ratio < 1.0 - eps_low) | (ratio > 1.0 + eps_high)
    return -weight * adv * logps, {"ppo/clipfrac": outside.astype(jnp.float32)}


_POLICY_LOSSES: dict[str, Callable[..., tuple[Array, dict[str, Array]]]] = {
    "ppo": _ppo,
    "cispo": _cispo,
}
assert tuple(_POLICY_LOSSES) == POLICY_LOSS_TYPES


def policy_loss(
    logps_BT: Array,
    old_logps_BT: Array,
    advantages_BT: Array,
    mask_BT: Array,
    *,
    loss_type: str = "ppo",
    ratio_level: str = "token",
    eps_low: ArrayLike = 0.2,
    eps_high: ArrayLike = 0.2,
    dual_clip_c: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-token policy loss of the named type, and its statistics as token sums.

    "ppo" with `ratio_level="token"` is PPO's clipped surrogate (verl `loss_mode=vanilla`),
    with `ratio_level="sequence"` it is GSPO (verl `loss_mode=gspo`); "cispo" is CISPO.

    Args:
      logps_BT: current policy log-probs of the rollout tokens (differentiable).
      old_logps_BT: log-probs under the policy that sampled the rollout.
      advantages_BT: advantages (treated as constants).
      mask_BT: completion mask.
      loss_type: "ppo" or "cispo" (static).
      ratio_level: "token" or "sequence" (static).
      eps_low: lower clip range, r >= 1 - eps_low (traceable).
      eps_high: upper clip range, r <= 1 + eps_high (traceable).
      dual_clip_c: dual-clip constant c > 1 for "ppo", or None for none. Whether it is None is
        static; its value is traceable.

    Returns:
      `(loss_BT, sums)`: `loss_BT` float32, 0 where the mask is 0; `sums` holds token sums of
      `ppo/clipfrac` (tokens whose clip is active), `ppo/dual_clipfrac` (with a dual clip),
      `ppo/approx_kl` (k3 estimate of KL(pi_old || pi), Schulman 2020), `ppo/ratio` (r), and
      the count `tokens`; divide by `tokens` for means.

    Raises:
      ValueError: unknown loss type or ratio level, or a dual clip with "cispo".
    """
    if loss_type not in _POLICY_LOSSES:
        raise ValueError(f"Unknown policy loss_type {loss_type!r}; known: {POLICY_LOSS_TYPES}")
    if dual_clip_c is not None and loss_type != "ppo":
        raise ValueError(f"dual_clip_c applies to loss_type='ppo' only, not {loss_type!r}")
    m = _mask_f32(mask_BT)
    log_ratio = importance_log_ratio(logps_BT, old_logps_BT, m, ratio_level=ratio_level)
    adv = jnp.where(m > 0, jax.lax.stop_gradient(_f32(advantages_BT)), 0.0)
    logps = jnp.where(m > 0, _f32(logps_BT), 0.0)
    dual_c = None if dual_clip_c is None else _f32(dual_clip_c)
    loss, stats = _POLICY_LOSSES[loss_type](
        log_ratio, adv, logps, _f32(eps_low), _f32(eps_high), dual_c
    )
    # KL(pi_old || pi) from the tokens pi_old sampled, by k3 = (r - 1) - log r: unbiased and
    # never negative, the estimator Huang et al. 2022 ("The 37 Implementation Details of PPO",
    # detail 12) recommend logging. Always token-level, whatever the ratio level.
    token_log_ratio = jax.lax.stop_gradient(
        jnp.clip(jnp.where(m > 0, logps - _f32(old_logps_BT), 0.0), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    )
    stats["ppo/approx_kl"] = kl_penalty(jnp.zeros_like(token_log_ratio), token_log_ratio, "k3")
    stats["ppo/ratio"] = jnp.exp(
        jnp.clip(jax.lax.stop_gradient(log_ratio), -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    )
    sums = {k: masked_sum(jax.lax.stop_gradient(v), m) for k, v in stats.items()}
    sums["tokens"] = jnp.sum(m)
    return loss * m, sums


def value_loss(
    values_BT: Array,
    old_values_BT: Array,
    returns_BT: Array,
    mask_BT: Array,
    *,
    clip_range: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-token critic loss 0.5 * (V - R)^2, optionally clipped around the rollout's values.

    With a clip range (PPO2's value clipping, as in OpenAI baselines' ppo2 and Huang et al.
    2022, "The 37 Implementation Details of Proximal Policy Optimization", detail 9):
    V_clip = V_old + clip(V - V_old, -c, c), loss = 0.5 * max((V - R)^2, (V_clip - R)^2).

    Args:
      values_BT: current critic values (differentiable).
      old_values_BT: the values recorded at rollout time.
      returns_BT: regression targets (from `gae`).
      mask_BT: completion mask.
      clip_range: c, or None for the unclipped loss (None-ness static, value traceable).

    Returns:
      `(loss_BT, sums)`: `loss_BT` float32, 0 where the mask is 0; `sums` holds token sums of
      `value/clipfrac` (clipped error larger; with a clip range), `value/error` ((V - R)^2),
      `value/mean` (V) and the count `tokens`.
    """
    m = _mask_f32(mask_BT)
    sg = jax.lax.stop_gradient
    v = jnp.where(m > 0, _f32(values_BT), 0.0)
    ret = jnp.where(m > 0, sg(_f32(returns_BT)), 0.0)
    err = jnp.square(v - ret)
    stats = {"value/error": err, "value/mean": v}
    if clip_range is None:
        loss = 0.5 * err
    else:
        old = jnp.where(m > 0, sg(_f32(old_values_BT)), 0.0)
        c = _f32(clip_range)
        err_clipped = jnp.square(old + jnp.clip(v - old, -c, c) - ret)
        loss = 0.5 * jnp.maximum(err, err_clipped)
        stats["value/clipfrac"] = (err_clipped > err).astype(jnp.float32)
    sums = {k: masked_sum(sg(x), m) for k, x in stats.items()}
    sums["tokens"] = jnp.sum(m)
    return loss * m, sums


def aggregate_loss(
    loss_BT: Array, mask_BT: Array, *, mode: str, max_len: ArrayLike | None = None
) -> tuple[Array, Array]:
    """Reduces a per-token loss to (sum, denominator); the loss is sum / denominator.

    verl's `loss_agg_mode`, with `_` for `-`. Rows count when they have at least one completion
    token (padding rows and fully masked truncated completions do not):

    - "token_mean": sum_{i,t} l / sum_{i,t} m: every token weighs the same (DAPO, Yu et al.
      2025, Sec. 3.3; PPO for LMs).
    - "seq_mean_token_sum": sum_i (sum_t l) / rows.
    - "seq_mean_token_mean": sum_i (mean_t l) / rows: every sequence weighs the same (GRPO,
      Shao et al. 2024, Eq. 3), which favours short sequences per token.
    - "seq_mean_token_sum_norm": sum_{i,t} l / (rows * max_len): Dr. GRPO's constant
      normaliser (Liu et al. 2025, "Understanding R1-Zero-Like Training"), no length bias;
      `max_len` is the generation budget, the mask's width T by default (traceable).

    Args:
      loss_BT: per-token loss, already 0 where the mask is 0 or not (it is masked here).
      mask_BT: completion mask.
      mode: one of `LOSS_AGG_MODES` (static).
      max_len: normaliser of "seq_mean_token_sum_norm".

    Returns:
      `(loss_sum, denominator)`, float32 scalars. Sum both over micro-batches before dividing
      for exact accumulation; the denominator is 0 for an all-padding batch, so divide by
      `max(denominator, 1)`.

    Raises:
      ValueError: unknown mode.
    """
    m = _mask_f32(mask_BT)
    per_row_sum_B = masked_sum(_f32(loss_BT), m, axis=-1)
    tokens_B = jnp.sum(m, axis=-1)
    rows = jnp.sum((tokens_B > 0).astype(jnp.float32))
    if mode == "token_mean":
        return jnp.sum(per_row_sum_B), jnp.sum(tokens_B)
    if mode == "seq_mean_token_sum":
        return jnp.sum(per_row_sum_B), rows
    if mode == "seq_mean_token_mean":
        return jnp.sum(per_row_sum_B / jnp.maximum(tokens_B, 1.0)), rows
    if mode == "seq_mean_token_sum_norm":
        length = _f32(m.shape[-1] if max_len is None else max_len)
        return jnp.sum(per_row_sum_B), rows * length
    raise ValueError(f"Unknown loss aggregation mode {mode!r}; known: {LOSS_AGG_MODES}")


def masked_entropy(logits_BTV: Array, mask_BT: Array, *, temperature: ArrayLike = 1.0) -> Array:
    """Per-token entropy of the sampling distribution softmax(logits / temperature).

    The entropy bonus of Mnih et al. 2016 (A3C) and Schulman et al. 2017, Eq. 9, computed on
    the distribution the sampler draws from (before top-k / top-p filtering, as verl does).
    Temperature 0 (greedy) gives entropy 0.

    Args:
      logits_BTV: logits aligned with the completion tokens.
      mask_BT: completion mask.
      temperature: sampling temperature (traceable).

    Returns:
      `entropy_BT` in nats, float32, 0 where the mask is 0.
    """
    t = _f32(temperature)
    safe_t = jnp.where(t > 0, t, 1.0)
    entropy = entropy_from_logits(_f32(logits_BTV) / safe_t)
    return jnp.where((jnp.asarray(mask_BT) != 0) & (t > 0), entropy, 0.0)


def explained_variance(values_BT: Array, returns_BT: Array, mask_BT: Array) -> Array:
    """1 - Var(R - V) / Var(R) over completion tokens: 1 is a perfect critic, <= 0 useless.

    Args:
      values_BT: critic values.
      returns_BT: their targets.
      mask_BT: completion mask.

    Returns:
      A float32 scalar (0 when the returns have no variance).
    """
    m = _mask_f32(mask_BT)
    v, r = _f32(values_BT), _f32(returns_BT)

    def var(x: Array) -> Array:
        return masked_mean(jnp.square(x - masked_mean(x, m)), m)

    var_r = var(r)
    return jnp.where(var_r > 0, 1.0 - var(r - v) / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def check_policy_choices(
    *,
    loss_type: str = "ppo",
    ratio_level: str = "token",
    agg_mode: str = "token_mean",
    kl_estimator: str = "k3",
    dual_clip: bool = False,
) -> None:
    """Static validation of the policy-loss switches; raises ValueError naming the setting."""
    for setting, value, known in (
        ("loss_type", loss_type, POLICY_LOSS_TYPES),
        ("ratio_level", ratio_level, RATIO_LEVELS),
        ("agg_mode", agg_mode, LOSS_AGG_MODES),
        ("kl_estimator", kl_estimator, KL_ESTIMATORS),
    ):
        if value not in known:
            raise ValueError(f"{setting}={value!r} is not one of {known}")
    if dual_clip and loss_type != "ppo":
        raise ValueError(f"dual clip applies to loss_type='ppo' only, not {loss_type!r}")


def kl_loss_per_token(logps_BT: Array, ref_logps_BT: Array, mask_BT: Array, *, kind: str) -> Array:
    """Per-token KL(pi || ref) estimate for the loss (GRPO's KL term, verl `use_kl_loss`).

    Shao et al. 2024, "DeepSeekMath", Eq. 4 uses k3; k1 and k2 are the other estimators of
    `ops.kl` (Schulman 2020). Differentiable in `logps_BT`.

    Args:
      logps_BT: current policy log-probs.
      ref_logps_BT: reference log-probs (no gradient).
      mask_BT: completion mask.
      kind: one of `KL_ESTIMATORS` (static).

    Returns:
      `kl_BT`, float32, 0 where the mask is 0.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"Unknown KL estimator {kind!r}; known: {KL_ESTIMATORS}")
    m = _mask_f32(mask_BT)
    logps = jnp.where(m > 0, _f32(logps_BT), 0.0)
    ref = jnp.where(m > 0, jax.lax.stop_gradient(_f32(ref_logps_BT)), 0.0)
    return kl_penalty(logps, ref, kind) * m
