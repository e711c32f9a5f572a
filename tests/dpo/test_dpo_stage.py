"""The DPO stage end to end through the CLI and gin/experiments/dpo_reviews_tiny.gin, on a
preference file made from a small reviews corpus and a short SFT run: the reference cache is
written once and reused, a preempted run resumes to the same final metrics, a NaN step is
skipped, and the "params" reference mode starts exactly at the SFT policy."""

from __future__ import annotations

import json
import math

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp

from rlhf_jax import cli
from rlhf_jax.train import ref_cache
from rlhf_jax.train.metrics import read_metrics

COMPARED = ("train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/kl/implicit",
            "eval/loss", "eval/rewards/margins", "eval/rewards/accuracies", "eval/kl/implicit",
            "eval/lengths/chosen", "eval/lengths/rejected")  # fmt: skip


def _train(run_dir, sft_run, prefs, cache_dir, *extra: str) -> dict | None:
    gin.clear_config()
    argv = [
        "train",
        "--gin_file", "gin/experiments/dpo_reviews_tiny.gin",
        f"--gin.RUN_DIR={run_dir}",
        f"--gin.SFT_RUN={sft_run}",
        f"--gin.PREFERENCES={prefs}",
        f"--gin.REF_CACHE_DIR={cache_dir}",
        "--gin.TRAIN_STEPS=6",
        "--gin.BATCH_SIZE=16",
        "--gin.BUCKETS=(48,)",
        "--gin.LEARNING_RATE=1e-3",
        "--gin.WARMUP_STEPS=0",
        "--gin.LR_SCHEDULE='constant'",
        "--gin.LOG_EVERY=1",
        "--gin.EVAL_EVERY=0",
        "--gin.CHECKPOINT_EVERY=2",
        "--gin.LoopConfig.eval_batches=2",
        "--gin.LoopConfig.progress_bar=False",
        "--gin.LoopConfig.tensorboard=False",
        "--gin.LoopConfig.async_checkpointing=False",
        "--log_level=WARNING",
        *extra,
    ]  # fmt: skip
    assert cli.main(argv) == 0
    gin.clear_config()
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_cache_reuse_resume_and_nan_skip(sft_run, reviews, tmp_path, monkeypatch):
    _, prefs, _ = reviews
    cache = tmp_path / "ref_cache"
    calls = []
    real = ref_cache.compute_reference_logps

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return real(*args, **kwargs)

    monkeypatch.setattr(ref_cache, "compute_reference_logps", counting)
    nan = "--gin.dpo_stage.debug_nan_step=2"

    # A: uninterrupted; computes and caches the reference log-probs of both splits.
    a = _train(tmp_path / "a", sft_run, prefs, cache, nan)
    assert a["status"] == "done" and a["step"] == 6 and not a["ref_cache/hit"]
    assert len(calls) == 2 and len(list(cache.glob("*.npz"))) == 2
    # B: a second run of the sweep reads the cache, is preempted (SIGTERM) after step 3...
    preempt = ("--gin.LoopConfig.fault_signal='SIGTERM'", "--gin.LoopConfig.fault_signal_step=3")
    assert _train(tmp_path / "b", sft_run, prefs, cache, nan, *preempt) is None
    assert len(calls) == 2
    # ...and resumed from its checkpoint: the same final metrics as A.
    b = _train(tmp_path / "b", sft_run, prefs, cache, nan)
    assert b["ref_cache/hit"] and len(calls) == 2
    assert b["ref_cache/train_key"] == a["ref_cache/train_key"]
    for k in COMPARED:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, err_msg=k)
    # Identical losses at every step (B's steps before and after the preemption).
    la, lb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, 7))
    np.testing.assert_allclose([r["train/loss"] for r in lb], [r["train/loss"] for r in la])
    # The NaN at step 2 was skipped once (the update not applied) and training went on.
    assert a["nonfinite/skipped"] == b["nonfinite/skipped"] == 1
    assert math.isnan(la[2]["train/loss"]) and all(math.isfinite(r["train/loss"]) for r in la[3:])
    # Step 0: policy == reference (the SFT run), so the DPO loss is log 2.
    np.testing.assert_allclose(la[0]["train/loss"], math.log(2.0), rtol=1e-4)
    assert a["eval/pairs"] > 0 and 0.0 <= a["eval/rewards/accuracies"] <= 1.0


def _array_bytes(step_dir, item: str) -> int:
    """Bytes of the arrays of one checkpoint item, from orbax's metadata (not directory sizes,
    which vary with orbax's own files)."""
    meta = ocp.StandardCheckpointer().metadata(step_dir / item)
    tree = getattr(meta, "item_metadata", meta)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


def test_params_reference_mode(sft_run, reviews, tmp_path):
    _, prefs, _ = reviews
    args = ("--gin.REFERENCE='params'", "--gin.TRAIN_STEPS=4", "--gin.CHECKPOINT_EVERY=2")
    s = _train(tmp_path / "p", sft_run, prefs, tmp_path / "cache", *args)
    assert s["status"] == "done" and "ref_cache/hit" not in s
    assert not (tmp_path / "cache").exists()
    first = read_metrics(tmp_path / "p")[0]
    np.testing.assert_allclose(first["train/loss"], math.log(2.0), rtol=1e-5)
    assert first["train/kl/implicit"] == 0.0  # the reference IS the initial policy
    assert s["train/rewards/margins"] > 0 and math.isfinite(s["eval/kl/implicit"])
    model = json.loads((tmp_path / "p" / "model.json").read_text())
    assert model["tokenizer"] == json.loads((sft_run / "model.json").read_text())["tokenizer"]
    # The frozen reference is never checkpointed: the DPO checkpoint holds what the SFT one
    # holds (policy, AdamW state), not a second copy of the SFT weights.
    dpo_step, sft_step = tmp_path / "p" / "checkpoints" / "4", sft_run / "checkpoints" / "4"
    params = _array_bytes(sft_step, "params")
    assert _array_bytes(dpo_step, "params") == params
    dpo_state, sft_state = _array_bytes(dpo_step, "state"), _array_bytes(sft_step, "state")
    assert abs(dpo_state - sft_state) < params / 2, (dpo_state, sft_state, params)
    # Preempted after step 2 and resumed: the frozen reference is loaded again from the SFT
    # run, and the run is bitwise the uninterrupted one.
    stop = ("--gin.LoopConfig.fault_signal='SIGTERM'", "--gin.LoopConfig.fault_signal_step=2")
    assert _train(tmp_path / "q", sft_run, prefs, tmp_path / "cache", *args, *stop) is None
    q = _train(tmp_path / "q", sft_run, prefs, tmp_path / "cache", *args)
    lp, lq = read_metrics(tmp_path / "p"), read_metrics(tmp_path / "q")
    assert [r["train/loss"] for r in lq] == [r["train/loss"] for r in lp]
    assert q["eval/loss"] == s["eval/loss"] and q["train/kl/implicit"] == s["train/kl/implicit"]
