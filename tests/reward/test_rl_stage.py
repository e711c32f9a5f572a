"""The online-RL stage end to end through `rlhf-jax train` and the experiment gin files: a tiny
policy run and the session's tiny reward-model run, a few iterations. It writes metrics.jsonl,
summary.json and samples.jsonl with the gold judge beside the proxy reward; a SIGTERM-resumed
run is bitwise the uninterrupted one (KL controller and reward moments included); bad settings
exit 2 naming the setting. (Here beside the reward tests: it reuses their session fixtures.)"""

from __future__ import annotations

import json
from pathlib import Path

import gin
import numpy as np
import pytest

from rlhf_jax import cli
from rlhf_jax.rundir import load_params

STEPS = 4


def _args(run: Path, sft: Path, rm: Path, task, gin_file: str = "rloo", *extra: str) -> list[str]:
    source = {"train": task.prompts_path, "eval": task.eval_prompts_path}
    return [
        "train",
        "--gin_file",
        f"gin/experiments/{gin_file}_reviews_tiny.gin",
        f"--gin.RUN_DIR={run}",
        f"--gin.SFT_RUN={sft}",
        f"--gin.REWARD_RUN={rm}",
        f"--gin.TRAIN_STEPS={STEPS}",
        "--gin.BATCH_SIZE=8",
        "--gin.SAMPLES_PER_PROMPT=2",
        "--gin.MAX_NEW_TOKENS=6",
        "--gin.LOG_EVERY=1",
        "--gin.EVAL_EVERY=2",
        "--gin.CHECKPOINT_EVERY=2",
        "--gin.EVAL_PROMPTS=4",
        "--gin.LEARNING_RATE=1e-3",
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


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train_records(run: Path) -> dict[int, dict]:
    """Every train/* metric by step, the wall-time ones dropped (they are host clocks)."""
    out = {}
    for r in _records(run):
        keep = {k: v for k, v in r.items() if k.startswith("train/") and "time/" not in k}
        if keep:
            out[r["step"]] = keep
    return out


def test_ppo_runs_and_logs_gold_beside_proxy(tmp_path, rm_task, rm_sft_run, rm_run):
    """PPO: the critic starts from the reward model; GAE; epochs x minibatches per iteration."""
    run = tmp_path / "ppo"
    epochs, minibatches = 2, 2
    nan = ("--gin.rl_stage.debug_nan_step=1", f"--gin.EPOCHS={epochs}",
           f"--gin.NUM_MINIBATCHES={minibatches}")  # fmt: skip
    assert _train(_args(run, rm_sft_run, rm_run, rm_task, "ppo", *nan)) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["status"] == "done"
    # The poisoned iteration's optimiser steps were all skipped, and only those.
    assert summary["nonfinite/skipped"] == epochs * minibatches
    # One program, compiled once, for every iteration.
    assert summary["compile/step_traces"] == 1
    records = _train_records(run)
    assert sorted(records) == list(range(1, STEPS + 1))
    last = records[STEPS]
    for key in ("reward/proxy", "kl/k1", "kl/k3", "entropy", "ppo/clipfrac", "response/length",
                "sampler/logp_gap_abs", "advantages/mean", "loss/policy", "lr",
                "value/explained_var", "loss/value", "grad_norm/value"):  # fmt: skip
        assert np.isfinite(last[f"train/{key}"]), key
    timed = [r for r in _records(run) if "train/time/rollout_s" in r]
    assert timed and all(
        r["train/time/rollout_s"] > 0 and r["train/time/update_s"] > 0 for r in timed
    )
    # The policy moved away from the reference (KL > 0 after a few updates).
    assert last["train/kl/k3"] > 0
    # Evals at steps 2 and 4: the gold judge beside the proxy reward, and the rows.
    evals = [r for r in _records(run) if "eval/samples/gold" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(np.isfinite(r["eval/samples/proxy"]) for r in evals)
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [2, 4]
    assert len(rows) == 2 * 4
    assert all({"prompt", "completion", "gold", "proxy"} <= set(r) for r in rows)
    assert all(-1.0 <= r["gold"] <= 1.0 for r in rows)


def test_sigterm_resume_is_bitwise_the_uninterrupted_run(tmp_path, rm_task, rm_sft_run, rm_run):
    """RLOO with the adaptive KL controller and running reward moments (in state.extra)."""
    extra = ("--gin.KL_CONTROLLER='adaptive'", "--gin.REWARD_NORM='running'",
             "--gin.KL_TARGET=0.5", "--gin.rl_stage.eval_hook=None")  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _train(_args(whole, rm_sft_run, rm_run, rm_task, "rloo", *extra)) == 0
    stop = ("--gin.LoopConfig.fault_signal='SIGTERM'", "--gin.LoopConfig.fault_signal_step=2")
    assert _train(_args(parts, rm_sft_run, rm_run, rm_task, "rloo", *extra, *stop)) == 0
    assert not (parts / "summary.json").exists()  # preempted: checkpoint of step 3, then exit 0
    assert _train(_args(parts, rm_sft_run, rm_run, rm_task, "rloo", *extra)) == 0
    a, b = _train_records(whole), _train_records(parts)
    assert a == b
    # The controller really moved (so equality covers its restored state), and so did the
    # running moments behind the normalised rewards.
    assert a[STEPS]["train/kl/coef"] != a[1]["train/kl/coef"]
    pa, pb = load_params(whole).params, load_params(parts).params
    import jax

    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "extra, setting",
    [
        (("--gin.SAMPLES_PER_PROMPT=1",), "samples_per_prompt"),
        (("--gin.NUM_MINIBATCHES=3",), "num_minibatches"),
    ],
)
def test_bad_settings_exit_2(tmp_path, rm_task, rm_sft_run, rm_run, capsys, extra, setting):
    code = _train(_args(tmp_path / "run", rm_sft_run, rm_run, rm_task, "rloo", *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert setting in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_reward_model_with_another_tokenizer_exits_2(tmp_path, rm_task, rm_sft_run, rm_run, capsys):
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(rm_task.tokenizer_path)
    tok.add_tokens(["zzz-another-token"])
    other_tok = tmp_path / "other_tokenizer.json"
    tok.save(str(other_tok))
    policy = tmp_path / "policy"
    policy.mkdir()
    info = json.loads((rm_sft_run / "model.json").read_text())
    info["tokenizer"] = str(other_tok)
    (policy / "model.json").write_text(json.dumps(info))
    (policy / "checkpoints").symlink_to(rm_sft_run / "checkpoints")
    code = _train(_args(tmp_path / "run", policy, rm_run, rm_task))
    err = capsys.readouterr().err
    assert code == 2
    assert "REWARD_RUN" in err and "tokenizer" in err and "Traceback" not in err


def test_gold_scorer_in_a_jitted_program_equals_the_judge(rm_task):
    """REWARD_SOURCE='gold': the host judge inside the compiled iteration scores the decoded
    prompt + completion exactly as the judge scores those texts."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.data.tasks import judges
    from rlhf_jax.steps.rollout import Rollout
    from rlhf_jax.train.rl import gold_scorer

    tok = rm_task.tokenizer()
    prompts, completions = ["the food was", "service felt"], [" great and lovely", " awful, rude"]
    p_ids = [[tok.bos_id, *tok.encode(p)] for p in prompts]
    c_ids = [tok.encode(c) + [tok.eos_id] for c in completions]
    P, N = max(map(len, p_ids)), max(map(len, c_ids)) + 2
    pid, pmask = np.zeros((2, P), np.int32), np.zeros((2, P), np.int32)
    cid, cmask = np.zeros((2, N), np.int32), np.zeros((2, N), np.int32)
    for i, (p, c) in enumerate(zip(p_ids, c_ids, strict=True)):
        pid[i, P - len(p) :], pmask[i, P - len(p) :] = p, 1  # left-padded prompts
        cid[i, : len(c)], cmask[i, : len(c)] = c, 1  # right-padded completions
    ro = Rollout(jnp.asarray(pid), jnp.asarray(pmask), jnp.asarray(cid), jnp.asarray(cmask),
                 jnp.zeros((2, N), jnp.float32))  # fmt: skip
    got = jax.jit(gold_scorer(rm_task.tokenizer_path))(None, ro)
    texts = [tok.decode(p[1:] + c[:-1]) for p, c in zip(p_ids, c_ids, strict=True)]
    want = judges.gold_reward(texts)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    assert want[0] > 0 > want[1]  # the judge tells the two apart: the test compares real scores
