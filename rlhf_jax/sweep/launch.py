"""Launching a sweep: each point is a normal `rlhf-jax train` run in its own run directory.

`run_sweep(sweep, out_dir)`:

1. checks the sweep before anything is written: the base gin files parse, every macro a point
   sets is defined by them, every point's bindings parse, no REQUIRED macro is left unset, and
   `out_dir` is empty, new, or holds this same sweep (`SweepError`, exit code 2 in the CLI);
2. writes `OUT_DIR/sweep.json` (atomically, after every change): the sweep's files, bindings,
   each point's name, bindings, run directory, status (`queued`, `running`, `done`, `failed`),
   error, exit code and wall time, and the compile count;
3. runs the points that are not finished (`summary.json` present = finished, skipped) with up to
   `parallel` at a time. Each point's run directory holds `bindings.gin` (its resolved bindings,
   RUN_DIR included: `rlhf-jax train --gin_file BASE.gin --gin_file RUN_DIR/bindings.gin`
   reproduces it), `point.json` and `sweep.log` (the run's output). An unfinished point resumes
   from its checkpoints, as `rlhf-jax train` does; a failing point is recorded with its error
   and the others go on.

All points share one JAX persistent compilation cache (`OUT_DIR/jax_cache` unless given), with
every compiled program cached; a compile is a cache miss, and a miss writes one new entry, so
the sweep's compile count is the number of entries it added. Points that differ only in traced
values (β, learning-rate scale, seeds) add none after the first.

Launchers: "local" (subprocesses on this machine) and "slurm" (through submitit; each job runs
the same command on its allocation, where the CLI reads SLURM's environment for multi-host
points).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from rlhf_jax.sweep.launchers import (  # noqa: F401 (re-exported: the launchers' API)
    Launcher,
    LocalLauncher,
    PointTask,
    SubmititLauncher,
    last_error,
    run_point_job,
)
from rlhf_jax.sweep.spec import GIN_FILE_KEY, Sweep, SweepError, binding_lines, point_name

log = logging.getLogger(__name__)

SWEEP_JSON = "sweep.json"
STATUSES = ("done", "running", "failed", "queued")
# "points": each point is its own `rlhf-jax train` run; "population": points that differ only in
# traced hyperparameters and seeds train as one vmapped program (`sweep.population`).
MODES = ("points", "population")


# ----------------------------------------------------------------------------- files


def write_json_strict(path: Path, obj: Any) -> None:
    """Atomic strict JSON (non-finite floats become null)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_summary(run_dir: Path) -> dict | None:
    """`RUN_DIR/summary.json` if the run finished, else None."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("status", "done") == "done" else None


def count_cache_entries(cache_dir: Path) -> int:
    """Executables in a JAX persistent compilation cache (one `*-cache` file per program)."""
    return sum(1 for _ in cache_dir.glob("*-cache")) if cache_dir.is_dir() else 0


# ----------------------------------------------------------------------------- checks


def _is_macro(key: str) -> bool:
    return "." not in key and "/" not in key


def validate(sweep: Sweep) -> None:
    """Parses each point's gin files with its bindings in this process (nothing runs).

    Raises:
      SweepError: a file does not parse, a point sets a macro its files do not define, a
        binding does not parse, or a REQUIRED macro is left unset.
    """
    import gin

    from rlhf_jax import commands, gin_utils

    shared = binding_lines(sweep.bindings)
    run_dir = "RUN_DIR = '/sweep/point'"
    defined_by: dict[tuple[str, ...], set[str]] = {}

    def defined(files: list[str]) -> set[str]:
        """The macros `files` define (parsed once per distinct list of files)."""
        key = tuple(files)
        if key not in defined_by:
            gin.clear_config()
            try:
                commands.parse_gin(files, [])
            except gin_utils.GinConfigError as e:
                # Macros left REQUIRED are checked per point below (a point may set them);
                # that check runs last in `parse`, so the files themselves did parse.
                if not str(e).startswith(("REQUIRED macro", "macro(s) used")):
                    raise SweepError(f"the sweep's gin files {files} do not parse: {e}") from None
            defined_by[key] = set(gin_utils.macros())
            if "RUN_DIR" not in defined_by[key]:
                raise SweepError(
                    f"the gin files {files} define no RUN_DIR macro: a sweep sets RUN_DIR for "
                    "each point"
                )
        return defined_by[key]

    try:
        for p in sweep.points:
            files = sweep.files(p)
            names = defined(files)
            for where, bindings in (("the shared bindings", sweep.bindings),
                                    (f"point {point_name(p)}", p)):  # fmt: skip
                unknown = sorted(
                    k for k in bindings if _is_macro(k) and k != GIN_FILE_KEY and k not in names
                )
                if unknown:
                    raise SweepError(
                        f"unknown macro {unknown[0]} in {where}: the gin files "
                        f"{', '.join(files)} do not define it "
                        f"(they define {', '.join(sorted(names))})"
                    )
        for p in sweep.points:
            gin.clear_config()
            try:
                commands.parse_gin(sweep.files(p), [*shared, *binding_lines(p), run_dir])
            except gin_utils.GinConfigError as e:
                raise SweepError(f"point {point_name(p)}: {e}") from None
    finally:
        gin.clear_config()


def _check_out_dir(out_dir: Path, sweep: Sweep) -> dict | None:
    """The existing sweep.json of this sweep (None for a new one).

    Raises:
      SweepError: `out_dir` holds a different sweep, or files that are not a sweep's.
    """
    path = out_dir / SWEEP_JSON
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SweepError(f"{path} is not readable JSON ({e}): not a sweep directory") from None
        if state.get("fingerprint") != sweep.fingerprint():
            raise SweepError(
                f"{out_dir} holds a different sweep (its gin files, bindings or grid differ): "
                "choose another --out_dir"
            )
        return state
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SweepError(
            f"{out_dir} exists and holds no sweep.json: not a sweep directory (choose an empty "
            "or new --out_dir)"
        )
    return None


# ----------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class SweepResult:
    """Counts of a finished invocation, and the path of sweep.json."""

    done: int
    failed: int
    skipped: int
    new_cache_entries: int
    path: Path


class _Progress:
    """A one-line progress display: points done / running / failed / queued."""

    def __init__(self, stream: TextIO | None, total: int, name: str):
        self.stream, self.total, self.name, self.t0 = stream, total, name, time.time()
        self.last = None

    def event(self, text: str) -> None:
        if self.stream is not None:
            print(f"  {text}", file=self.stream, flush=True)

    def show(self, counts: Mapping[str, int]) -> None:
        line = (
            f"sweep {self.name}: {counts['done']}/{self.total} done, {counts['running']} "
            f"running, {counts['failed']} failed, {counts['queued']} queued"
        )
        if self.stream is not None and line != self.last:
            print(f"{line}  [{time.time() - self.t0:.0f} s]", file=self.stream, flush=True)
        self.last = line


def _make_launcher(
    launcher: str | Launcher, out_dir: Path, slurm: Mapping[str, Any] | None
) -> Launcher:
    if isinstance(launcher, Launcher):
        return launcher
    if launcher == "local":
        return LocalLauncher()
    if launcher == "slurm":
        opts = dict(slurm or {})
        cluster = opts.pop("cluster", None)
        return SubmititLauncher(out_dir / "submitit", cluster=cluster, parameters=opts)
    raise SweepError(f"unknown launcher {launcher!r} (local or slurm)")


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    *,
    launcher: str | Launcher = "local",
    parallel: int = 1,
    cache_dir: str | Path | None = None,
    slurm: Mapping[str, Any] | None = None,
    stream: TextIO | None = sys.stdout,
    poll_s: float = 0.5,
    validate_first: bool = True,
    mode: str = "points",
) -> SweepResult:
    """Runs (or continues) a sweep; see the module docstring.

    Args:
      sweep: the points and their base gin files.
      out_dir: the sweep directory (one run directory per point, and sweep.json).
      launcher: "local", "slurm", or a `Launcher`.
      parallel: points running at once (local) or submitted at once (slurm).
      cache_dir: the shared JAX compilation cache (default OUT_DIR/jax_cache).
      slurm: submitit options (`cluster` and `executor.update_parameters` keywords).
      stream: where the progress display goes (None: silent).
      poll_s: seconds between status checks.
      validate_first: parse every point's bindings before starting (see `validate`).
      mode: "points" (one run per point) or "population" (`sweep.population`).

    Returns:
      The invocation's counts; `failed` is the number of points that failed.

    Raises:
      SweepError: bad input, before anything is written.
    """
    if not isinstance(parallel, int) or parallel < 1:
        raise SweepError(f"--parallel must be a positive integer, got {parallel!r}")
    if mode not in MODES:
        raise SweepError(f"unknown --mode {mode!r} (choose one of {', '.join(MODES)})")
    out_dir = Path(out_dir).absolute()
    previous = _check_out_dir(out_dir, sweep)
    if validate_first:
        validate(sweep)
    groups = None
    if mode == "population":
        from rlhf_jax.sweep.population import group_points

        groups = group_points(sweep)  # refuses an unsupported stage before anything is written
    launch = _make_launcher(launcher, out_dir, slurm)
    cache = Path(cache_dir).absolute() if cache_dir else out_dir / "jax_cache"
    env = {
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        # Cache every program, however quick to compile: the count of misses is then exact.
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    if parallel > 1 and isinstance(launch, LocalLauncher):
        # Points sharing an accelerator must not each grab most of its memory up front.
        env.setdefault(
            "XLA_PYTHON_CLIENT_PREALLOCATE",
            os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "false"),
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    with _sweep_lock(out_dir):
        return _run(
            sweep, out_dir, launch, launcher, parallel, cache, env, previous, stream, poll_s,
            groups,
        )  # fmt: skip


@contextlib.contextmanager
def _sweep_lock(out_dir: Path):
    """One sweep process per directory (a second would run the same points twice)."""
    with open(out_dir / ".sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep process is running in {out_dir}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(
    sweep: Sweep,
    out_dir: Path,
    launch: Launcher,
    launcher: str | Launcher,
    parallel: int,
    cache: Path,
    env: dict[str, str],
    previous: dict | None,
    stream: TextIO | None,
    poll_s: float,
    groups: list | None = None,
) -> SweepResult:
    shared = binding_lines(sweep.bindings)
    old_points = {p["name"]: p for p in (previous or {}).get("points", [])}
    points: list[dict[str, Any]] = []
    for bindings in sweep.points:
        name = point_name(bindings)
        run_dir = out_dir / name
        entry = {
            "name": name,
            "bindings": {k: _json_value(v) for k, v in bindings.items()},
            "run_dir": name,
            "status": "queued",
            "error": None,
            "returncode": None,
            "wall_s": None,
            "new_cache_entries": None,
            "attempts": old_points.get(name, {}).get("attempts", 0),
        }
        if read_summary(run_dir) is not None:
            old = old_points.get(name, {})
            entry.update({k: old.get(k) for k in ("returncode", "wall_s", "new_cache_entries")})
            entry["status"] = "done"
        points.append(entry)
    cache.mkdir(parents=True, exist_ok=True)
    entries_start = count_cache_entries(cache)
    state = {
        "name": sweep.name,
        "fingerprint": sweep.fingerprint(),
        "gin_files": [str(f) for f in sweep.gin_files],
        "bindings": {k: _json_value(v) for k, v in sweep.bindings.items()},
        "launcher": launcher if isinstance(launcher, str) else type(launcher).__name__,
        "mode": "points" if groups is None else "population",
        "points": points,
        "compile": {
            "cache_dir": str(cache),
            "cache_entries": entries_start,
            "new_cache_entries": 0,
        },
    }
    json_path = out_dir / SWEEP_JSON

    def save() -> None:
        state["compile"]["cache_entries"] = count_cache_entries(cache)
        state["compile"]["new_cache_entries"] = state["compile"]["cache_entries"] - entries_start
        state["counts"] = {s: sum(p["status"] == s for p in points) for s in STATUSES}
        state["updated"] = time.time()
        write_json_strict(json_path, state)

    progress = _Progress(stream, len(points), sweep.name or out_dir.name)
    skipped = sum(p["status"] == "done" for p in points)
    if skipped:
        progress.event(f"{skipped} point(s) already finished (summary.json): skipped")
    todo = [p for p in points if p["status"] != "done"]
    active: dict[str, tuple[Any, dict, float, int]] = {}
    save()
    progress.show(state["counts"])
    if groups is not None:
        from rlhf_jax.sweep.population import run_populations

        state["populations"] = [[points[i]["name"] for i in idx] for idx, _ in groups]
        run_populations(
            groups, points, sweep=sweep, out_dir=out_dir, launch=launch, env=env,
            prepare=lambda p: _prepare_point(p, sweep, shared, out_dir, env), save=save,
            progress=progress, poll_s=poll_s, cache_entries=lambda: count_cache_entries(cache),
            finished=lambda run_dir: read_summary(run_dir) is not None,
        )  # fmt: skip
        todo = []  # every point was run by its population
    try:
        while todo or active:
            while todo and len(active) < parallel:
                p = todo.pop(0)
                task = _prepare_point(p, sweep, shared, out_dir, env)
                p["attempts"] += 1
                p.update(status="running", error=None, returncode=None)
                try:
                    handle = launch.start(task)
                except Exception as e:  # noqa: BLE001 (a point that cannot start fails alone)
                    p.update(status="failed", error=f"could not start: {type(e).__name__}: {e}")
                    progress.event(f"FAILED  {p['name']}: {p['error']}")
                    save()
                    continue
                active[p["name"]] = (handle, p, time.time(), count_cache_entries(cache))
                save()
            for name, (handle, p, t0, entries0) in list(active.items()):
                st, rc, err = launch.poll(handle)
                if st != "finished":
                    if p["status"] != st:
                        p["status"] = st
                        save()
                    continue
                del active[name]
                _finish_point(p, out_dir / name, rc, err, time.time() - t0)
                p["new_cache_entries"] = count_cache_entries(cache) - entries0
                if p["status"] == "done":
                    progress.event(f"done    {name} ({p['wall_s']:.0f} s)")
                else:
                    progress.event(f"FAILED  {name}: {p['error']}")
                save()
            progress.show(state["counts"])
            if active:
                time.sleep(poll_s)
    except BaseException:
        # Interrupted: stop the running points (they checkpoint on SIGTERM) and leave them
        # queued, so the same command continues them.
        for handle, p, _, _ in active.values():
            launch.cancel(handle)
            p["status"] = "queued"
        save()
        raise
    save()
    n_new = state["compile"]["new_cache_entries"]
    counts = state["counts"]
    progress.event(
        f"compiles this invocation: {n_new} (new entries in the shared cache {cache}; "
        f"{state['compile']['cache_entries']} in all)"
    )
    progress.event(
        f"{counts['done']} done, {counts['failed']} failed of {len(points)}: {json_path}"
    )
    log.info("sweep %s: %d compiles", sweep.name, n_new)
    return SweepResult(
        done=counts["done"],
        failed=counts["failed"],
        skipped=skipped,
        new_cache_entries=n_new,
        path=json_path,
    )


def _json_value(v: Any) -> Any:
    from rlhf_jax.sweep.spec import GinRef, format_value

    if isinstance(v, GinRef):
        return format_value(v)
    if isinstance(v, tuple):
        return [_json_value(x) for x in v]
    return v


def _prepare_point(
    p: dict, sweep: Sweep, shared: list[str], out_dir: Path, env: dict[str, str]
) -> PointTask:
    run_dir = out_dir / p["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    bindings = sweep.points[[point_name(q) for q in sweep.points].index(p["name"])]
    files = sweep.files(bindings)
    lines = [
        f"# Bindings of sweep point {p['name']} (after the gin files {files}).",
        *shared,
        *binding_lines(bindings),
        f"RUN_DIR = {str(run_dir)!r}",
    ]
    (run_dir / "bindings.gin").write_text("\n".join(lines) + "\n")
    argv = ["train"]
    for f in files:
        argv += ["--gin_file", str(f)]
    argv += ["--gin_file", str(run_dir / "bindings.gin")]
    write_json_strict(
        run_dir / "point.json",
        {
            "name": p["name"],
            "bindings": p["bindings"],
            "gin_files": list(files),
            "argv": argv,
        },  # fmt: skip
    )
    return PointTask(p["name"], run_dir, argv, dict(env), run_dir / "sweep.log")


def _finish_point(p: dict, run_dir: Path, rc: int | None, err: str | None, wall: float) -> None:
    p["returncode"], p["wall_s"] = rc, wall
    if rc == 0 and read_summary(run_dir) is not None:
        p["status"], p["error"] = "done", None
        return
    p["status"] = "failed"
    if rc == 0:
        p["error"] = "exited without writing summary.json (preempted?); re-run to resume"
    else:
        p["error"] = err or f"exit code {rc}: {last_error(run_dir / 'sweep.log')}"


def sweep_status(out_dir: str | Path) -> dict:
    """The sweep.json of a sweep directory.

    Raises:
      SweepError: there is none.
    """
    path = Path(out_dir) / SWEEP_JSON
    if not path.exists():
        raise SweepError(f"{out_dir} holds no {SWEEP_JSON}")
    return json.loads(path.read_text())
