"""The DPO family of offline preference losses, behind one function.

This module owns `preference_loss`, which maps summed completion log-probs of a policy (and of
a frozen reference, where the method uses one) to a per-pair loss and a metrics dict. Each loss
type is a small pure function registered by name in `_LOSSES`; `loss_type` (a name or a tuple of
names for a weighted sum, as in MPO) is static, and every continuous hyperparameter (beta,
label smoothing, gamma, tau, lambda, weights, eps, delta) is an ordinary array argument that can
be traced, so a sweep compiles once and a population can be `vmap`ped over hyperparameters.

Notation in the comments: c, r are the chosen / rejected log-ratios
log pi(y|x) - log ref(y|x) summed over completion tokens; d = c - r; |y| is a completion's
token count; avg(y) = log pi(y|x) / |y|; sigma is the logistic function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

PREFERENCE_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "simpo",
    "orpo",
)
REFERENCE_FREE_TYPES: tuple[str, ...] = ("simpo", "orpo")
LENGTH_NORMALISED_TYPES: tuple[str, ...] = ("ipo", "sigmoid_norm", "simpo", "orpo")

# exo_pair needs a strictly positive target smoothing (it takes log eps); like TRL we substitute
# this value when label_smoothing is 0, via jnp.where so label_smoothing stays traceable.
_EXO_DEFAULT_EPS = 1e-3


class _Inputs(NamedTuple):
    """Per-pair quantities shared by the loss functions (float32; None where unavailable)."""

    chosen_logps: Array
    rejected_logps: Array
    ref_chosen_logps: Array | None
    ref_rejected_logps: Array | None
    chosen_logratios: Array | None  # c
    rejected_logratios: Array | None  # r
    chosen_lengths: Array | None  # |y_w|, clamped to >= 1
    rejected_lengths: Array | None  # |y_l|, clamped to >= 1


class _HParams(NamedTuple):
    """Continuous hyperparameters, all float32 arrays (possibly traced)."""

    beta: Array
    label_smoothing: Array
    gamma: Array
    tau: Array
    orpo_lambda: Array
    bco_delta: Array
    robust_eps: Array


def _smoothed_logistic(z: Array, eps: Array) -> Array:
    """(1 - eps) * -log sigma(z) + eps * -log sigma(-z): logistic loss with flipped-label noise."""
    return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012); x is clamped below 0."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _avg_logps(x: _Inputs) -> tuple[Array, Array]:
    return x.chosen_logps / x.chosen_lengths, x.rejected_logps / x.rejected_lengths


def _sigmoid(x: _Inputs, h: _HParams) -> Array:
    # DPO: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:
    # -log sigma(beta * d). With label smoothing eps this is conservative DPO (Mitchell 2023,
    # "A note on DPO with noisy preferences & relationship to IPO"):
    # (1 - eps) * -log sigma(beta d) + eps * -log sigma(-beta d).
    d = x.chosen_logratios - x.rejected_logratios
    return _smoothed_logistic(h.beta * d, h.label_smoothing)


def _robust(x: _Inputs, h: _HParams) -> Array:
    # rDPO: Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    # Feedback", Sec. 3 (the de-biased loss for labels flipped with probability eps):
    # [(1 - eps) * -log sigma(beta d) - eps * -log sigma(-beta d)] / (1 - 2 eps).
    d = x.chosen_logratios - x.rejected_logratios
    eps = h.robust_eps
    clean = -jax.nn.log_sigmoid(h.beta * d)
    flipped = -jax.nn.log_sigmoid(-h.beta * d)
    return ((1.0 - eps) * clean - eps * flipped) / (1.0 - 2.0 * eps)


def _hinge(x: _Inputs, h: _HParams) -> Array:
    # SLiC-HF: Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    # rank-calibration hinge loss, with the ref-model log-ratio as in TRL: max(0, 1 - beta d).
    d = x.chosen_logratios - x.rejected_logratios
    return jax.nn.relu(1.0 - h.beta * d)


def _ipo(x: _Inputs, h: _HParams) -> Array:
    # IPO: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    # Preferences", Eq. 17, with beta playing tau: (d_avg - 1 / (2 beta))^2. As in TRL, the
    # log-ratios are divided by completion length (d_avg = c/|y_w| - r/|y_l|) so the squared
    # loss does not scale with length.
    d_avg = x.chosen_logratios / x.chosen_lengths - x.rejected_logratios / x.rejected_lengths
    return jnp.square(d_avg - 1.0 / (2.0 * h.beta))


def _exo_pair(x: _Inputs, h: _HParams) -> Array:
    # EXO: Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment",
    # Eq. 16 with K = 2: KL(p_theta || p_target) over {chosen, rejected}, where
    # p_theta = softmax(beta * (c, r)) and p_target = (1 - eps, eps):
    # sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps), z = beta d.
    d = x.chosen_logratios - x.rejected_logratios
    eps = jnp.where(h.label_smoothing > 0, h.label_smoothing, _EXO_DEFAULT_EPS)
    z = h.beta * d
    return jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-eps)) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - jnp.log(eps)
    )


def _nca_pair(x: _Inputs, h: _HParams) -> Array:
    # NCA: Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit
    # Rewards", pairwise NCA loss:
    # -log sigma(beta c) - 0.5 log sigma(-beta c) - 0.5 log sigma(-beta r).
    zc = h.beta * x.chosen_logratios
    zr = h.beta * x.rejected_logratios
    return -jax.nn.log_sigmoid(zc) - 0.5 * jax.nn.log_sigmoid(-zc) - 0.5 * jax.nn.log_sigmoid(-zr)


def _bco_pair(x: _Inputs, h: _HParams) -> Array:
    # BCO: Jung et al. 2024, "Binary Classifier Optimization for Large Language Model
    # Alignment", reward-shifted binary cross-entropy applied to a pair:
    # -log sigma(beta c - delta) - log sigma(-(beta r - delta)).
    # The paper's delta is a running mean of the implicit rewards (TRL keeps it as trainer
    # state); here it is the traced argument `bco_delta` so the step that owns that state
    # passes it in. delta = 0 gives the shift-free form.
    zc = h.beta * x.chosen_logratios - h.bco_delta
    zr = h.beta * x.rejected_logratios - h.bco_delta
    return -jax.nn.log_sigmoid(zc) - jax.nn.log_sigmoid(-zr)


def _sppo_hard(x: _Inputs, h: _HParams) -> Array:
    # SPPO: Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    # Eq. 4.7 of Algorithm 1 with the hard win probability P = 1 (chosen) / 0 (rejected):
    # (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2.
    half_inv_beta = 0.5 / h.beta
    return jnp.square(x.chosen_logratios - half_inv_beta) + jnp.square(
        x.rejected_logratios + half_inv_beta
    )


def _aot(x: _Inputs, h: _HParams) -> Array:
    # AOT (paired): Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via
    # Optimal Transport". First-order stochastic dominance of the policy's chosen-minus-rejected
    # log-prob gap over the reference's, enforced by matching sorted samples (1-D optimal
    # transport): z_i = beta * (sort(pi_c - pi_r)_i - sort(ref_c - ref_r)_i), smoothed logistic.
    # The loss couples the whole batch: entry i belongs to the i-th quantile, not to pair i.
    policy_gap = jnp.sort(x.chosen_logps - x.rejected_logps, axis=0)
    ref_gap = jnp.sort(x.ref_chosen_logps - x.ref_rejected_logps, axis=0)
    return _smoothed_logistic(h.beta * (policy_gap - ref_gap), h.label_smoothing)


def _aot_unpaired(x: _Inputs, h: _HParams) -> Array:
    # AOT (unpaired): Melnyk et al. 2024, as above, but chosen log-ratios must dominate rejected
    # ones as distributions: z_i = beta * (sort(c)_i - sort(r)_i). Couples the whole batch.
    gap = jnp.sort(x.chosen_logratios, axis=0) - jnp.sort(x.rejected_logratios, axis=0)
    return _smoothed_logistic(h.beta * gap, h.label_smoothing)


def _apo_zero(x: _Inputs, h: _HParams) -> Array:
    # APO-zero: D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
    # Revisions", Eq. 7 (raise chosen, lower rejected): (1 - sigma(beta c)) + sigma(beta r).
    return (1.0 - jax.nn.sigmoid(h.beta * x.chosen_logratios)) + jax.nn.sigmoid(
        h.beta * x.rejected_logratios
    )


def _apo_down(x: _Inputs, h: _HParams) -> Array:
    # APO-down: D'Oosterlinck et al. 2024, Eq. 8 (lower both, rejected more):
    # sigma(beta c) + (1 - sigma(beta d)).
    d = x.chosen_logratios - x.rejected_logratios
    return jax.nn.sigmoid(h.beta * x.chosen_logratios) + (1.0 - jax.nn.sigmoid(h.beta * d))


def _discopop(x: _Inputs, h: _HParams) -> Array:
    # DiscoPOP (log-ratio modulated loss): Chan et al. 2024, "Discovering Preference
    # Optimization Algorithms with and for Large Language Models", Eq. 5:
    # with z = beta d and m = sigma(z / tau): (1 - m) * -log sigma(z) + m * exp(-z).
    z = h.beta * (x.chosen_logratios - x.rejected_logratios)
    m = jax.nn.sigmoid(z / h.tau)
    return (1.0 - m) * -jax.nn.log_sigmoid(z) + m * jnp.exp(-z)


def _sigmoid_norm(x: _Inputs, h: _HParams) -> Array:
    # Length-normalised DPO: the DPO / cDPO loss (Rafailov et al. 2023, Eq. 7) on per-token
    # log-ratios, d_avg = c/|y_w| - r/|y_l|, removing DPO's bias towards long completions.
    d_avg = x.chosen_logratios / x.chosen_lengths - x.rejected_logratios / x.rejected_lengths
    return _smoothed_logistic(h.beta * d_avg, h.label_smoothing)


def _simpo(x: _Inputs, h: _HParams) -> Array:
    # SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    # Reward", Eq. 6: -log sigma(beta avg(y_w) - beta avg(y_l) - gamma). Reference-free; label
    # smoothing adds the flipped-label term as in TRL's CPO trainer.
    avg_c, avg_r = _avg_logps(x)
    return _smoothed_logistic(h.beta * (avg_c - avg_r) - h.gamma, h.label_smoothing)


def _orpo_log_odds_ratio(x: _Inputs) -> Array:
    """log odds(y_w) - log odds(y_l), odds(y) = P(y) / (1 - P(y)), P(y) = exp(avg(y))."""
    avg_c, avg_r = _avg_logps(x)
    return (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))


def _orpo(x: _Inputs, h: _HParams) -> Array:
    # ORPO: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
    # Model", Eqs. 6-7: L_SFT + lambda * L_OR, with L_SFT = -avg(y_w) (per-token NLL of the
    # chosen completion) and L_OR = -log sigma(log odds(y_w) - log odds(y_l)). Reference-free;
    # beta is not used by the loss (only by the logged implicit rewards).
    avg_c, _ = _avg_logps(x)
    return -avg_c - h.orpo_lambda * jax.nn.log_sigmoid(_orpo_log_odds_ratio(x))


_LOSSES: dict[str, Callable[[_Inputs, _HParams], Array]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm,
    "simpo": _simpo,
    "orpo": _orpo,
}
assert tuple(_LOSSES) == PREFERENCE_LOSS_TYPES


def _f32(x: ArrayLike | None) -> Array | None:
    return None if x is None else jnp.asarray(x, jnp.float32)


def preference_loss(
    policy_chosen_logps_B: Array,
    policy_rejected_logps_B: Array,
    ref_chosen_logps_B: Array | None = None,
    ref_rejected_logps_B: Array | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[ArrayLike] | Array | None = None,
    beta: ArrayLike = 0.1,
    label_smoothing: ArrayLike = 0.0,
    chosen_lengths_B: Array | None = None,
    rejected_lengths_B: Array | None = None,
    gamma: ArrayLike = 0.5,
    tau: ArrayLike = 0.05,
    orpo_lambda: ArrayLike = 0.1,
    rpo_alpha: ArrayLike | None = None,
    bco_delta: ArrayLike = 0.0,
    robust_eps: ArrayLike | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-pair loss of one DPO-family method, or a weighted sum of several.

    Args:
      policy_chosen_logps_B: policy log-probs of the chosen completions, summed over tokens.
      policy_rejected_logps_B: same for the rejected completions.
      ref_chosen_logps_B: reference-model summed log-probs of the chosen completions; None is
        allowed only when every loss type is reference-free (`REFERENCE_FREE_TYPES`).
      ref_rejected_logps_B: same for the rejected completions.
      loss_type: static name from `PREFERENCE_LOSS_TYPES`, or a tuple of names whose losses are
        summed with `loss_weights` (MPO, Wang et al. 2024, "Enhancing the Reasoning Ability of
        Multimodal Large Language Models via Mixed Preference Optimization").
      loss_weights: one weight per loss type (traceable); default 1 each.
      beta: inverse temperature / KL strength (traceable). For `ipo` and `sppo_hard` it sets the
        target gap 1/(2 beta); for `orpo` it only scales the logged rewards.
      label_smoothing: probability eps that a label is flipped (traceable). Used by `sigmoid`
        (cDPO), `sigmoid_norm`, `aot`, `aot_unpaired`, `simpo`; by `robust` unless `robust_eps`
        is given; by `exo_pair` as its target smoothing (0 means 1e-3, as in TRL).
      chosen_lengths_B: chosen completion token counts; required by `LENGTH_NORMALISED_TYPES`
        and by `rpo_alpha`. Clamped to >= 1.
      rejected_lengths_B: same for the rejected completions.
      gamma: SimPO target reward margin (traceable).
      tau: DiscoPOP modulation temperature (traceable).
      orpo_lambda: ORPO weight lambda of the odds-ratio term (traceable).
      rpo_alpha: if given, adds rpo_alpha * (-chosen_logps / chosen_lengths), the per-token NLL
        of the chosen completion, to the total (RPO: Pang et al. 2024, "Iterative Reasoning
        Preference Optimization", Sec. 2). Whether it is None is static; its value traceable.
      bco_delta: reward shift delta of `bco_pair` (traceable), normally a running mean of the
        implicit rewards kept by the caller.
      robust_eps: label-noise rate of `robust` (traceable); defaults to `label_smoothing`.

    Returns:
      `(loss_B, metrics)`. `loss_B` is the weighted per-pair loss (for `aot*` entry i is the i-th
      quantile, not pair i). `metrics` holds scalar means: `loss`, `rewards/chosen`,
      `rewards/rejected`, `rewards/margins`, `rewards/accuracies` (implicit rewards
      beta * (log pi - log ref) summed, or beta * avg log pi when every type is reference-free),
      `logps/chosen`, `logps/rejected`, `kl/implicit` (mean summed policy-minus-reference
      log-ratio over chosen and rejected; only when references are given), `loss/<type>` per
      component when several types are combined, `orpo/log_odds_ratio` and `orpo/nll` for
      `orpo`, and `rpo/nll` when `rpo_alpha` is given.

    Raises:
      ValueError: unknown loss type, mismatched weights, missing reference log-probs for a type
        that needs them, or missing lengths for a length-normalised type.
    """
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    unknown = [t for t in types if t not in _LOSSES]
    if unknown:
        raise ValueError(
            f"Unknown preference loss type(s) {unknown}; known: {PREFERENCE_LOSS_TYPES}"
        )
    if loss_weights is not None and len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights has {len(loss_weights)} entries for {len(types)} loss types {types}"
        )
    if (ref_chosen_logps_B is None) != (ref_rejected_logps_B is None):
        raise ValueError("Pass both ref_chosen_logps_B and ref_rejected_logps_B, or neither")
    has_ref = ref_chosen_logps_B is not None
    needs_ref = [t for t in types if t not in REFERENCE_FREE_TYPES]
    if needs_ref and not has_ref:
        raise ValueError(
            f"Loss type(s) {needs_ref} need reference log-probs (ref_chosen_logps_B, "
            f"ref_rejected_logps_B), got None; reference-free types are {REFERENCE_FREE_TYPES}"
        )
    if (chosen_lengths_B is None) != (rejected_lengths_B is None):
        raise ValueError("Pass both chosen_lengths_B and rejected_lengths_B, or neither")
    has_len = chosen_lengths_B is not None
    needs_len = [t for t in types if t in LENGTH_NORMALISED_TYPES]
    if rpo_alpha is not None:
        needs_len.append("rpo_alpha")
    if needs_len and not has_len:
        raise ValueError(
            f"{needs_len} normalise by completion length: pass chosen_lengths_B and "
            "rejected_lengths_B (completion token counts)"
        )

    chosen = _f32(policy_chosen_logps_B)
    rejected = _f32(policy_rejected_logps_B)
    ref_chosen = _f32(ref_chosen_logps_B)
    ref_rejected = _f32(ref_rejected_logps_B)
    x = _Inputs(
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_logratios=chosen - ref_chosen if has_ref else None,
        rejected_logratios=rejected - ref_rejected if has_ref else None,
        chosen_lengths=jnp.maximum(_f32(chosen_lengths_B), 1.0) if has_len else None,
        rejected_lengths=jnp.maximum(_f32(rejected_lengths_B), 1.0) if has_len else None,
    )
    h = _HParams(
        beta=_f32(beta),
        label_smoothing=_f32(label_smoothing),
        gamma=_f32(gamma),
        tau=_f32(tau),
        orpo_lambda=_f32(orpo_lambda),
        bco_delta=_f32(bco_delta),
        robust_eps=_f32(label_smoothing if robust_eps is None else robust_eps),
    )

    sg = jax.lax.stop_gradient
    metrics: dict[str, Array] = {}
    loss_B = jnp.zeros_like(chosen)
    for k, name in enumerate(types):
        term_B = _LOSSES[name](x, h)
        if len(types) > 1:
            metrics[f"loss/{name}"] = sg(jnp.mean(term_B))
        weight = None if loss_weights is None else _f32(loss_weights[k])
        loss_B = loss_B + (term_B if weight is None else weight * term_B)
    if rpo_alpha is not None:
        nll_B = -chosen / x.chosen_lengths
        loss_B = loss_B + _f32(rpo_alpha) * nll_B
        metrics["rpo/nll"] = sg(jnp.mean(nll_B))

    # Implicit rewards: beta * log-ratio when a reference is in play; SimPO's beta * average
    # log-prob when every component is reference-free.
    if needs_ref:
        reward_c, reward_r = h.beta * x.chosen_logratios, h.beta * x.rejected_logratios
    else:
        avg_c, avg_r = _avg_logps(x)
        reward_c, reward_r = h.beta * avg_c, h.beta * avg_r
    reward_c, reward_r = sg(reward_c), sg(reward_r)
    metrics.update(
        {
            "loss": sg(jnp.mean(loss_B)),
            "rewards/chosen": jnp.mean(reward_c),
            "rewards/rejected": jnp.mean(reward_r),
            "rewards/margins": jnp.mean(reward_c - reward_r),
            "rewards/accuracies": jnp.mean((reward_c > reward_r).astype(jnp.float32)),
            "logps/chosen": sg(jnp.mean(chosen)),
            "logps/rejected": sg(jnp.mean(rejected)),
        }
    )
    if has_ref:
        log_ratios = jnp.concatenate([x.chosen_logratios, x.rejected_logratios])
        metrics["kl/implicit"] = sg(jnp.mean(log_ratios))
    if "orpo" in types:
        metrics["orpo/log_odds_ratio"] = sg(jnp.mean(_orpo_log_odds_ratio(x)))
        metrics["orpo/nll"] = sg(jnp.mean(-chosen / x.chosen_lengths))
    return loss_B, metrics
