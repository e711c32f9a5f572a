"""The online-RL stage around a host-side judge, and what crosses host <-> device in an
iteration, through `rlhf-jax train` on the tiny experiment files:

- REWARD_SOURCE='gold' runs each iteration as two compiled programs (rollout; forwards,
  advantages, update) with the gold judge called by the loop between them, on numpy token ids
  outside any trace; preempted and resumed, with a poisoned update skipped, it trains bitwise
  as the one-program iteration that calls the same judge through `jax.pure_callback`
  (host_judge='callback') uninterrupted.
- Every iteration (the reward model's one program, and the gold judge's two) runs under
  `jax.transfer_guard("disallow_explicit")`: no array crosses between host and devices but
  the rollout's token ids to the judge and its scores back.
"""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import pytest
from test_rl_stage import _args, _checkpoint, _train, _train_records

from rlhf_jax.rundir import load_params
from rlhf_jax.train import loop
from rlhf_jax.train.rl import HostJudge

STEPS = 3
# Tiny and quick: no evaluation hook (its sampler is another compile), 3 iterations.
SMALL = ("--gin.rl_stage.eval_hook=None", f"--gin.TRAIN_STEPS={STEPS}", "--gin.EVAL_EVERY=0")
# ReMax: the judge also scores each prompt's greedy completion (its baseline), so the host
# returns two score arrays. Iteration 1's update is poisoned (the NaN guard must skip it).
GOLD = ("--gin.REWARD_SOURCE='gold'", "--gin.REWARD_RUN=None", "--gin.ESTIMATOR='remax'",
        "--gin.rl_stage.debug_nan_step=1", *SMALL)  # fmt: skip


def _params(run):
    return [np.asarray(x) for x in jax.tree.leaves(load_params(run).params)]


@pytest.fixture
def guarded_steps(monkeypatch):
    """Runs every iteration of the loop (its step callable, one or two programs and the host
    work between them) under the strictest transfer guard, and records what the iterations
    fetched with `jax.device_get` (on CPU the guard cannot see device -> host copies: a CPU
    device's buffers are host memory)."""
    fetched: list[list[tuple[tuple[int, ...], str]]] = []
    compile_step = loop._Run.compile_step
    device_get = jax.device_get

    def recording_get(tree):
        fetched[-1].extend((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))
        return device_get(tree)

    def guarded_compile(run, batch):
        compile_step(run, batch)
        step = run.jstep

        def guarded(*args):
            fetched.append([])
            with monkeypatch.context() as m, jax.transfer_guard("disallow_explicit"):
                m.setattr(jax, "device_get", recording_get)
                out = step(*args)
                jax.block_until_ready(out)
            return out

        run.jstep = guarded

    monkeypatch.setattr(loop._Run, "compile_step", guarded_compile)
    return fetched


def test_gold_judge_runs_on_the_host_between_two_programs(
    tmp_path, rm_task, rm_sft_run, rm_run, monkeypatch, guarded_steps
):
    calls = []
    judge = HostJudge.__call__

    def spy(self, ids, mask):
        calls.append({
            # numpy arrays, never tracers: called outside any trace
            "numpy": isinstance(ids, np.ndarray) and isinstance(mask, np.ndarray),
            "loop_thread": threading.current_thread() is threading.main_thread(),
            "shape": ids.shape,
        })  # fmt: skip
        return judge(self, ids, mask)

    def no_callback(*args, **kwargs):
        raise AssertionError("the split iteration must not call the judge from a program")

    split, callback = tmp_path / "split", tmp_path / "callback"
    # Preempted (SIGTERM) after iteration 2, then resumed from its checkpoint.
    stop = ("--gin.LoopConfig.fault_signal='SIGTERM'", "--gin.LoopConfig.fault_signal_step=1")
    with monkeypatch.context() as m:
        m.setattr(HostJudge, "__call__", spy)
        m.setattr(jax, "pure_callback", no_callback)
        assert _train(_args(split, rm_sft_run, rm_run, rm_task, "rloo", *GOLD, *stop)) == 0
        assert not (split / "summary.json").exists()
        assert _train(_args(split, rm_sft_run, rm_run, rm_task, "rloo", *GOLD)) == 0
    summary = json.loads((split / "summary.json").read_text())
    # Two programs, each compiled once per process.
    assert summary["compile/step_traces"] == 2 and summary["step"] == STEPS
    assert summary["nonfinite/skipped"] == 1  # iteration 1's one optimiser step
    prompts, rows = 8, 8 * 2  # BATCH_SIZE, BATCH_SIZE x SAMPLES_PER_PROMPT
    # Each iteration: the sampled rows and the greedy ones.
    shapes = [c["shape"][0] for c in calls]
    assert len(shapes) == 2 * STEPS
    assert all(sorted(shapes[i : i + 2]) == [prompts, rows] for i in range(0, 2 * STEPS, 2))
    assert all(c["numpy"] and c["loop_thread"] for c in calls), calls
    # What each iteration fetched: those rows' token ids and masks, nothing else (no
    # parameter), and nothing was sent to a device but the scores (the guard).
    assert len(guarded_steps) == STEPS
    width = calls[0]["shape"][1]
    want = sorted([((rows, width), "int32")] * 2 + [((prompts, width), "int32")] * 2)
    assert all(sorted(f) == want for f in guarded_steps), guarded_steps
    # The wall-time split is measured on the host around the two programs.
    last = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()][-1]
    assert all(last[f"train/time/{k}_s"] > 0 for k in ("rollout", "score", "update"))

    # The same run with the judge inside one program, through jax.pure_callback.
    cb = ("--gin.rl_stage.host_judge='callback'",)
    assert _train(_args(callback, rm_sft_run, rm_run, rm_task, "rloo", *GOLD, *cb)) == 0
    assert json.loads((callback / "summary.json").read_text())["compile/step_traces"] == 1
    a, b = _train_records(split), _train_records(callback)
    assert a.keys() == b.keys() and a[STEPS].keys() == b[STEPS].keys()
    # Bitwise the same run: every metric at every step, the parameters, and the rest of the
    # final checkpoint (optimiser state, KL controller, reward moments, step, rng).
    diff = {(s, k): (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]}
    assert not diff, diff
    for x, y in zip(_params(split), _params(callback), strict=True):
        np.testing.assert_array_equal(x, y)
    ca, cb = _checkpoint(split), _checkpoint(callback)
    assert ca.keys() == cb.keys()
    for key in ca:
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)


def test_reward_model_iteration_crosses_nothing(tmp_path, rm_task, rm_sft_run, rm_run,
                                                guarded_steps):  # fmt: skip
    """The reward model's one program: no array crosses host <-> device in an iteration (the
    in-program timestamps are host callbacks, so they are off here)."""
    run = tmp_path / "run"
    off = ("--gin.rl_stage.timing=False",)
    assert _train(_args(run, rm_sft_run, rm_run, rm_task, "rloo", *SMALL, *off)) == 0
    assert json.loads((run / "summary.json").read_text())["compile/step_traces"] == 1
    assert guarded_steps == [[]] * STEPS
