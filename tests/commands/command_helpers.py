"""Helpers of the command tests: in-process CLI runs on a fresh gin config, and the settings of
the tiny SFT policy the tests sample from.

The persistent XLA compilation cache (the directory tests/train uses too) turns every compile
after the first, in this or a later session, into a load; results are unchanged.
"""

import os
import tempfile
from pathlib import Path

import gin
import jax

from rlhf_jax import cli

REPO = Path(__file__).resolve().parents[2]
NUM_TEXTS = 2000

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.setdefault(
        "RLHF_JAX_TEST_COMPILE_CACHE",
        os.path.join(tempfile.gettempdir(), "rlhf_jax_test_xla_cache"),
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The tiny experiment shrunk further: 3 steps of a 1-layer model take seconds on CPU.
SFT_BINDINGS = (
    "TRAIN_STEPS=3",
    "BATCH_SIZE=8",
    "EVAL_EVERY=0",
    "CHECKPOINT_EVERY=0",
    "pipeline_sft_data.baseline=False",
    f"REVIEWS_NUM_TEXTS={NUM_TEXTS}",
    "LoopConfig.progress_bar=False",
    "LoopConfig.tensorboard=False",
    "LoopConfig.eval_batches=1",
    "model_config.d_model=32",
    "model_config.n_layers=1",
    "model_config.n_heads=2",
    "model_config.d_ff=64",
    "model_config.max_seq_len=64",
)


def run_cli(*argv: str) -> int:
    """`rlhf-jax ARGV` in this process, on a fresh gin config (as a new process would have)."""
    gin.clear_config()
    try:
        return cli.main(list(argv))
    finally:
        gin.clear_config()
