"""rlhf_jax.data.tasks."""
