"""`rlhf-jax sweep ... --mode population`: the sweep's points grouped into populations, each
trained as one vmapped program (`train.population`).

`group_points` puts points in one population when they differ only in what a population
member may (seeds, RUN_DIR, the update's `lr_scale` and the algorithm's traced loss
hyperparameters such as DPO's β or label smoothing), judged on each point's parsed gin
configuration with its macros resolved, plus its algorithm object (a traced value can switch a
static path, e.g. RPO_ALPHA = 0 or not). Points that differ in anything else (a loss type, the
learning rate, the batch size, the number of steps) form separate populations, run one after
another. A point whose settings are bad is recorded as failed with its error, alone; a stage
population mode cannot train (the online RL stage) is refused before anything is written.

`run_populations` launches each population as one job of the sweep's launcher (a subprocess
with the local launcher, one SLURM job with submitit): `python -c POPULATION_PROGRAM JOB.json
--result RESULT.json`, its files in OUT_DIR/populations/. Every member's run directory is a
normal run (bindings.gin, point.json, metrics.jsonl, checkpoints, summary.json); sweep.json
holds the same statuses as the points mode, each point with its population's index. An
interrupted sweep stops the running population (SIGTERM: every member checkpoints) and leaves
its members queued; the same command resumes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_jax.errors import UserError
from rlhf_jax.sweep.launchers import Launcher, PointTask, last_error
from rlhf_jax.sweep.spec import Sweep, SweepError, binding_lines, point_name

POPULATIONS_DIR = "populations"
Group = tuple[list[int], str | None]  # (indices of the sweep's points, error of a bad point)


def group_points(sweep: Sweep) -> list[Group]:
    """The sweep's points grouped into populations, in order of first appearance; a point whose
    stage cannot be built (bad settings) is a group of its own with its error.

    Raises:
      SweepError: a point's stage is not supported in population mode.
    """
    import gin

    from rlhf_jax.train.population import Member, PopulationError, static_signature

    shared = binding_lines(sweep.bindings)
    groups: dict[str, list[int]] = {}
    bad: list[Group] = []
    try:
        for i, p in enumerate(sweep.points):
            # One placeholder RUN_DIR for all: a point's own RUN_DIR is per member anyway.
            lines = [*shared, *binding_lines(p), "RUN_DIR = '/sweep/point'"]
            try:
                key = static_signature(Member(point_name(p), list(sweep.gin_files), lines))
            except PopulationError as e:
                raise SweepError(f"point {point_name(p)}: {e}") from None
            except UserError as e:
                # gin appends "In call to configurable ..." lines: the first line is the error.
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                bad.append(([i], f"{type(e).__name__}: {first}"))
                continue
            groups.setdefault(key, []).append(i)
    finally:
        gin.clear_config()
    return [(idx, None) for idx in groups.values()] + bad


def run_populations(
    groups: list[Group],
    points: list[dict[str, Any]],
    *,
    sweep: Sweep,
    out_dir: Path,
    launch: Launcher,
    env: dict[str, str],
    prepare: Callable[[dict], PointTask],
    save: Callable[[], None],
    progress: Any,
    poll_s: float,
    cache_entries: Callable[[], int],
) -> None:
    """Runs the unfinished members of each population, one population at a time, updating the
    points' entries of sweep.json (`points`) and saving them (`save`) as they change.

    Args:
      groups: `group_points(sweep)`.
      points: sweep.json's point entries, in the sweep's order.
      prepare: writes a point's bindings.gin and point.json (the points mode's own).
      cache_entries: the shared compilation cache's entry count (compiles = entries added).
    """
    from rlhf_jax.sweep.launch import read_summary, write_json_strict
    from rlhf_jax.train.population import POPULATION_PROGRAM

    for k, (indices, error) in enumerate(groups):
        for i in indices:
            points[i]["population"] = k
        todo = [points[i] for i in indices if points[i]["status"] != "done"]
        if not todo:
            continue
        if error is not None:
            for p in todo:
                p["attempts"] += 1
                p.update(status="failed", error=error, returncode=2)
                progress.event(f"FAILED  {p['name']}: {error}")
            save()
            continue
        pop_dir = out_dir / POPULATIONS_DIR
        job, result, log_path = (pop_dir / f"population-{k}{ext}"
                                 for ext in (".json", ".result.json", ".log"))  # fmt: skip
        members = []
        for p in todo:
            task = prepare(p)
            gin_files = [*sweep.gin_files, str(task.run_dir / "bindings.gin")]
            members.append({"name": p["name"], "gin_files": gin_files, "bindings": []})
        write_json_strict(job, {"sweep": sweep.name, "population": k, "members": members})
        result.unlink(missing_ok=True)
        task = PointTask(f"population-{k}", pop_dir, [str(job), "--result", str(result)],
                         dict(env), log_path, program=POPULATION_PROGRAM)  # fmt: skip
        for p in todo:
            p["attempts"] += 1
            p.update(status="running", error=None, returncode=None)
        t0, entries0 = time.time(), cache_entries()
        try:
            handle = launch.start(task)
        except Exception as e:  # noqa: BLE001 (a population that cannot start fails alone)
            for p in todo:
                p.update(status="failed", error=f"could not start: {type(e).__name__}: {e}")
            progress.event(f"FAILED  population-{k}: could not start: {e}")
            save()
            continue
        progress.event(
            f"population-{k}: {len(todo)} member(s) as one program: "
            + ", ".join(p["name"] for p in todo)
        )
        save()
        try:
            while True:
                st, rc, err = launch.poll(handle)
                if st == "finished":
                    break
                for p in todo:
                    if p["status"] != st:
                        p["status"] = st
                        save()
                progress.show({s: sum(q["status"] == s for q in points)
                               for s in ("done", "running", "failed", "queued")})  # fmt: skip
                time.sleep(poll_s)
        except BaseException:
            # Interrupted: the population checkpoints every member on SIGTERM; the same command
            # continues them.
            launch.cancel(handle)
            for p in todo:
                p["status"] = "queued"
            save()
            raise
        wall, n_new = time.time() - t0, cache_entries() - entries0
        reported = json.loads(result.read_text()) if result.exists() else {}
        for p in todo:
            p.update(returncode=rc, wall_s=wall, new_cache_entries=n_new)
            if read_summary(out_dir / p["run_dir"]) is not None:
                p.update(status="done", error=None)
                progress.event(f"done    {p['name']} (population-{k}, {wall:.0f} s)")
                continue
            mine = reported.get(p["name"], {})
            if mine.get("error"):
                p["error"] = mine["error"]
            elif rc == 0:
                p["error"] = "exited without writing summary.json (preempted?); re-run to resume"
            else:
                p["error"] = err or f"exit code {rc}: {last_error(log_path)}"
            p["status"] = "failed"
            progress.event(f"FAILED  {p['name']}: {p['error']}")
        save()
