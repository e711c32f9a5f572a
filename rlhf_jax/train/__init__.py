"""rlhf_jax.train."""
