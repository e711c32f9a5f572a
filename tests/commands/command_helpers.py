"""Helpers of the command tests: in-process CLI runs on a fresh gin config, and the settings of
the tiny SFT policy the tests sample from.
"""

from pathlib import Path

import gin

from rlhf_jax import cli

REPO = Path(__file__).resolve().parents[2]
NUM_TEXTS = 2000

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
