"""Helpers for the runtime tests: a tiny synthetic SFT config and CLI subprocesses, which share
the session's persistent compilation cache (tests/conftest.py) through the environment."""

import os
import subprocess
import sys
from pathlib import Path

import gin

from rlhf_jax import commands

REPO = Path(__file__).resolve().parents[2]

# A 1-layer model on 16-token synthetic rows: every run compiles in seconds.
TINY_SFT_GIN = """
include 'gin/algorithms/sft.gin'
SFT_DATA = @synthetic_sft_data
synthetic_sft_data.seq_len = 16
synthetic_sft_data.vocab_size = 48
synthetic_sft_data.eval_rows = 20
model_config.preset = 'tiny'
model_config.d_model = 32
model_config.n_layers = 1
model_config.n_heads = 2
model_config.d_ff = 64
model_config.max_seq_len = 16
MESH_SHAPE = (2, 2, 2)
BATCH_SIZE = 8
LEARNING_RATE = 1e-2
LR_SCHEDULE = 'constant'
LOG_EVERY = 2
EVAL_EVERY = 4
CHECKPOINT_EVERY = 4
LOGITS_CHUNK_SIZE = 8
LoopConfig.progress_bar = False
"""


def bind_tiny_sft(run_dir, steps: int, extra: str = "") -> None:
    """Parses the tiny SFT config in this process (gin is cleared by the root conftest)."""
    commands.import_configurables()
    gin.add_config_file_search_path(str(REPO))
    gin.parse_config(TINY_SFT_GIN + f"\nRUN_DIR = '{run_dir}'\nTRAIN_STEPS = {steps}\n" + extra)


def run_tiny_sft(run_dir, steps: int, extra: str = ""):
    """One in-process run of the tiny SFT config through `train.stage`."""
    bind_tiny_sft(run_dir, steps, extra)
    return commands.train_command()


def cli_env() -> dict:
    env = dict(os.environ)
    if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["RLHF_JAX_TEST_COMPILE_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def run_cli(tmp_path, run_dir, steps: int, *bindings: str, timeout: float = 120):
    """`rlhf-jax train` on the tiny SFT config in a subprocess; returns CompletedProcess."""
    gin_file = tmp_path / "tiny_sft.gin"
    gin_file.write_text(TINY_SFT_GIN)
    argv = [
        sys.executable,
        "-c",
        # Not `-m rlhf_jax.cli`: that registers the gin configurable `train` twice.
        "import sys; from rlhf_jax.cli import main; sys.exit(main())",
        "train",
        "--gin_file",
        str(gin_file),
        f"--gin.RUN_DIR='{run_dir}'",
        f"--gin.TRAIN_STEPS={steps}",
        *[f"--gin.{b}" for b in bindings],
    ]
    return subprocess.run(
        argv, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
