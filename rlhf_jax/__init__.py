"""rlhf_jax: a JAX-native RLHF research framework.

Stages (SFT, reward model, DPO family, PPO family) are pure, jitted, sharded steps driven by a
small host loop and configured with gin. See README.md and the design notes there.
"""

__version__ = "0.1.0"
