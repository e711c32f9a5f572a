"""Advantage estimators and reward shaping for online RL (PPO and the critic-free family).

This module owns the pure functions that turn a rollout's rewards into advantages: GAE for PPO
with a critic, the group estimators of the critic-free family (RLOO, GRPO, Dr. GRPO), REINFORCE
and REINFORCE++ (with and without a group baseline), ReMax and a running-mean REINFORCE
baseline, all behind one registry (`ADVANTAGE_ESTIMATORS`, `compute_advantages`) so gin can pick
one by name; and the reward shaping that comes before them: the per-token reward (the score on
the last completion token, minus the scaled KL penalty when it is folded into the reward),
reward clipping, the missing-EOS penalty and the masking of truncated completions.

Arrays are completion-aligned and right-padded: `mask_BT` is 1 on a row's completion tokens,
which form a contiguous prefix of the row, and 0 after them. Every continuous hyperparameter
(gamma, lambda, eps, coefficients, penalties) is an ordinary array argument that may be traced,
so changing it never recompiles; names and group sizes are static.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.ops.logprobs import masked_whiten

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

GROUP_ESTIMATORS: tuple[str, ...] = ("rloo", "grpo", "dr_grpo")
ADVANTAGE_ESTIMATORS: tuple[str, ...] = (
    "gae",
    "reinforce",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "rloo",
    "grpo",
    "dr_grpo",
    "remax",
    "running_mean",
)
# Estimators whose baseline compares the k samples of one prompt (rows in groups of k).
GROUPED_ESTIMATORS: tuple[str, ...] = GROUP_ESTIMATORS + ("reinforce_pp_baseline",)
# Estimators that read `baseline_B` (the greedy completion's reward, or the running mean).
BASELINE_ESTIMATORS: tuple[str, ...] = ("remax", "running_mean")


def _f32(x: ArrayLike) -> Array:
    return jnp.asarray(x, jnp.float32)


def _masked(x_BT: ArrayLike, mask_BT: ArrayLike) -> tuple[Array, Array]:
    """(x with zeros where the mask is 0, mask as float32): padding may hold garbage."""
    m = jnp.asarray(mask_BT) != 0
    return jnp.where(m, _f32(x_BT), 0.0), m.astype(jnp.float32)


def _reverse_discounted_sum(x_BT: Array, mask_BT: Array, discount: Array) -> Array:
    """y_t = (x_t + discount * y_{t+1}) * m_t, by a reverse `lax.scan` over time."""

    def step(next_y_B: Array, xs: tuple[Array, Array]) -> tuple[Array, Array]:
        x_B, m_B = xs
        y_B = (x_B + discount * next_y_B) * m_B
        return y_B, y_B

    init = jnp.zeros(x_BT.shape[:1], jnp.float32)
    _, y_TB = jax.lax.scan(step, init, (x_BT.T, mask_BT.T), reverse=True)
    return y_TB.T


def gae(
    rewards_BT: Array, values_BT: Array, mask_BT: Array, *, gamma: ArrayLike, lam: ArrayLike
) -> tuple[Array, Array]:
    """Generalised advantage estimation over completion tokens.

    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", Eq. 16: delta_t = r_t + gamma * V_{t+1} - V_t and
    A_t = delta_t + gamma * lambda * A_{t+1}. The episode ends at a row's last completion
    token, so V = 0 after it (no bootstrap) and A is 0 there. Returns are A + V, the critic's
    regression target (the lambda-return).

    Args:
      rewards_BT: per-token rewards (usually `token_rewards`); ignored where the mask is 0.
      values_BT: critic values V(s_t) of the same positions; ignored where the mask is 0.
      mask_BT: 1 on completion tokens (a contiguous prefix of each row), 0 after.
      gamma: discount (traceable).
      lam: GAE lambda (traceable).

    Returns:
      `(advantages_BT, returns_BT)`, float32, both 0 where the mask is 0.
    """
    rewards, m = _masked(rewards_BT, mask_BT)
    values, _ = _masked(values_BT, mask_BT)
    gamma = _f32(gamma)
    # V_{t+1}: the next position's value, 0 past the row's last token (masked and padded).
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
    deltas = rewards + gamma * next_values - values
    advantages = _reverse_discounted_sum(deltas, m, gamma * _f32(lam))
    return advantages, (advantages + values) * m


def discounted_returns(rewards_BT: Array, mask_BT: Array, *, gamma: ArrayLike) -> Array:
    """Reward-to-go G_t = sum_{s >= t} gamma^(s - t) r_s within each row's completion.

    Args:
      rewards_BT: per-token rewards; ignored where the mask is 0.
      mask_BT: 1 on completion tokens (a contiguous prefix of each row).
      gamma: discount (traceable).

    Returns:
      `returns_BT`, float32, 0 where the mask is 0.
    """
    rewards, m = _masked(rewards_BT, mask_BT)
    return _reverse_discounted_sum(rewards, m, _f32(gamma))


def check_group_size(batch_size: int, group_size: int, estimator: str) -> None:
    """Raises ValueError unless `group_size` >= 2 divides `batch_size` (static check)."""
    if group_size < 2:
        raise ValueError(
            f"estimator={estimator!r} compares the samples of one prompt: it needs "
            f"group_size (samples per prompt) >= 2, got {group_size}"
        )
    if batch_size % group_size:
        raise ValueError(
            f"estimator={estimator!r}: batch of {batch_size} rows is not a whole number of "
            f"groups of group_size={group_size}"
        )


def group_advantages(
    scores_B: Array, *, group_size: int, estimator: str, eps: ArrayLike = 1e-6
) -> Array:
    """Advantages of k samples of each prompt against their own group (no critic).

    Rows come in groups of `group_size` = k consecutive rows, the samples of one prompt.

    - "rloo": s_i - mean_{j != i} s_j (Ahmadian et al. 2024, "Back to Basics: Revisiting
      REINFORCE Style Optimization for Learning from Human Feedback in LLMs"; Kool et al.
      2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!").
    - "grpo": (s_i - mean) / (std + eps) with the group's sample std (ddof = 1), as TRL and
      verl compute it (Shao et al. 2024, "DeepSeekMath", Sec. 4.1.2, outcome supervision).
    - "dr_grpo": s_i - mean (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical
      Perspective": no division by the std, which biases towards easy prompts).

    Args:
      scores_B: one scalar reward per row.
      group_size: k (static), >= 2, dividing B.
      estimator: "rloo", "grpo" or "dr_grpo" (static).
      eps: added to the std by "grpo" (traceable).

    Returns:
      `advantages_B`, float32.

    Raises:
      ValueError: unknown estimator, or a group size that is < 2 or does not divide B.
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"Unknown group estimator {estimator!r}; known: {GROUP_ESTIMATORS}")
    check_group_size(scores_B.shape[0], group_size, estimator)
    s_GK = _f32(scores_B).reshape(-1, group_size)
    total_G1 = jnp.sum(s_GK, axis=1, keepdims=True)
    mean_G1 = total_G1 / group_size
    if estimator == "rloo":
        adv_GK = s_GK - (total_G1 - s_GK) / (group_size - 1)
    elif estimator == "grpo":
        sq_dev_G1 = jnp.sum(jnp.square(s_GK - mean_G1), axis=1, keepdims=True)
        std_G1 = jnp.sqrt(sq_dev_G1 / (group_size - 1))
        adv_GK = (s_GK - mean_G1) / (std_G1 + _f32(eps))
    else:
        adv_GK = s_GK - mean_G1
    return adv_GK.reshape(-1)


def _last_token_one_hot(mask_BT: Array) -> Array:
    """One-hot of each row's last completion token; all zeros for an empty row."""
    m = (jnp.asarray(mask_BT) != 0).astype(jnp.float32)
    lengths_B = jnp.sum(m, axis=-1)
    last_B = jnp.maximum(lengths_B - 1, 0).astype(jnp.int32)
    hot_BT = jax.nn.one_hot(last_B, m.shape[-1], dtype=jnp.float32)
    return hot_BT * (lengths_B > 0)[:, None]


def token_rewards(
    scores_B: Array,
    mask_BT: Array,
    kl_BT: Array | None = None,
    kl_coef: ArrayLike = 0.0,
) -> Array:
    """Per-token reward: the sequence score on the last completion token, minus beta * KL.

    The KL-shaped reward of Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences" and Stiennon et al. 2020, "Learning to Summarize from Human Feedback":
    r_t = -beta * KL_t + [t = last] * score, with KL_t any per-token estimator
    (`ops.kl.kl_penalty`). With `kl_BT=None` the KL is left
    to the loss instead (GRPO's choice).

    Args:
      scores_B: sequence-level rewards.
      mask_BT: 1 on completion tokens (a contiguous prefix of each row).
      kl_BT: per-token KL estimates, or None.
      kl_coef: beta (traceable).

    Returns:
      `rewards_BT`, float32, 0 where the mask is 0 (an empty row gets no score).
    """
    rewards_BT = _last_token_one_hot(mask_BT) * _f32(scores_B)[:, None]
    if kl_BT is not None:
        kl, _ = _masked(kl_BT, mask_BT)
        rewards_BT = rewards_BT - _f32(kl_coef) * kl
    return rewards_BT


def ended_with_stop(tokens_BT: Array, mask_BT: Array, stop_ids: Sequence[int]) -> Array:
    """Whether each completion contains one of `stop_ids` (EOS) among its tokens.

    Args:
      tokens_BT: completion token ids.
      mask_BT: 1 on completion tokens (the sampler's mask includes the stop token).
      stop_ids: static stop token ids.

    Returns:
      `ended_B`, bool.
    """
    hit_BT = jnp.isin(tokens_BT, jnp.asarray(tuple(stop_ids), tokens_BT.dtype))
    return jnp.any(hit_BT & (jnp.asarray(mask_BT) != 0), axis=-1)


def missing_eos_penalty(scores_B: Array, ended_B: Array, penalty: ArrayLike) -> Array:
    """Subtracts `penalty` from the score of every completion that did not end with EOS.

    Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
    Summarization", the "EOS trick": truncated completions get a penalised score so the
    policy learns to finish; TRL's `missing_eos_penalty` subtracts, as here. 0 turns it off.

    Args:
      scores_B: sequence-level rewards.
      ended_B: whether each completion ended with a stop token (`ended_with_stop`).
      penalty: amount subtracted (traceable).

    Returns:
      `scores_B` with the penalty applied, float32.
    """
    return _f32(scores_B) - _f32(penalty) * (1.0 - jnp.asarray(ended_B).astype(jnp.float32))


def mask_truncated(mask_BT: Array, ended_B: Array) -> Array:
    """Zeros the whole mask of completions that did not end with EOS (they get no gradient).

    The overlong filtering of Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
    System at Scale", Sec. 3.4 (TRL's `mask_truncated_completions`): a truncated completion's
    reward is noise about a text that was never finished.

    Args:
      mask_BT: completion mask.
      ended_B: whether each completion ended with a stop token.

    Returns:
      The mask with truncated rows set to 0, in the mask's dtype.
    """
    keep_B1 = jnp.asarray(ended_B)[:, None]
    return jnp.where(keep_B1, mask_BT, jnp.zeros((), jnp.asarray(mask_BT).dtype))


def clip_rewards(scores: Array, clip: ArrayLike) -> Array:
    """Clips rewards to [-clip, clip] (OpenRLHF's `reward_clip_range`); traceable `clip`."""
    c = _f32(clip)
    return jnp.clip(_f32(scores), -c, c)


# --------------------------------------------------------------------------- registry


class AdvantageInputs(NamedTuple):
    """What an estimator may read; float32 [B, T] unless noted."""

    rewards: Array  # per-token rewards (`token_rewards`), 0 where the mask is 0
    mask: Array  # completion mask as float32
    values: Array | None  # critic values ("gae" only)
    baseline: Array | None  # [B] baseline ("remax", "running_mean")
    gamma: Array
    lam: Array
    eps: Array
    group_size: int  # static


def _broadcast(adv_B: Array, mask: Array) -> Array:
    return adv_B[:, None] * mask


def _seq_scores(x: AdvantageInputs) -> Array:
    # Outcome estimators compare sequences by their total reward: the score, minus the summed
    # KL penalty when the KL was folded into the reward (TRL's RLOO does the same).
    return jnp.sum(x.rewards, axis=-1)


def _gae(x: AdvantageInputs) -> tuple[Array, Array]:
    return gae(x.rewards, x.values, x.mask, gamma=x.gamma, lam=x.lam)


def _reinforce(x: AdvantageInputs) -> tuple[Array, Array]:
    # Williams 1992: the reward-to-go, no baseline.
    returns = discounted_returns(x.rewards, x.mask, gamma=x.gamma)
    return returns, returns


def _reinforce_pp(x: AdvantageInputs) -> tuple[Array, Array]:
    # REINFORCE++: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    # Language Models": reward-to-go of the KL-shaped token rewards, normalised with the
    # mean and std of every completion token in the batch (global, not per group).
    returns = discounted_returns(x.rewards, x.mask, gamma=x.gamma)
    return masked_whiten(returns, x.mask), returns


def _reinforce_pp_baseline(x: AdvantageInputs) -> tuple[Array, Array]:
    # REINFORCE++-baseline (Hu 2025): subtract the group mean of the sequence rewards,
    # then normalise globally over the batch's tokens.
    returns = discounted_returns(x.rewards, x.mask, gamma=x.gamma)
    centred = group_advantages(_seq_scores(x), group_size=x.group_size, estimator="dr_grpo")
    return masked_whiten(_broadcast(centred, x.mask), x.mask), returns


def _group(name: str) -> Callable[[AdvantageInputs], tuple[Array, Array]]:
    def estimate(x: AdvantageInputs) -> tuple[Array, Array]:
        adv_B = group_advantages(_seq_scores(x), group_size=x.group_size, estimator=name, eps=x.eps)
        return _broadcast(adv_B, x.mask), discounted_returns(x.rewards, x.mask, gamma=x.gamma)

    return estimate


def _with_baseline(x: AdvantageInputs) -> tuple[Array, Array]:
    # ReMax: Li et al. 2024, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning
    # Method for Aligning Large Language Models": baseline = reward of the greedy
    # completion of the same prompt. Running mean: REINFORCE with a moving-average baseline
    # (Williams 1992), the baseline from `controllers.running_mean_update`.
    adv_B = _seq_scores(x) - _f32(x.baseline)
    return _broadcast(adv_B, x.mask), discounted_returns(x.rewards, x.mask, gamma=x.gamma)


_ESTIMATORS: dict[str, Callable[[AdvantageInputs], tuple[Array, Array]]] = {
    "gae": _gae,
    "reinforce": _reinforce,
    "reinforce_pp": _reinforce_pp,
    "reinforce_pp_baseline": _reinforce_pp_baseline,
    "rloo": _group("rloo"),
    "grpo": _group("grpo"),
    "dr_grpo": _group("dr_grpo"),
    "remax": _with_baseline,
    "running_mean": _with_baseline,
}
assert tuple(_ESTIMATORS) == ADVANTAGE_ESTIMATORS


def check_estimator(estimator: str, *, batch_size: int, group_size: int) -> None:
    """Static validation of an estimator choice; raises ValueError naming the setting."""
    if estimator not in _ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; known: {ADVANTAGE_ESTIMATORS}")
    if estimator in GROUPED_ESTIMATORS:
        check_group_size(batch_size, group_size, estimator)


def compute_advantages(
    rewards_BT: Array,
    mask_BT: Array,
    *,
    estimator: str,
    values_BT: Array | None = None,
    baseline_B: Array | None = None,
    gamma: ArrayLike = 1.0,
    lam: ArrayLike = 1.0,
    group_size: int = 1,
    eps: ArrayLike = 1e-6,
) -> tuple[Array, Array]:
    """Advantages of a rollout by the named estimator (one of `ADVANTAGE_ESTIMATORS`).

    "gae" and "reinforce*" work on the per-token rewards; the outcome estimators ("rloo",
    "grpo", "dr_grpo", "remax", "running_mean") compare each row's total reward (the score,
    minus the summed KL penalty if it was folded in) and give every token of the row the same
    advantage. Advantage whitening beyond what an estimator defines (REINFORCE++'s global
    normalisation) is the caller's separate switch (`ops.masked_whiten`).

    Args:
      rewards_BT: per-token rewards from `token_rewards`.
      mask_BT: completion mask (contiguous prefix of each row).
      estimator: static name.
      values_BT: critic values, required by "gae".
      baseline_B: required by "remax" (the greedy completion's score) and "running_mean" (the
        baseline before this batch's update, broadcast to [B]).
      gamma: discount (traceable).
      lam: GAE lambda (traceable).
      group_size: samples per prompt k (static), for the grouped estimators.
      eps: std epsilon of "grpo" (traceable).

    Returns:
      `(advantages_BT, returns_BT)`, float32, 0 where the mask is 0. `returns_BT` is the
      critic target for "gae" and the reward-to-go otherwise (a diagnostic).

    Raises:
      ValueError: unknown estimator, a missing input it needs, or a bad group size.
    """
    check_estimator(estimator, batch_size=jnp.shape(rewards_BT)[0], group_size=group_size)
    if estimator == "gae" and values_BT is None:
        raise ValueError("estimator='gae' needs values_BT (a critic)")
    if estimator in BASELINE_ESTIMATORS and baseline_B is None:
        raise ValueError(f"estimator={estimator!r} needs baseline_B")
    rewards, m = _masked(rewards_BT, mask_BT)
    x = AdvantageInputs(
        rewards=rewards,
        mask=m,
        values=values_BT,
        baseline=baseline_B,
        gamma=_f32(gamma),
        lam=_f32(lam),
        eps=_f32(eps),
        group_size=group_size,
    )
    return _ESTIMATORS[estimator](x)
