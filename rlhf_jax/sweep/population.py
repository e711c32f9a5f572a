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
--result RESULT.json` (`main`: each member configured by its gin files, `gin_member`, then
`train.population.run_population`), its files in OUT_DIR/populations/. Every member's run
directory is a normal run (bindings.gin, point.json, metrics.jsonl, checkpoints, summary.json);
sweep.json holds the same statuses as the points mode, each point with its population's index. An
interrupted sweep stops the running population (SIGTERM: every member checkpoints) and leaves
its members queued; the same command resumes them.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
from gin import config as gin_config

from rlhf_jax import atomic, gin_utils
from rlhf_jax.errors import UserError
from rlhf_jax.sweep.launchers import Launcher, PointTask, last_error
from rlhf_jax.sweep.spec import Sweep, SweepError, binding_lines, point_name
from rlhf_jax.train.population import (
    Member,
    PopulationError,
    check_supported,
    run_population,
)
from rlhf_jax.train.stage import Recipe, StageCaptured, capture_stage

POPULATIONS_DIR = "populations"
POPULATION_PROGRAM = "import sys; from rlhf_jax.sweep.population import main; sys.exit(main())"

# Parameters that may differ between the members of one population: what each member wires on
# its own (seed: init and data order; run_dir) and the update's traced hyperparameters.
PER_MEMBER_PARAMS = frozenset({"seed", "run_dir", "lr_scale", "debug_nan_step"})
# The gin builders of the algorithms' traced loss hyperparameters (`HParams.loss`).
TRACED_CONFIGURABLES = frozenset({"dpo_hparams", "reward_hparams", "rl_hparams"})
Group = tuple[list[int], str | None]  # (indices of the sweep's points, error of a bad point)


def capture(name: str, gin_files: Sequence[str], bindings: Sequence[str]) -> tuple[Recipe, dict]:
    """Parses a member's gin and returns the recipe and `run_stage` arguments its stage builds
    (nothing is trained; gin holds the member's configuration afterwards).

    Raises:
      UserError: bad gin or settings; PopulationError: a stage population mode cannot train.
    """
    from rlhf_jax import commands

    gin.clear_config()
    commands.parse_gin(list(gin_files), list(bindings))
    with capture_stage():
        try:
            commands.train_command()
        except StageCaptured as c:
            check_supported(c.recipe)
            return c.recipe, c.kwargs
    raise PopulationError(
        f"{name}: its stage (train.stage) ran without the generic stage "
        "(train.stage.run_stage): population mode trains only stages built on it"
    )


def gin_member(name: str, gin_files: Sequence[str], bindings: Sequence[str] = ()) -> Member:
    """A population member configured by gin files and bindings, as `rlhf-jax train` would be."""
    return Member(name, functools.partial(capture, name, list(gin_files), list(bindings)))


def _resolve(value: Any, macros: dict[str, Any]) -> Any:
    """A parsed gin value with macro references replaced by their values."""
    if isinstance(value, gin_config.ConfigurableReference):
        sel = value.scoped_selector
        if sel.endswith("/gin.macro"):
            return _resolve(macros.get(sel[: -len("/gin.macro")]), macros)
        return f"@{sel}{'()' if value.evaluate else ''}"
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, macros) for v in value)
    if isinstance(value, dict):
        return {k: _resolve(v, macros) for k, v in value.items()}
    return value


def static_gin_key() -> str:
    """The parsed gin configuration (macros resolved) without what members may differ in
    (`PER_MEMBER_PARAMS`, the parameters of `TRACED_CONFIGURABLES`): equal keys mean the
    same program."""
    macros = gin_utils.macros()
    lines = []
    for (scope, sel), params in sorted(gin_config._CONFIG.items()):
        if sel == "gin.macro" or sel.rsplit(".", 1)[-1] in TRACED_CONFIGURABLES:
            continue
        for name, value in sorted(params.items()):
            if name not in PER_MEMBER_PARAMS:
                lines.append(f"{scope}/{sel}.{name} = {_resolve(value, macros)!r}")
    return "\n".join(lines)


def static_signature(name: str, gin_files: Sequence[str], bindings: Sequence[str]) -> str:
    """What must be equal for members to share one program: the static gin configuration and
    the algorithm object (a traced value may switch a static path, e.g. RPO_ALPHA = 0 or not).

    Raises:
      UserError: bad gin or settings; PopulationError: an unsupported stage.
    """
    recipe, _ = capture(name, gin_files, bindings)
    return f"{recipe.name}\n{recipe.algorithm!r}\n{static_gin_key()}"


def group_points(sweep: Sweep) -> list[Group]:
    """The sweep's points grouped into populations, in order of first appearance; a point whose
    stage cannot be built (bad settings) is a group of its own with its error.

    Raises:
      SweepError: a point's stage is not supported in population mode.
    """
    shared = binding_lines(sweep.bindings)
    groups: dict[str, list[int]] = {}
    bad: list[Group] = []
    try:
        for i, p in enumerate(sweep.points):
            # One placeholder RUN_DIR for all: a point's own RUN_DIR is per member anyway.
            lines = [*shared, *binding_lines(p), "RUN_DIR = '/sweep/point'"]
            try:
                key = static_signature(point_name(p), sweep.files(p), lines)
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
    finished: Callable[[Path], bool],
) -> None:
    """Runs the unfinished members of each population, one population at a time, updating the
    points' entries of sweep.json (`points`) and saving them (`save`) as they change.

    Args:
      groups: `group_points(sweep)`.
      points: sweep.json's point entries, in the sweep's order.
      prepare: writes a point's bindings.gin and point.json (the points mode's own).
      cache_entries: the shared compilation cache's entry count (compiles = entries added).
      finished: whether a run directory holds a finished run (its summary.json).
    """

    point_of = dict(zip(sweep.names, sweep.points, strict=True))
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
            gin_files = [*sweep.files(point_of[p["name"]]), str(task.run_dir / "bindings.gin")]
            members.append({"name": p["name"], "gin_files": gin_files, "bindings": []})
        pop_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(job, {"sweep": sweep.name, "population": k, "members": members})
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
            if finished(out_dir / p["run_dir"]):
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


def _process_index() -> int:
    import jax

    return jax.process_index()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -c POPULATION_PROGRAM JOB.json [--result OUT.json]`: one population of a sweep.

    JOB.json: `{"members": [{"name", "gin_files", "bindings"}]}`. OUT.json (written at the
    end): `{name: {"status", "error"}}`. Exit code 0 when no member failed, 1 when some did,
    2 for bad input (one message).
    """
    p = argparse.ArgumentParser(prog="rlhf-jax population")
    p.add_argument("job")
    p.add_argument("--result", default=None)
    args = p.parse_args(argv)
    # force: the imports above (orbax, absl) may have put a handler on the root logger already.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    from rlhf_jax import partitioning, settings

    try:
        partitioning.initialize_distributed(*settings.distributed(None, None, None))
        job = json.loads(Path(args.job).read_text())
        members = [gin_member(m["name"], m["gin_files"], m["bindings"]) for m in job["members"]]
        results = run_population(members)
    except UserError as e:
        print(f"rlhf-jax: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        return 2
    if args.result and _process_index() == 0:
        report = {r.name: {"status": r.status, "error": r.error} for r in results}
        atomic.write_json(Path(args.result), report)
    return 1 if any(r.status == "failed" for r in results) else 0
