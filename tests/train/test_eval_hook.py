"""The host-side evaluation hook on the tiny model: at every eval it samples from the policy
being trained, scores the samples with the judges, logs their means under eval/samples/ and
appends the rows (step, prompt, completion, one field per judge) to RUN_DIR/samples.jsonl."""

from __future__ import annotations

import functools
import json

import gin
import numpy as np

from rlhf_jax.train.eval_hook import SAMPLES_FILE, SampleEval
from rlhf_jax.train.metrics import read_metrics
from rlhf_jax.train.sft import sft_stage

PROMPTS = ["The food", "Our waiter"]


def _sft_data(task, batch_size: int, seed: int):
    from rlhf_jax.data.pipeline import make_sft_iterator
    from rlhf_jax.train.stage import StageData

    train, ev, tok = make_sft_iterator(task=task, batch_size=batch_size, seed=seed, buckets=(48,))
    return StageData(train, ev, tok.vocab_size, 48, tok.path)


def test_sample_eval_hook_writes_samples_and_logs_judges(reviews, tmp_path):
    task = reviews[0]
    loop = ("train_steps = 2", "eval_every = 1", "eval_batches = 1", "progress_bar = False",
            "tensorboard = False", "async_checkpointing = False")  # fmt: skip
    gin.parse_config(["model_config.preset = 'tiny'", "model_config.max_seq_len = 64",
                      *(f"LoopConfig.{b}" for b in loop)])  # fmt: skip
    judges = {"chars": lambda texts: [len(t) for t in texts],
              "has_good": lambda texts: ["good" in t for t in texts]}  # fmt: skip
    hook = SampleEval(prompts=PROMPTS, judges=judges, max_new_tokens=6, num_samples=2)
    run = tmp_path / "run"
    sft_stage(run_dir=str(run), data=functools.partial(_sft_data, task), batch_size=16,
              eval_hook=hook)  # fmt: skip
    rows = [json.loads(line) for line in (run / SAMPLES_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 4 + [2] * 4  # 2 prompts x 2 samples per eval
    assert [r["prompt"] for r in rows[:4]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    for r in rows:
        assert set(r) == {"step", "prompt", "completion", "length", "logprob", "chars", "has_good"}
        assert r["chars"] >= len(r["prompt"]) and r["has_good"] in (0.0, 1.0)
        assert 1 <= r["length"] <= 6
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    for rec, step in zip(records, (1, 2), strict=True):
        mine = [r for r in rows if r["step"] == step]
        np.testing.assert_allclose(rec["eval/samples/chars"], np.mean([r["chars"] for r in mine]))
        assert rec["eval/samples/samples"] == 4 and np.isfinite(rec["eval/loss"])
