"""Session fixtures of the reward-model tests, built once and shared by the xdist workers
through a file lock: a small reviews task, preference pairs made from it with the gold judge, a
stand-in SFT run, and one short reward-model run through the CLI and the experiment gin file."""

from __future__ import annotations

import json
from pathlib import Path

import gin
import pytest
from rm_helpers import (
    rm_cli_args,
    tiny_config,
    write_review_preferences,
    write_sft_run,
)
from support import file_lock, xdist_shared_dir


@pytest.fixture(scope="session")
def rm_shared(tmp_path_factory) -> Path:
    """A directory shared by all xdist workers of this session."""
    return xdist_shared_dir(tmp_path_factory, "reward_shared")


@pytest.fixture(scope="session")
def rm_task(rm_shared):
    """A 1500-text reviews task (corpus, tokenizer)."""
    from rlhf_jax.data.tasks.reviews import build_reviews_task

    with file_lock(rm_shared / "task.lock"):
        return build_reviews_task(
            rm_shared / "reviews", num_texts=1500, num_prompts=16, num_eval_prompts=8
        )


@pytest.fixture(scope="session")
def rm_prefs(rm_shared, rm_task) -> tuple[Path, dict]:
    """(folder with train.parquet / eval.parquet, its preferences.json)."""
    out = rm_shared / "prefs"
    with file_lock(rm_shared / "prefs.lock"):
        if not (out / "preferences.json").exists():
            write_review_preferences(list(rm_task.corpus()["train"]["text"]), out)
    return out, json.loads((out / "preferences.json").read_text())


@pytest.fixture(scope="session")
def rm_sft_run(rm_shared, rm_task) -> Path:
    """A policy run directory (model.json + checkpoint) with the task's tokenizer."""
    run = rm_shared / "sft"
    with file_lock(rm_shared / "sft.lock"):
        if not (run / "model.json").exists():
            cfg = tiny_config(vocab=rm_task.tokenizer().vocab_size, max_seq_len=64)
            write_sft_run(run, cfg, rm_task.tokenizer_path)
    return run


@pytest.fixture(scope="session")
def rm_run(rm_shared, rm_prefs, rm_sft_run) -> Path:
    """A finished reward-model run: `rlhf-jax train` on gin/experiments/reward_reviews_tiny.gin."""
    from rlhf_jax import cli

    run = rm_shared / "rm"
    with file_lock(rm_shared / "rm.lock"):
        if not (run / "summary.json").exists():
            gin.clear_config()
            code = cli.main(rm_cli_args(run, rm_prefs[0], rm_sft_run))
            gin.clear_config()
            assert code == 0
    return run
