"""Process-level faults, in subprocesses running `rlhf-jax train`: SIGKILL then resume is
bitwise the uninterrupted run, SIGTERM checkpoints and exits 0, and the run-directory lock."""

import json
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from runtime_helpers import REPO, cli_env, run_cli

from rlhf_jax.rundir import load_params
from rlhf_jax.train import faults
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.metrics import read_metrics

STEPS = 12


def _check(proc, code=0):
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc


def _params(run_dir):
    return [np.asarray(x) for x in jax.tree.leaves(load_params(run_dir).params)]


@pytest.mark.slow
def test_sigkill_then_rerun_is_bitwise_the_uninterrupted_run(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    _check(run_cli(tmp_path, ref, STEPS))
    # Killed just before step 9: checkpoint 4 is complete, 8 may or may not be.
    killed = run_cli(
        tmp_path, run, STEPS, "LoopConfig.fault_signal='SIGKILL'", "LoopConfig.fault_signal_step=9"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "summary.json").exists()
    resumed = _check(run_cli(tmp_path, run, STEPS))
    assert "resumed from the checkpoint of step" in resumed.stderr
    a, b = read_metrics(ref), read_metrics(run)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(2, STEPS + 1, 2))
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            if key.startswith(("train/", "eval/")):
                assert ra[key] == rb[key], (ra["step"], key)
    for x, y in zip(_params(ref), _params(run), strict=True):
        np.testing.assert_array_equal(x, y)
    assert (
        json.loads((run / "summary.json").read_text())["eval/loss"]
        == json.loads((ref / "summary.json").read_text())["eval/loss"]
    )


@pytest.mark.slow
def test_sigkill_after_the_final_checkpoint_then_rerun_writes_the_same_summary(tmp_path):
    """Killed after the final checkpoint and before summary.json: the rerun restores the final
    checkpoint, trains nothing, and writes the summary an uninterrupted run writes."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    steps = 4
    _check(run_cli(tmp_path, ref, steps))
    killed = run_cli(
        tmp_path,
        run,
        steps,
        "LoopConfig.fault_signal='SIGKILL'",
        f"LoopConfig.fault_signal_step={steps}",
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run / "summary.json").exists()
    ckpt = Checkpointer(run / "checkpoints")
    assert ckpt.latest_step() == steps
    ckpt.close()
    _check(run_cli(tmp_path, run, steps))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, run))
    assert set(a) == set(b)
    for key in a:  # timings differ between any two runs; everything else is the same
        if key != "wall_time_s" and not key.startswith("perf/"):
            assert a[key] == b[key], key
    assert b["compile/step_traces"] >= 1 and "train/loss" in b and "train/grad_norm" in b
    assert [r["step"] for r in read_metrics(run, dedup=False)] == list(range(2, steps + 1, 2))


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero_then_resumes(tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    term = _check(
        run_cli(
            tmp_path,
            run,
            STEPS,
            "LoopConfig.fault_signal='SIGTERM'",
            "LoopConfig.fault_signal_step=5",
        )
    )
    assert time.time() - t0 < 120
    assert "received SIGTERM" in term.stderr
    assert not (run / "summary.json").exists()
    ckpt = Checkpointer(run / "checkpoints")
    assert ckpt.latest_step() == 6  # step 5 ran, then the flag was seen
    ckpt.close()
    resumed = _check(run_cli(tmp_path, run, STEPS))
    assert "resumed from the checkpoint of step 6" in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == STEPS
    assert [r["step"] for r in read_metrics(run, dedup=False)] == list(range(2, STEPS + 1, 2))


def test_cli_refuses_a_run_directory_in_use(tmp_path):
    run = tmp_path / "run"
    with faults.RunLock(run):
        proc = run_cli(tmp_path, run, 2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = next(line for line in proc.stderr.splitlines() if line.startswith("rlhf-jax: error:"))
    assert f"{run} is in use by pid" in err and "on host" in err
    assert "Traceback" not in proc.stderr and not (run / "model.json").exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from rlhf_jax.train.faults import RunLock;"
            f"RunLock({str(run)!r}).acquire(); print('locked', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(faults.RunDirInUseError, match=f"pid {holder.pid}"):
            faults.RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    with faults.RunLock(run) as lock:
        assert json.loads(lock.path.read_text())["pid"] != holder.pid
    assert "stale lock" in caplog.text and str(holder.pid) in caplog.text
