"""Reward-model losses and calibration metrics.

This module owns the Bradley-Terry pairwise loss used to train scalar reward models (with
margin, label smoothing and reward centering) and the expected calibration error of the
preference probabilities such a model predicts. Every continuous hyperparameter is an ordinary
array argument, so sweeps over them compile once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def bradley_terry_loss(
    rewards_chosen_B: Array,
    rewards_rejected_B: Array,
    *,
    margin_B: Array | None = None,
    label_smoothing: ArrayLike = 0.0,
    center_coef: ArrayLike = 0.0,
) -> tuple[Array, dict[str, Array]]:
    """Per-pair Bradley-Terry loss for a scalar reward model.

    With d = r_c - r_r - margin and smoothing eps:

        loss = (1 - eps) * -log sigmoid(d) + eps * -log sigmoid(-d) + c * (r_c + r_r)^2

    The first term is the Bradley-Terry negative log-likelihood (Bradley & Terry 1952; as used
    for RLHF reward models by Ouyang et al. 2022, Eq. 1). The margin term follows Llama 2
    (Touvron et al. 2023, Eq. 2). Label smoothing treats each label as flipped with probability
    eps. The centering term c * (r_c + r_r)^2 is the auxiliary loss of Eisenstein et al. 2023,
    "Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking"
    (Sec. 3), which pins the reward's offset (otherwise unidentified) near zero. Both smoothing
    terms are always computed so that `label_smoothing` and `center_coef` can be traced.

    Args:
      rewards_chosen_B: rewards of the preferred completions.
      rewards_rejected_B: rewards of the dispreferred completions.
      margin_B: optional required reward gap per pair (e.g. from preference strength).
      label_smoothing: eps in [0, 0.5); scalar, may be traced.
      center_coef: weight of the reward-centering term; scalar, may be traced.

    Returns:
      `(loss_B, metrics)`; `metrics` holds scalar means: `loss`, `accuracy` (r_c > r_r),
      `margin` (r_c - r_r), `rewards/chosen`, `rewards/rejected`, `rewards/mean` and
      `rewards/std` (over chosen and rejected together).
    """
    r_c = jnp.asarray(rewards_chosen_B, jnp.float32)
    r_r = jnp.asarray(rewards_rejected_B, jnp.float32)
    diff_B = r_c - r_r
    d_B = diff_B if margin_B is None else diff_B - jnp.asarray(margin_B, jnp.float32)
    eps = jnp.asarray(label_smoothing, jnp.float32)
    loss_B = -(1.0 - eps) * jax.nn.log_sigmoid(d_B) - eps * jax.nn.log_sigmoid(-d_B)
    loss_B = loss_B + jnp.asarray(center_coef, jnp.float32) * jnp.square(r_c + r_r)

    sg = jax.lax.stop_gradient
    all_rewards = sg(jnp.concatenate([r_c, r_r]))
    metrics = {
        "loss": sg(jnp.mean(loss_B)),
        "accuracy": jnp.mean((sg(diff_B) > 0).astype(jnp.float32)),
        "margin": sg(jnp.mean(diff_B)),
        "rewards/chosen": sg(jnp.mean(r_c)),
        "rewards/rejected": sg(jnp.mean(r_r)),
        "rewards/mean": jnp.mean(all_rewards),
        "rewards/std": jnp.std(all_rewards),
    }
    return loss_B, metrics


def expected_calibration_error(probs_B: Array, labels_B: Array, num_bins: int = 10) -> Array:
    """Expected calibration error of predicted probabilities of the positive label.

    Predictions are placed in `num_bins` equal-width bins over [0, 1] (p = 1 goes in the last
    bin); ECE = sum_b (n_b / N) * |mean(label in b) - mean(p in b)| (Naeini et al. 2015;
    Guo et al. 2017, Eq. 3). For a reward model, pass p = sigmoid(r_c - r_r) with label 1 when
    the pair's order is correct (all ones for a held-out preference set, or gold-judge labels).

    Args:
      probs_B: predicted probabilities in [0, 1].
      labels_B: 0/1 outcomes (soft labels in [0, 1] also work).
      num_bins: static number of bins.

    Returns:
      Scalar ECE in [0, 1] (float32).
    """
    p_B = jnp.asarray(probs_B, jnp.float32)
    y_B = jnp.asarray(labels_B, jnp.float32)
    bin_B = jnp.clip(jnp.floor(p_B * num_bins).astype(jnp.int32), 0, num_bins - 1)
    counts_K = jax.ops.segment_sum(jnp.ones_like(p_B), bin_B, num_segments=num_bins)
    prob_sums_K = jax.ops.segment_sum(p_B, bin_B, num_segments=num_bins)
    label_sums_K = jax.ops.segment_sum(y_B, bin_B, num_segments=num_bins)
    # n_b/N * |acc_b - conf_b| = |label_sum_b - prob_sum_b| / N; empty bins contribute 0.
    return jnp.sum(jnp.abs(label_sums_K - prob_sums_K)) / jnp.maximum(jnp.sum(counts_K), 1.0)
