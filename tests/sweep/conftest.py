"""Fixtures of the sweep tests: one tiny real DPO sweep per session (three points of four steps
on the tiny model, plus one point that fails), built on the session's reviews preference pairs
and short SFT run (tests/conftest.py: the DPO tests' fixtures, so a full run builds them
once)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from support import file_lock

REPO = Path(__file__).resolve().parents[2]
DPO_GIN = "gin/experiments/dpo_reviews_tiny.gin"

# Shared by every point: a 4-step run of the tiny DPO experiment.
TINY_BINDINGS = {
    "TRAIN_STEPS": 4,
    "BATCH_SIZE": 16,
    "BUCKETS": (48,),
    "LEARNING_RATE": 1e-3,
    "WARMUP_STEPS": 0,
    "LR_SCHEDULE": "constant",
    "LOG_EVERY": 1,
    "EVAL_EVERY": 2,
    "CHECKPOINT_EVERY": 2,
    "LoopConfig.eval_batches": 1,
    "LoopConfig.progress_bar": False,
    "LoopConfig.tensorboard": False,
    "LoopConfig.async_checkpointing": False,
}

GOOD = [{"BETA": 0.1, "SEED": 0}, {"BETA": 0.1, "SEED": 1}, {"BETA": 0.3, "SEED": 0}]
BAD = {"BETA": 0.1, "SEED": 0, "DPO_LOSS_TYPE": "no_such_loss"}


def tiny_sweep_spec(sft_run, prefs, ref_cache, points):
    """A `Sweep` of the tiny DPO experiment over `points`."""
    from rlhf_jax.sweep.spec import Sweep

    return Sweep(
        gin_files=[DPO_GIN],
        points=points,
        bindings={
            "SFT_RUN": str(sft_run),
            "PREFERENCES": str(prefs),
            "REF_CACHE_DIR": str(ref_cache),
            **TINY_BINDINGS,
        },
        name="tiny",
    )


def subprocess_env() -> None:
    """Points run in subprocesses that import this checkout, with 8 fake CPU devices."""
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), path) if p)


@pytest.fixture(scope="session")
def tiny_sweep(shared_dir, reviews, sft_run):
    """(sweep directory, Sweep, SweepResult or None if another worker ran it) of a real sweep:
    the three GOOD points, then BAD, one at a time (so each point's compile count is its own)."""
    from rlhf_jax.sweep.launch import run_sweep

    subprocess_env()
    _, prefs, _ = reviews
    out = shared_dir / "tiny_sweep"
    sweep = tiny_sweep_spec(sft_run, prefs, shared_dir / "sweep_ref_cache", [*GOOD, BAD])
    with file_lock(shared_dir / "tiny_sweep.lock"):
        result = None
        if not (out / "sweep.json").exists():
            result = run_sweep(sweep, out, parallel=1, stream=sys.stdout, poll_s=0.2)
    return out, sweep, result
