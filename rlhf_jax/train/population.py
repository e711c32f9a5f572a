"""Populations: runs of one stage that differ only in traced hyperparameters and seeds, trained as
ONE program `vmap`ped over a leading population axis.

A member is configured exactly as a single run is (`Member.configure`: the sweep parses its gin
files and lets the gin stage function build its `Recipe` without running it,
`train.stage.capture_stage`). `run_population(members)`:

1. per member: configures it, checks it, takes the run-directory lock and wires the stage
   (`train.stage.build_stage`: the data in its seed's order, model, optimiser, state factory,
   reference cache); then the loop's own per-run bookkeeping (`train.loop._Run`) restores the
   member's newest checkpoint or initialises it;
2. checks that the members agree on everything static (algorithm, loop settings, mesh, state
   shapes) and stacks their states, traced hyperparameters (`HParams`: the loss's and the
   update's `lr_scale`) and rngs along a new leading axis, replicated over the mesh (inside, each
   member keeps a single run's sharding);
3. jits `vmap(train_step)` once: each member its own batch (batches of different buckets are
   right-padded to one length), state, hparams and rng; frozen models are shared when they come
   from one run (INIT_FROM), else stacked;
4. per member, at the steps a single run would: metrics.jsonl, eval (on the member's state with
   the single run's eval program), checkpoints (the member's slice: exactly a single run's
   checkpoint, which `rlhf-jax train` resumes, exports and evaluates), config.gin and, last,
   summary.json.

Faults: SIGTERM checkpoints every member and returns (re-running resumes them). A member whose
loss or gradients go non-finite under `nonfinite_policy='halt'` is recorded as failed (no later
metrics, checkpoints or summary) and the others go on: `vmap` keeps members independent, so its
NaNs cannot reach them (under 'skip' its update is dropped, as in a single run).

Limits: algorithms that run their own iteration (`Algorithm.update` overridden: the online RL
stage) are not supported yet; every member of a population must be at the same step (they are
unless one was resumed or run on its own in between).

The sweep (`sweep.population`) groups points into populations and launches each as one job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from rlhf_jax import partitioning
from rlhf_jax.errors import UserError
from rlhf_jax.steps.algorithm import Algorithm
from rlhf_jax.steps.state import describe_nonfinite_kind
from rlhf_jax.train import faults
from rlhf_jax.train.loop import _due, _Run
from rlhf_jax.train.metrics import Throughput
from rlhf_jax.train.stage import BuiltStage, Recipe, build_stage, check_stage

log = logging.getLogger(__name__)

HostBatch = dict[str, np.ndarray]


class PopulationError(UserError):
    """Members that cannot form one population, or a stage population mode cannot train."""


@dataclasses.dataclass
class Member:
    """One member.

    Attributes:
      name: a label (the sweep point's name).
      configure: sets gin to the member's configuration and returns the recipe and `run_stage`
        arguments its stage builds (`sweep.population.gin_member` parses its gin files and
        captures them with `train.stage.capture_stage`); `run_population` wires the member
        while gin holds that configuration.
    """

    name: str
    configure: Callable[[], tuple[Recipe, dict[str, Any]]]


@dataclasses.dataclass
class MemberResult:
    """How a member ended: "done", "preempted" or "failed" (with `error`)."""

    name: str
    status: str
    error: str | None = None
    summary: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- capture and checks


def check_supported(recipe: Recipe) -> None:
    """Raises `PopulationError` for a stage population mode cannot train yet."""
    if type(recipe.algorithm).update is not Algorithm.update:
        raise PopulationError(
            f"--mode population does not support the {recipe.name} stage yet: its algorithm "
            "runs its own iteration (online RL: rollouts, scoring, several updates); run its "
            "points with --mode points"
        )


def _check_static(setups: list[_Setup]) -> None:
    first = setups[0].built
    for s in setups[1:]:
        b = s.built
        problems = []
        if b.recipe.algorithm != first.recipe.algorithm:
            problems.append(f"algorithm {b.recipe.algorithm} != {first.recipe.algorithm}")
        if b.loop_cfg != first.loop_cfg:
            problems.append(f"loop settings {b.loop_cfg} != {first.loop_cfg}")
        if b.ctx.mesh != first.ctx.mesh or b.ctx.batch_size != first.ctx.batch_size:
            problems.append("mesh or batch size")
        shapes = [[(x.shape, x.dtype) for x in jax.tree.leaves(y.spec.state.abstract)]
                  for y in (b, first)]  # fmt: skip
        if shapes[0] != shapes[1]:
            problems.append("state shapes (model or optimiser)")
        if problems:
            raise PopulationError(
                f"members {setups[0].member.name} and {s.member.name} differ in static settings "
                f"({'; '.join(problems)}): they cannot share one program"
            )


# ----------------------------------------------------------------------------- batches


def stack_batches(batches: Sequence[HostBatch]) -> HostBatch:
    """Host batches of the members stacked on a new leading axis; arrays of different lengths
    are right-padded with zeros (masks 0: padding a causal model's batch on the right leaves its
    real positions unchanged). Non-array entries are dropped, as `make_global_batch` does.

    Raises:
      PopulationError: batches with different fields or row counts.
    """
    keys = sorted(batches[0])
    out = {}
    for b in batches[1:]:
        if sorted(b) != keys:
            raise PopulationError(f"members' batches have different fields: {sorted(b)} != {keys}")
    for k in keys:
        arrs = [b[k] for b in batches]
        if not isinstance(arrs[0], np.ndarray) or arrs[0].dtype == object:
            continue
        if len({(a.ndim, a.shape[0]) for a in arrs}) != 1:
            raise PopulationError(f"members' batches differ in rows or rank of {k!r}")
        target = np.max([a.shape for a in arrs], axis=0)
        arrs = [np.pad(a, [(0, int(t) - n) for n, t in zip(a.shape, target, strict=True)])
                for a in arrs]  # fmt: skip
        out[k] = np.stack(arrs)
    return out


def population_batch(local: HostBatch, mesh) -> dict[str, jax.Array]:
    """Global arrays of a stacked host batch: members replicated, rows over (data, fsdp)."""
    out = {}
    for name, arr in local.items():
        rows = arr.shape[1] * jax.process_count()
        partitioning.check_batch_divisible(rows, mesh)
        spec = PartitionSpec(None, partitioning.BATCH_AXES, *([None] * (arr.ndim - 2)))
        out[name] = jax.make_array_from_process_local_data(
            NamedSharding(mesh, spec), arr, (arr.shape[0], rows, *arr.shape[2:])
        )
    return out


def _stack_trees(*trees: Any) -> Any:
    # Leaf by leaf under the first tree's structure: members' static fields (optax
    # transformations, schedules, graphdefs) are equal in value but distinct objects.
    leaves = [jax.tree.leaves(t) for t in trees]
    stacked = [jnp.stack(a) for a in zip(*leaves, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(trees[0]), stacked)


def _stacked_sharding(s: Any) -> Any:
    if isinstance(s, NamedSharding):
        return NamedSharding(s.mesh, PartitionSpec(None, *s.spec))
    raise PopulationError(f"population mode needs named shardings, got {type(s).__name__}")


# ----------------------------------------------------------------------------- the population


@dataclasses.dataclass
class _Setup:
    member: Member
    built: BuiltStage
    config: str  # gin.config_str() of the member (RUN_DIR/config.gin at the start)
    operative: str  # its operative config once wired (RUN_DIR/config.gin at the end)


class _NoBar:
    def set_postfix(self, **_: Any) -> None:
        pass


class _MemberRun(_Run):
    """A single run's bookkeeping (checkpoints, metrics, eval, summary) for one member; its
    state is its slice of the population's stacked state."""

    def __init__(self, setup: _Setup, pop: _Population, index: int):
        b = setup.built
        super().__init__(b.spec, b.loop_cfg, b.ctx.run_dir, b.ctx.mesh, b.ctx.seed)
        self.setup, self.pop, self.index = setup, pop, index
        self.failed: str | None = None
        self.thr = Throughput()

    @property
    def state(self) -> Any:
        if self.pop.stacked is None:
            return self._state
        return self.pop.member_state(self.index)

    @state.setter
    def state(self, value: Any) -> None:
        self._state = value

    def write_config(self, operative: bool = False) -> None:
        from rlhf_jax import atomic, rundir

        text = self.setup.operative if operative else self.setup.config
        atomic.write_text(self.run_dir / rundir.CONFIG_FILE, text)

    def check_nonfinite(self) -> None:
        skipped, last_step, kind = self.pop.member_nonfinite(self.index)
        if skipped == self.known_skipped:
            return
        what = describe_nonfinite_kind(kind)
        if self.cfg.nonfinite_policy == "halt":
            raise faults.NonFiniteError(last_step, what, self.last_saved)
        log.warning("%s: non-finite %s at step %d: update skipped (%d skipped so far)",
                    self.setup.member.name, what, last_step, skipped)  # fmt: skip
        self.known_skipped = skipped

    def evaluate(self) -> dict[str, float]:
        # One eval program for every member (their algorithms are equal): compiled once.
        if self.jeval is None:
            self.jeval = self.pop.jeval
        out = super().evaluate()
        self.pop.jeval = self.jeval
        return out


class _Population:
    def __init__(self, setups: list[_Setup]):
        self.setups = setups
        self.cfg = setups[0].built.loop_cfg
        self.mesh = setups[0].built.ctx.mesh
        self.rep = NamedSharding(self.mesh, PartitionSpec())
        self.stacked: Any = None
        self.version = 0
        self._cache: dict[Any, Any] = {}
        self.jeval = None
        self.jstep = None
        self.step_traces = 0
        self.runs = [_MemberRun(s, self, i) for i, s in enumerate(setups)]

    # ---------------------------------------------------------------- start
    def start(self) -> list[MemberResult]:
        """Restores or initialises every member; returns those already complete."""
        first = self.setups[0].built
        self.shared_frozen = first.ctx.init_from is not None
        for i, r in enumerate(self.runs):
            if i and self.shared_frozen:  # one copy of the frozen models for all
                r.spec = dataclasses.replace(r.spec, frozen=None)
            r.start()
            if i and self.shared_frozen:
                r.frozen = self.runs[0].frozen
        done = []
        for r in list(self.runs):
            path = r.run_dir / "summary.json"
            if path.exists() and r.step >= r.cfg.train_steps:
                log.info("%s is complete (summary.json); nothing to do", r.run_dir)
                done.append(MemberResult(r.setup.member.name, "done", None,
                                         json.loads(path.read_text())))  # fmt: skip
                self.runs.remove(r)
            elif path.exists() and jax.process_index() == 0:
                path.unlink()  # the run is being extended: it is no longer done
        steps = {r.step for r in self.runs}
        if len(steps) > 1:
            at = ", ".join(f"{r.setup.member.name} at step {r.step}" for r in self.runs)
            raise PopulationError(
                f"the members' checkpoints are at different steps ({at}): a population starts "
                "its members together; finish them with --mode points"
            )
        self.step = steps.pop() if steps else 0
        return done

    def stack(self) -> None:
        runs = self.runs
        member_sh = runs[0].spec.state.shardings
        self.state_sh = jax.tree.map(_stacked_sharding, member_sh)
        stack = _stack_trees
        self.stacked = jax.jit(stack, out_shardings=self.state_sh)(*[r._state for r in runs])
        for r in runs:
            r._state = None
        self.hp = jax.jit(stack, out_shardings=self.rep)(*[r.hp for r in runs])
        self.rng = jax.jit(stack, out_shardings=self.rep)(*[r.rng for r in runs])
        self.frozen_axis = None
        self.frozen = runs[0].frozen
        if not self.shared_frozen and runs[0].frozen.params:
            self.frozen_axis = 0
            sh = jax.tree.map(lambda x: _stacked_sharding(x.sharding), runs[0].frozen)
            self.frozen = jax.jit(stack, out_shardings=sh)(*[r.frozen for r in runs])
        self._slice = jax.jit(lambda s, i: jax.tree.map(lambda x: x[i], s), out_shardings=member_sh)

    def member_state(self, i: int) -> Any:
        key = ("state", i, self.version)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[-1] == self.version}
            self._cache[key] = self._slice(self.stacked, jnp.asarray(i, jnp.int32))
        return self._cache[key]

    def member_nonfinite(self, i: int) -> tuple[int, int, int]:
        if self.stacked is None:
            nf = jax.device_get(self.runs[i]._state.nonfinite)
            return int(nf.skipped), int(nf.last_step), int(nf.last_kind)
        key = ("nonfinite", self.version)
        if key not in self._cache:
            self._cache[key] = jax.device_get(self.stacked.nonfinite)
        nf = self._cache[key]
        return int(nf.skipped[i]), int(nf.last_step[i]), int(nf.last_kind[i])

    # ---------------------------------------------------------------- the step
    def compile_step(self, batch: dict[str, jax.Array]) -> None:
        step_fn = self.runs[0].spec.step_fn
        axes = (0, self.frozen_axis, 0, 0, 0)

        def counted(state, frozen, batch, rng, hp):
            self.step_traces += 1  # runs at trace time only
            return jax.vmap(step_fn, in_axes=axes)(state, frozen, batch, rng, hp)

        frozen_sh = jax.tree.map(lambda x: x.sharding, self.frozen)
        batch_sh = {k: v.sharding for k, v in batch.items()}
        self.jstep = jax.jit(
            counted,
            in_shardings=(self.state_sh, frozen_sh, batch_sh, self.rep, self.rep),
            out_shardings=(self.state_sh, self.rep),
            donate_argnums=0,
        )

    def train_step(self) -> None:
        locals_ = [next(r.spec.train_data) for r in self.runs]
        stacked = stack_batches(locals_)
        batch = population_batch(stacked, self.mesh)
        first_call = self.jstep is None
        if first_call:
            self.compile_step(batch)
        shape = tuple((k, v.shape[1:]) for k, v in sorted(batch.items()))
        self.stacked, self.metrics = self.jstep(self.stacked, self.frozen, batch, self.rng, self.hp)
        self.version += 1
        self.step += 1
        n = jax.process_count()
        for r, local in zip(self.runs, locals_, strict=True):
            r.step, r.step_traces = self.step, self.step_traces
            r.batch_shapes.add(shape)
            if first_call:
                r.thr.reset()  # that call compiled: keep it out of the throughput
            else:
                fl = r.spec.flops_per_batch(local) * n if r.spec.flops_per_batch else None
                r.thr.add(r.spec.count_tokens(local) * n, fl)
        last = self.step == self.cfg.train_steps
        if _due(self.step, self.cfg.log_every) or last:
            host = jax.device_get(self.metrics)
            for i, r in enumerate(self.runs):
                r.metrics = {k: v[i] for k, v in host.items()}

    # ---------------------------------------------------------------- the loop
    def run(self, handler: faults.PreemptionHandler) -> list[MemberResult]:
        cfg, runs = self.cfg, self.runs
        results: dict[str, MemberResult] = {}
        if not runs:
            return []
        if jax.process_index() == 0:
            for r in runs:
                r.write_config()
        self.stack()
        t0 = time.time()
        for r in runs:
            r.t0 = t0
            r.thr.reset()
        bar = tqdm(total=cfg.train_steps, initial=self.step, desc=f"population of {len(runs)}",
                   disable=not cfg.progress_bar or jax.process_index() != 0,
                   dynamic_ncols=True)  # fmt: skip

        def fail(r: _MemberRun, e: Exception) -> None:
            r.failed = str(e)
            log.error("population member %s failed: %s", r.setup.member.name, e)
            results[r.setup.member.name] = MemberResult(r.setup.member.name, "failed", str(e))

        with bar:
            while self.step < cfg.train_steps:
                if runs[0].preemption_requested(handler):
                    for r in runs:
                        if r.failed is None:
                            try:
                                r.save()
                            except faults.NonFiniteError as e:
                                fail(r, e)
                    for r in runs:
                        r.ckpt.wait()
                    log.warning("preempted: checkpoints of step %d saved; exiting", self.step)
                    for r in runs:
                        name = r.setup.member.name
                        results.setdefault(name, MemberResult(name, "preempted"))
                    return list(results.values())
                if cfg.fault_signal and self.step == cfg.fault_signal_step:
                    faults.inject_signal(cfg.fault_signal)
                self.train_step()
                bar.update(1)
                for r in runs:
                    if r.failed is None:
                        try:
                            r.after_step(r.thr, _NoBar())
                        except faults.NonFiniteError as e:
                            fail(r, e)
        for r in runs:
            r.ckpt.wait()
        if cfg.fault_signal and self.step == cfg.fault_signal_step:
            faults.inject_signal(cfg.fault_signal)
        wall = time.time() - t0
        for r in runs:
            if r.failed is not None:
                continue
            result = r.finish(wall + r.prior_wall_s)
            r.setup.built.recipe.finish(r.setup.built.ctx, result.summary)
            name = r.setup.member.name
            results[name] = MemberResult(name, "done", None, result.summary)
        return list(results.values())

    def close(self) -> None:
        for r in self.runs:
            r.close()


def run_population(members: Sequence[Member]) -> list[MemberResult]:
    """Trains `members` as one vmapped program (see the module docstring).

    Returns:
      One `MemberResult` per member, in order.

    Raises:
      UserError: bad settings of a member, members that differ in static settings, or an
        unsupported stage (before anything trains).
    """
    if logging.getLogger("absl").level == logging.NOTSET:
        logging.getLogger("absl").setLevel(logging.WARNING)
    if not members:
        raise PopulationError("a population needs at least one member")
    with contextlib.ExitStack() as stack:
        setups = []
        for m in members:
            recipe, kwargs = m.configure()
            check_supported(recipe)
            check_stage(recipe, **kwargs)
            stack.enter_context(faults.RunLock(Path(kwargs["run_dir"])))
            built = build_stage(recipe, **kwargs)
            setups.append(_Setup(m, built, gin.config_str(), gin.operative_config_str()))
        _check_static(setups)
        ctx = setups[0].built.ctx
        with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):
            pop = _Population(setups)
            try:
                with faults.PreemptionHandler() as handler:
                    done = pop.start()
                    log.info("population of %d member(s) (%d already complete) at step %d",
                             len(members), len(done), pop.step)  # fmt: skip
                    results = {r.name: r for r in [*done, *pop.run(handler)]}
            finally:
                pop.close()
    return [results[m.name] for m in members]
