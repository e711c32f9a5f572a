"""Launchers: how a sweep point runs. `LocalLauncher` starts `rlhf-jax train` subprocesses on
this machine; `SubmititLauncher` submits each point as a SLURM job through submitit (whose job
runs the same command on its allocation, where the CLI reads SLURM's environment for
multi-host points). `launch.run_sweep` drives either through `start` / `poll` / `cancel`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax.sweep.spec import SweepError

# `rlhf-jax train`, the same as the console script (`python -m rlhf_jax.cli` works as well).
TRAIN_PROGRAM = "import sys; from rlhf_jax.cli import main; sys.exit(main())"


def last_error(log_path: Path, max_chars: int = 500) -> str:
    """The most telling line of a failed run's output: the CLI's one-line error, else the
    exception line of a traceback, else the last line."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return "no output"
    lines = [ln for ln in lines if ln]
    for pattern in (r"^rlhf-jax: ", r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*"):
        hits = [ln for ln in lines if re.match(pattern, ln)]
        if hits:
            return hits[-1][:max_chars]
    return (lines[-1] if lines else "no output")[:max_chars]


@dataclasses.dataclass
class PointTask:
    """What a launcher needs to run one point."""

    name: str
    run_dir: Path
    argv: list[str]  # arguments of `rlhf-jax` (starting with "train")
    env: dict[str, str]  # variables added to the environment
    log_path: Path
    program: str = TRAIN_PROGRAM  # the Python program run with `argv` (a population's: its own)


class Launcher:
    """Starts points and reports on them; `start` returns a handle for `poll` / `cancel`."""

    def start(self, task: PointTask) -> Any:
        raise NotImplementedError

    def poll(self, handle: Any) -> tuple[str, int | None, str | None]:
        """`(state, returncode, error)`; state is "queued", "running" or "finished"."""
        raise NotImplementedError

    def cancel(self, handle: Any) -> None:
        raise NotImplementedError


def point_command(argv: Sequence[str], program: str = TRAIN_PROGRAM) -> list[str]:
    """The full command line of a point (this Python, the `rlhf-jax` entry point)."""
    return [sys.executable, "-c", program, *argv]


class LocalLauncher(Launcher):
    """Each point is a subprocess on this machine (its output in RUN_DIR/sweep.log)."""

    def start(self, task: PointTask) -> subprocess.Popen:
        with open(task.log_path, "ab") as out:
            return subprocess.Popen(
                point_command(task.argv, task.program),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **task.env},
            )

    def poll(self, handle: subprocess.Popen) -> tuple[str, int | None, str | None]:
        rc = handle.poll()
        return ("running", None, None) if rc is None else ("finished", rc, None)

    def cancel(self, handle: subprocess.Popen) -> None:
        # SIGTERM: the training loop saves a checkpoint and exits, so a re-run resumes.
        if handle.poll() is None:
            handle.terminate()
            try:
                handle.wait(timeout=60)
            except subprocess.TimeoutExpired:
                handle.kill()


def run_point_job(
    argv: Sequence[str], env: Mapping[str, str], log_path: str, program: str = TRAIN_PROGRAM
) -> int:
    """Body of a submitit job: runs the point's `rlhf-jax train` on the allocation.

    Raises:
      RuntimeError: the run failed (submitit then reports the job as failed, with this error).
    """
    with open(log_path, "ab") as out:
        rc = subprocess.call(
            point_command(argv, program),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
    if rc != 0:
        raise RuntimeError(f"exit code {rc}: {last_error(Path(log_path))}")
    return rc


class SubmititLauncher(Launcher):
    """Points as SLURM jobs through submitit (`cluster="local"`: submitit's local executor).

    Args:
      folder: where submitit keeps its job files and logs.
      cluster: None (auto: SLURM when available), "slurm", "local" or "debug".
      parameters: `executor.update_parameters(**parameters)`, e.g. `slurm_partition`,
        `timeout_min`, `nodes`, `tasks_per_node`, `gpus_per_node`.
    """

    def __init__(
        self,
        folder: Path,
        cluster: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ):
        try:
            import submitit
        except ImportError:
            raise SweepError("--launcher slurm needs submitit (pip install submitit)") from None
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        params = {"timeout_min": 24 * 60, **dict(parameters or {})}
        try:
            self.executor.update_parameters(**params)
        except (TypeError, ValueError) as e:
            raise SweepError(f"bad SLURM parameter: {e}") from None

    def start(self, task: PointTask):
        self.executor.update_parameters(name=task.name)
        return self.executor.submit(
            run_point_job, task.argv, task.env, str(task.log_path), task.program
        )

    def poll(self, job) -> tuple[str, int | None, str | None]:
        if not job.done():
            queued = str(job.state).upper() in ("PENDING", "REQUEUED", "UNKNOWN")
            return ("queued" if queued else "running"), None, None
        try:
            return "finished", int(job.result()), None
        except Exception as e:  # noqa: BLE001 (the job's own failure, reported as the error)
            # submitit's message holds the job's traceback; run_point_job's own error (the
            # run's exit code and message) is its most telling line.
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            ours = [ln for ln in lines if "RuntimeError: exit code" in ln]
            err = ours[-1].split("RuntimeError: ", 1)[1] if ours else (lines or [repr(e)])[0]
            return "finished", 1, err[:500]

    def cancel(self, job) -> None:
        job.cancel(check=False)
