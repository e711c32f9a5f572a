"""rlhf_jax.ops."""
