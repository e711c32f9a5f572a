"""rlhf_jax.eval."""
