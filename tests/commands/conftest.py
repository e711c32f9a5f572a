"""Fixtures of the command tests: a small reviews task and a tiny SFT policy trained on it for a
few steps through `rlhf-jax train` (in-process), shared by the session's tests."""

from pathlib import Path

import pytest
from command_helpers import NUM_TEXTS, REPO, SFT_BINDINGS, run_cli

from rlhf_jax.data.tasks.reviews import ReviewsTask, build_reviews_task


@pytest.fixture(scope="session")
def reviews_task(tmp_path_factory) -> ReviewsTask:
    return build_reviews_task(tmp_path_factory.mktemp("reviews"), num_texts=NUM_TEXTS)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, reviews_task) -> Path:
    """A policy run directory: the SFT stage of gin/experiments/sft_reviews_tiny.gin."""
    run_dir = tmp_path_factory.mktemp("sft")
    code = run_cli(
        "train",
        "--gin_file",
        str(REPO / "gin/experiments/sft_reviews_tiny.gin"),
        f"--gin.RUN_DIR='{run_dir}'",
        f"--gin.REVIEWS_DIR='{reviews_task.out_dir}'",
        *(f"--gin.{b}" for b in SFT_BINDINGS),
    )
    assert code == 0
    assert (run_dir / "summary.json").exists()
    return run_dir
