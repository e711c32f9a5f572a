"""rlhf_jax.sweep."""
