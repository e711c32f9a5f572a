"""The online-RL stage end to end through `rlhf-jax train` and the experiment gin files: a tiny
policy run and the session's tiny reward-model run, a few iterations. It writes metrics.jsonl,
summary.json and samples.jsonl with the gold judge beside the proxy reward; a SIGTERM-resumed
run, and a SIGKILLed one rerun, are bitwise the uninterrupted one (KL controller, reward moments
and rollout rng included); bad settings exit 2 naming the setting. (Here beside the reward
tests: it reuses their session fixtures.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import gin
import numpy as np
import pytest

from rlhf_jax import cli
from rlhf_jax.rundir import load_params

STEPS = 4
REPO = Path(__file__).resolve().parents[2]


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


# RLOO with the adaptive KL controller and running reward moments (in state.extra). No
# timestamps: a program with host callbacks is never in the persistent compilation cache, and
# these runs compile the same program many times (in this process and in subprocesses).
RESUME = ("--gin.KL_CONTROLLER='adaptive'", "--gin.REWARD_NORM='running'",
          "--gin.KL_TARGET=0.5", "--gin.rl_stage.eval_hook=None",
          "--gin.rl_stage.timing=False")  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, rm_task, rm_sft_run, rm_run) -> Path:
    """The run the interrupted ones must reproduce bitwise."""
    run = tmp_path_factory.mktemp("rl_resume") / "whole"
    assert _train(_args(run, rm_sft_run, rm_run, rm_task, "rloo", *RESUME)) == 0
    return run


def _checkpoint(run: Path) -> dict[str, np.ndarray]:
    """Every array of the newest checkpoint but the parameters (optimiser state, `extra`: KL
    controller, reward moments, baseline; step; hparams; the base rng), by path."""
    import jax
    import orbax.checkpoint as ocp

    from rlhf_jax.train.checkpoint import ITEMS

    mgr = ocp.CheckpointManager(run / "checkpoints", item_names=ITEMS)
    try:
        restore = ocp.args.StandardRestore()
        r = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(state=restore, aux=restore))
    finally:
        mgr.close()
    flat = jax.tree_util.tree_flatten_with_path({"state": r.state, "aux": r.aux})[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def _assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same metrics at every step, parameters and checkpointed state."""
    ra, rb = _train_records(a), _train_records(b)
    assert sorted(ra) == list(range(1, STEPS + 1)) and ra == rb
    # The controller really moved (so equality covers its restored state).
    assert ra[STEPS]["train/kl/coef"] != ra[1]["train/kl/coef"]
    for x, y in zip(_params_of(a), _params_of(b), strict=True):
        np.testing.assert_array_equal(x, y)
    ca, cb = _checkpoint(a), _checkpoint(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)
    moments = ca["['state']['extra']['reward_moments']['count']"]
    assert moments == STEPS * 8 * 2  # every rollout's scores went into the running moments


def _params_of(run: Path) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(load_params(run).params)]


def test_sigterm_resume_is_bitwise_the_uninterrupted_run(tmp_path, rm_task, rm_sft_run, rm_run,
                                                         uninterrupted):  # fmt: skip
    parts = tmp_path / "parts"
    stop = ("--gin.LoopConfig.fault_signal='SIGTERM'", "--gin.LoopConfig.fault_signal_step=2")
    assert _train(_args(parts, rm_sft_run, rm_run, rm_task, "rloo", *RESUME, *stop)) == 0
    assert not (parts / "summary.json").exists()  # preempted: checkpoint of step 3, then exit 0
    assert _train(_args(parts, rm_sft_run, rm_run, rm_task, "rloo", *RESUME)) == 0
    _assert_same_run(uninterrupted, parts)


def _cli_process(args: list[str]) -> subprocess.CompletedProcess:
    """`rlhf-jax ARGS` in a new process (sharing the session's compilation cache)."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ["RLHF_JAX_TEST_COMPILE_CACHE"]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Not `-m rlhf_jax.cli`: that registers the gin configurable `train` twice.
    code = "import sys; from rlhf_jax.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_sigkill_resume_is_bitwise_the_uninterrupted_run(tmp_path, rm_task, rm_sft_run, rm_run,
                                                         uninterrupted):  # fmt: skip
    """kill -9 of `rlhf-jax train` after the checkpoint of step 2, then the same command: the
    KL controller, the reward moments and the rollout rng (base key + iteration) resume."""
    from rlhf_jax.train.checkpoint import Checkpointer

    run = tmp_path / "killed"
    args = _args(run, rm_sft_run, rm_run, rm_task, "rloo", *RESUME)
    kill = ("--gin.LoopConfig.fault_signal='SIGKILL'", "--gin.LoopConfig.fault_signal_step=3")
    killed = _cli_process([*args, *kill])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "summary.json").exists()
    ckpt = Checkpointer(run / "checkpoints")
    assert ckpt.latest_step() == 2  # iteration 3 ran but was never saved
    ckpt.close()
    resumed = _cli_process(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the checkpoint of step 2" in resumed.stderr
    _assert_same_run(uninterrupted, run)


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
