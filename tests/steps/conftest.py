"""tests/steps: a persistent compilation cache, as in tests/train (same programs recur)."""

import os
import tempfile

import jax

CACHE_DIR = os.environ.setdefault(
    "RLHF_JAX_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "rlhf_jax_test_xla_cache")
)
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
