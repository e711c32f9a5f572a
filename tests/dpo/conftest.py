"""Fixtures of the DPO tests: on-disk data (a small reviews task, preference Parquet files made
from it, and a short SFT run) built once per test session and shared by the xdist workers
through a file lock. The other helpers live in dpo_helpers.py (a unique module name, so the
tests never import another folder's conftest by mistake)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import gin
import pytest
from dpo_helpers import write_review_preferences
from support import file_lock, xdist_shared_dir


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A directory shared by all xdist workers of this session."""
    return xdist_shared_dir(tmp_path_factory, "dpo_shared")


@pytest.fixture(scope="session")
def reviews(shared_dir):
    """(task, preference folder, number of pairs) for a 3000-text reviews task."""
    from rlhf_jax.data.tasks.reviews import build_reviews_task

    with file_lock(shared_dir / "reviews.lock"):
        task = build_reviews_task(shared_dir / "reviews", num_texts=3000, num_prompts=32,
                                  num_eval_prompts=16)  # fmt: skip
        path = shared_dir / "preferences"
        meta = shared_dir / "prefs.json"
        if not meta.exists():
            n = write_review_preferences(list(task.corpus()["train"]["text"]), path)
            meta.write_text(json.dumps({"pairs": n}))
        return task, path, json.loads(meta.read_text())["pairs"]


def _sft_data(task, batch_size: int, seed: int):
    from rlhf_jax.data.pipeline import make_sft_iterator
    from rlhf_jax.train.sft import SFTData

    train, ev, tok = make_sft_iterator(task=task, batch_size=batch_size, seed=seed,
                                       buckets=(48,))  # fmt: skip
    return SFTData(train=train, eval=lambda: ev, vocab_size=tok.vocab_size, seq_len=48,
                   tokenizer_path=tok.path)  # fmt: skip


@pytest.fixture(scope="session")
def sft_run(shared_dir, reviews) -> Path:
    """A 4-step SFT run of the tiny model on the reviews corpus (the DPO starting point)."""
    from rlhf_jax.train.sft import sft_stage

    task = reviews[0]
    run = shared_dir / "sft"
    with file_lock(shared_dir / "sft.lock"):
        if not (run / "summary.json").exists():
            gin.clear_config()
            gin.parse_config(
                [
                    "model_config.preset = 'tiny'",
                    "model_config.max_seq_len = 64",
                    "LoopConfig.train_steps = 4",
                    "LoopConfig.eval_batches = 1",
                    "LoopConfig.progress_bar = False",
                    "LoopConfig.tensorboard = False",
                    "LoopConfig.async_checkpointing = False",
                    "make_optimizer.learning_rate = 3e-3",
                ]
            )
            sft_stage(run_dir=str(run), data=functools.partial(_sft_data, task), batch_size=32)
            gin.clear_config()
    return run
