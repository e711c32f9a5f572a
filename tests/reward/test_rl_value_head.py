"""The online-RL stage with PPO's critic as a value head on the policy's trunk
(`VALUE_MODEL='head'`), end to end through `rlhf-jax train`: it runs, logs every diagnostic of
the iteration at every logged step (finite), checkpoints (the published parameters stay a plain
Transformer's) and resumes after a SIGTERM bitwise as the uninterrupted run, value head
included. (Here beside the reward tests: it reuses their session fixtures.)"""

from __future__ import annotations

import json
from pathlib import Path

import gin
import jax
import numpy as np

from rlhf_jax import cli
from rlhf_jax.rundir import abstract_model, load_params, read_model_info

STEPS = 4
# Every diagnostic the issue asks of a logged step (metrics.jsonl, under "train/"): proxy
# reward, KL per estimator, entropy, clip fraction, the sampler vs teacher-forced log-prob gap,
# approximate KL old -> new, value explained variance, advantage and return statistics,
# response length, EOS share, KL coefficient, and the wall-time split.
DIAGNOSTICS = (
    "reward/proxy", "reward/proxy_std", "reward/total",
    "kl/k1", "kl/k2", "kl/k3", "kl/coef",
    "entropy", "ppo/clipfrac", "ppo/approx_kl", "ppo/ratio",
    "sampler/logp_gap_abs", "sampler/logp_gap_max", "sampler/kl_k3",
    "value/explained_var", "value/error", "value/mean",
    *(f"{x}/{s}" for x in ("advantages", "returns") for s in ("mean", "std", "min", "max")),
    "response/length", "response/eos_share",
    "loss/policy", "loss/value", "grad_norm/policy", "grad_norm/value", "lr",
    "time/rollout_s", "time/score_s", "time/update_s",
)  # fmt: skip


def _args(run: Path, sft: Path, rm: Path, task, *extra: str) -> list[str]:
    source = {"train": task.prompts_path, "eval": task.eval_prompts_path}
    return [
        "train",
        "--gin_file",
        "gin/experiments/ppo_reviews_tiny.gin",
        f"--gin.RUN_DIR={run}",
        f"--gin.SFT_RUN={sft}",
        f"--gin.REWARD_RUN={rm}",
        "--gin.VALUE_MODEL='head'",
        "--gin.VF_COEF=0.5",
        f"--gin.TRAIN_STEPS={STEPS}",
        "--gin.BATCH_SIZE=8",
        "--gin.MAX_NEW_TOKENS=6",
        "--gin.LOG_EVERY=1",
        "--gin.CHECKPOINT_EVERY=2",
        "--gin.LEARNING_RATE=1e-3",
        "--gin.rl_stage.eval_hook=None",
        "--gin.prompt_data.task=None",
        f"--gin.prompt_data.source={source!r}",
        "--gin.LoopConfig.progress_bar=False",
        "--gin.LoopConfig.async_checkpointing=False",
        "--gin.LoopConfig.tensorboard=False",
        *extra,
    ]


def _train(args: list[str]) -> int:
    gin.clear_config()
    try:
        return cli.main(args)
    finally:
        gin.clear_config()


def _train_records(run: Path, *, clocks: bool = False) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        keep = {k[len("train/") :]: v for k, v in r.items() if k.startswith("train/")}
        if not clocks:  # host clocks differ between two runs of the same numbers
            keep = {k: v for k, v in keep.items() if not k.startswith("time/")}
        if keep:
            out[r["step"]] = keep
    return out


def test_value_head_stage_logs_every_diagnostic_checkpoints_and_resumes(
    tmp_path, rm_task, rm_sft_run, rm_run
):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _train(_args(whole, rm_sft_run, rm_run, rm_task)) == 0
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["status"] == "done"
    assert summary["compile/step_traces"] == 1

    # Every logged step carries every diagnostic, finite (the time split positive).
    records = _train_records(whole, clocks=True)
    assert sorted(records) == list(range(1, STEPS + 1))
    for step, rec in records.items():
        missing = [k for k in DIAGNOSTICS if k not in rec]
        assert not missing, (step, missing)
        bad = {k: rec[k] for k in DIAGNOSTICS if not np.isfinite(rec[k])}
        assert not bad, (step, bad)
        assert all(rec[f"time/{p}_s"] > 0 for p in ("rollout", "score", "update"))
    # The critic is trained: the head's gradient is not zero and the value loss is measured.
    assert all(rec["grad_norm/value"] > 0 for rec in records.values())

    # The published parameters are a plain Transformer's (the head is not in them) and they
    # moved away from the SFT policy's.
    info = read_model_info(whole)
    assert info["model_class"] == "Transformer"
    _, plain = abstract_model("Transformer", info["model_config"])
    trained, sft = load_params(whole).params, load_params(rm_sft_run).params
    assert jax.tree.structure(trained) == jax.tree.structure(plain)
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(sft), strict=True)
    )

    # SIGTERM after step 2 (checkpoint, exit 0), then resume: bitwise the uninterrupted run,
    # which needs the value head and its optimiser state restored from the checkpoint.
    stop = ("--gin.LoopConfig.fault_signal='SIGTERM'", "--gin.LoopConfig.fault_signal_step=2")
    assert _train(_args(parts, rm_sft_run, rm_run, rm_task, *stop)) == 0
    assert not (parts / "summary.json").exists()
    assert _train(_args(parts, rm_sft_run, rm_run, rm_task)) == 0
    assert _train_records(parts) == _train_records(whole)
    resumed = load_params(parts).params
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
