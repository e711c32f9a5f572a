"""rlhf_jax.steps."""
