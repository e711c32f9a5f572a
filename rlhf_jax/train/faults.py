"""Fault handling for the host loop: the run-directory lock, preemption (SIGTERM), non-finite
policies, and signal injection for tests.

- `RunLock`: `RUN_DIR/.lock` held with `fcntl.flock` for the life of the run, its content the
  holder's pid and hostname. The kernel drops the lock when the holder dies (even by SIGKILL),
  so a lock left by a dead process is simply taken over; a live holder makes a second run
  refuse with `RunDirInUseError`.
- `PreemptionHandler`: SIGTERM sets a flag the loop polls after every step; the loop then saves a
  checkpoint and returns normally (exit code 0), well inside the usual grace period.
- `NonFiniteError`: raised by the loop under `nonfinite_policy="halt"`, naming the step and
  whether the loss or the gradients were non-finite.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from rlhf_jax.errors import UserError

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "halt")


class RunDirInUseError(UserError):
    """Another live process holds the run directory.

    A user error like a bad config: the CLI prints one line and exits with code 2.
    """


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient under `nonfinite_policy="halt"`."""

    def __init__(self, step: int, what: str, last_checkpoint: int | None):
        self.step, self.what, self.last_checkpoint = step, what, last_checkpoint
        where = f"step {last_checkpoint}" if last_checkpoint is not None else "none"
        super().__init__(
            f"non-finite {what} at step {step} (nonfinite_policy='halt'); the update was not "
            f"applied and no later checkpoint was written; last good checkpoint: {where}"
        )


class RunLock:
    """An exclusive, crash-safe lock on a run directory (use as a context manager).

    Whether `fcntl.flock` also excludes processes on other hosts depends on the shared file
    system (Linux NFS emulates it with POSIX locks, which do; some file systems do not).
    """

    FILENAME = ".lock"

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / self.FILENAME
        self._fd: int | None = None
        self._created: list[Path] = []  # what acquire created: removed again after a failure

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> RunLock:
        """Takes the lock or raises `RunDirInUseError` naming the holder.

        In a multi-process run only process 0 takes it (the processes share the directory).
        """
        import jax

        if jax.process_index() != 0:
            return self
        run_dir = self.path.parent.absolute()
        missing = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._created = [self.path] if not self.path.exists() else []
            self._created += missing  # innermost folder first
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the run directory lock {self.path}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._created = []
            h = self._holder()
            raise RunDirInUseError(
                f"run directory {self.path.parent} is in use by pid {h.get('pid', '?')} on host "
                f"{h.get('host', '?')} (since {h.get('started', '?')}); wait for it to finish, "
                f"stop it, or choose another RUN_DIR"
            ) from None
        previous = self._holder()
        if previous.get("pid"):
            log.warning(
                "taking over the stale lock of %s (pid %s on %s, no longer running)",
                self.path.parent,
                previous.get("pid"),
                previous.get("host"),
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self, failed: bool = False) -> None:
        """Clears the holder record and drops the lock (the file stays, empty).

        Args:
          failed: the run failed; if the directory holds nothing but what `acquire` created,
            remove it again, so that a failed start leaves the directory as it found it.
        """
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        if failed and self._created:
            self._remove_created()  # while still holding the lock
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def _remove_created(self) -> None:
        if self.path in self._created:
            self.path.unlink(missing_ok=True)
        for d in self._created:
            if d != self.path:
                try:
                    d.rmdir()  # only if empty
                except OSError:
                    break

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type, *exc) -> None:
        self.release(failed=exc_type is not None)


class PreemptionHandler:
    """Turns SIGTERM into a flag (`requested`) while active; restores the old handler on exit.

    Installing a handler is only possible on the main thread; elsewhere this is a no-op flag.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        self.requested, self.signum = True, signum
        log.warning("received %s: will checkpoint and exit", signal.Signals(signum).name)

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()


def inject_signal(name: str) -> None:
    """Sends signal `name` (e.g. "SIGKILL", "SIGTERM") to this process: a test hook."""
    sig = getattr(signal, name)
    log.warning("fault injection: sending %s to self", name)
    os.kill(os.getpid(), sig)
    if sig != signal.SIGKILL:
        # Python runs the handler at the next bytecode; give it one.
        time.sleep(0)
