"""Helpers of the reward-model tests: preference data made from the reviews corpus with the gold
sentiment judge, random preference batches, a stand-in SFT run directory, and jitted steps."""

from __future__ import annotations

import json
from pathlib import Path

import algo_helpers
import jax
import numpy as np
import pandas as pd
from flax import nnx

from rlhf_jax import partitioning
from rlhf_jax.rundir import write_model_info
from rlhf_jax.steps.algorithm import HParams
from rlhf_jax.train import stages
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.optim import make_optimizer

VOCAB, SEQ = 64, 16
tiny_config = algo_helpers.tiny_config


def write_review_preferences(
    texts: list[str],
    out_dir: Path,
    *,
    temperature: float = 0.1,
    prompt_words: int = 2,
    eval_fraction: float = 0.1,
    seed: int = 0,
) -> dict:
    """Preference pairs in the `make-preferences` layout (train.parquet, eval.parquet).

    Texts sharing their first `prompt_words` words are paired; the shared words are the prompt
    and the rest of each text a completion. The gold score is the reviews task's sentiment
    judge (VADER) of the whole text; the label is drawn by Bradley-Terry sampling,
    P(a preferred) = sigmoid((g_a - g_b) / temperature), and `label_prob` is the probability of
    the label drawn. Prompts are split between train and eval.
    """
    from rlhf_jax.data.tasks import judges

    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    for t in texts:
        words = t.split()
        if len(words) > prompt_words + 2:
            groups.setdefault(" ".join(words[:prompt_words]), []).append(t)
    prompts = sorted(groups)
    eval_prompts = set(rng.permutation(len(prompts))[: max(1, int(eval_fraction * len(prompts)))])
    splits: dict[str, list[dict]] = {"train": [], "eval": []}
    for j, prompt in enumerate(prompts):
        group = groups[prompt]
        gold = judges.sentiment(group)
        for a, b in zip(range(0, len(group) - 1, 2), range(1, len(group), 2), strict=True):
            p_a = 1.0 / (1.0 + np.exp(-(gold[a] - gold[b]) / temperature))
            win, lose = (a, b) if rng.random() < p_a else (b, a)
            splits["eval" if j in eval_prompts else "train"].append(
                {
                    "prompt": prompt,
                    "chosen": group[win][len(prompt) :],
                    "rejected": group[lose][len(prompt) :],
                    "chosen_score": float(gold[win]),
                    "rejected_score": float(gold[lose]),
                    "label_prob": float(p_a if win == a else 1.0 - p_a),
                }
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        pd.DataFrame(rows).to_parquet(out_dir / f"{name}.parquet")
    all_rows = splits["train"] + splits["eval"]
    meta = {
        "train_pairs": len(splits["train"]),
        "eval_pairs": len(splits["eval"]),
        "label_gold_agreement": float(
            np.mean([r["chosen_score"] > r["rejected_score"] for r in all_rows])
        ),
        "ceiling": float(np.mean([max(r["label_prob"], 1 - r["label_prob"]) for r in all_rows])),
    }
    (out_dir / "preferences.json").write_text(json.dumps(meta, indent=2))
    return meta


def make_pair_batch(seed: int, rows: int = 8, seq: int = SEQ, vocab: int = VOCAB) -> dict:
    """`algo_helpers.make_pair_batch` at the reward tests' sequence length."""
    return algo_helpers.make_pair_batch(seed, rows=rows, seq=seq, vocab=vocab)


def write_sft_run(run_dir: Path, cfg, tokenizer_path: str | None, seed: int = 7) -> Path:
    """A policy run directory as the SFT stage leaves it: model.json and an orbax checkpoint of
    `Transformer` params (random, so every leaf is distinct)."""
    mesh, rules = partitioning.make_mesh(), partitioning.logical_rules()
    optimizer = make_optimizer(schedule="constant")
    factory, _ = stages.model_state_factory(cfg, optimizer, mesh, rules, seed=seed)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = factory.init()
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    ckpt.save(3, state, hparams=HParams.create(), rng=jax.random.key(0), meta={})
    ckpt.close()
    write_model_info(run_dir, cfg, tokenizer_path=tokenizer_path)
    return run_dir


RM_STEPS, RM_HEADS, RM_NAN_STEP = 24, 3, 5


def rm_cli_args(run: Path, prefs: Path, sft_run: Path) -> list[str]:
    """`rlhf-jax train` arguments of the test reward-model run (a NaN injected at step 5)."""
    return [
        "train",
        "--gin_file",
        "gin/experiments/reward_reviews_tiny.gin",
        f"--gin.RUN_DIR={run}",
        f"--gin.PREFERENCES={prefs}",
        f"--gin.SFT_RUN={sft_run}",
        f"--gin.TRAIN_STEPS={RM_STEPS}",
        f"--gin.NUM_HEADS={RM_HEADS}",
        "--gin.BATCH_SIZE=16",
        "--gin.EVAL_EVERY=0",
        "--gin.CHECKPOINT_EVERY=0",
        "--gin.BUCKETS=(48,)",
        f"--gin.reward_stage.debug_nan_step={RM_NAN_STEP}",
        "--gin.LoopConfig.progress_bar=False",
        "--gin.LoopConfig.async_checkpointing=False",
    ]
