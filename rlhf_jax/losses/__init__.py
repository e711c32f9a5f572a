"""rlhf_jax.losses: pure loss functions of arrays (log-probs, rewards, masks), by family."""

from rlhf_jax.losses.preference import (
    LENGTH_NORMALISED_TYPES,
    PREFERENCE_LOSS_TYPES,
    REFERENCE_FREE_TYPES,
    preference_loss,
)
from rlhf_jax.losses.reward import bradley_terry_loss, expected_calibration_error

# Policy-gradient losses (PPO / RLOO / GRPO, GAE) live in losses/policy.py and are exported
# here by the engineer who adds them.

__all__ = [
    "LENGTH_NORMALISED_TYPES",
    "PREFERENCE_LOSS_TYPES",
    "REFERENCE_FREE_TYPES",
    "bradley_terry_loss",
    "expected_calibration_error",
    "preference_loss",
]
