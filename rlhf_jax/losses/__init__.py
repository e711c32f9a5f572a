"""rlhf_jax.losses."""
