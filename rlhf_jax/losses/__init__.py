"""rlhf_jax.losses: pure loss functions of arrays (log-probs, rewards, masks), by family.

Modules: reward.py (Bradley-Terry and calibration), preference.py (the DPO family),
policy.py (PPO / GSPO / CISPO policy and value losses, loss aggregation), advantages.py (GAE
and the critic-free estimators, reward shaping), controllers.py (KL controller, running
reward statistics). Log-probs and KL estimators are `rlhf_jax.ops`.
"""

from rlhf_jax.losses.advantages import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ESTIMATORS,
    clip_rewards,
    compute_advantages,
    discounted_returns,
    ended_with_stop,
    gae,
    group_advantages,
    mask_truncated,
    missing_eos_penalty,
    token_rewards,
)
from rlhf_jax.losses.controllers import (
    KL_CONTROLLERS,
    KLControllerState,
    RunningMean,
    RunningMoments,
    normalize_with_moments,
    running_mean_update,
    update_kl_controller,
    update_moments,
)
from rlhf_jax.losses.policy import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSS_TYPES,
    RATIO_LEVELS,
    aggregate_loss,
    check_policy_choices,
    explained_variance,
    kl_loss_per_token,
    masked_entropy,
    policy_loss,
    value_loss,
)
from rlhf_jax.losses.preference import (
    LENGTH_NORMALISED_TYPES,
    PREFERENCE_LOSS_TYPES,
    REFERENCE_FREE_TYPES,
    preference_loss,
)
from rlhf_jax.losses.reward import bradley_terry_loss, expected_calibration_error

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "GROUP_ESTIMATORS",
    "KL_CONTROLLERS",
    "KL_ESTIMATORS",
    "LENGTH_NORMALISED_TYPES",
    "LOSS_AGG_MODES",
    "POLICY_LOSS_TYPES",
    "PREFERENCE_LOSS_TYPES",
    "RATIO_LEVELS",
    "REFERENCE_FREE_TYPES",
    "KLControllerState",
    "RunningMean",
    "RunningMoments",
    "aggregate_loss",
    "bradley_terry_loss",
    "check_policy_choices",
    "clip_rewards",
    "compute_advantages",
    "discounted_returns",
    "ended_with_stop",
    "expected_calibration_error",
    "explained_variance",
    "gae",
    "group_advantages",
    "kl_loss_per_token",
    "mask_truncated",
    "masked_entropy",
    "missing_eos_penalty",
    "normalize_with_moments",
    "policy_loss",
    "preference_loss",
    "running_mean_update",
    "token_rewards",
    "update_kl_controller",
    "update_moments",
    "value_loss",
]
