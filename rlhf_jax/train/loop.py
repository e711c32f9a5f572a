"""The generic host loop that drives any stage's pure step.

A stage (SFT, reward model, DPO, ...) describes itself with a `LoopSpec`: its step function
(static config already bound), how to create or restore its state, its frozen models, its
traced hyperparameters, its data, and optionally an eval function. `train_loop(spec, cfg, ...)`
then:

1. restores the newest clean checkpoint of RUN_DIR (state, hparams, rng, data position, host
   controller state) or initialises the state directly into its shardings, and loads the frozen
   models (never checkpointed: they are loaded from where they came from every time);
2. jits the step once, inside `jax.set_mesh(mesh)` and `nnx.logical_axis_rules(rules)`, with
   explicit in/out shardings and `donate_argnums=0` (the state only: frozen models are never
   donated; a trace counter guards recompilation). The loop counts iterations; an iteration
   may take several optimiser steps (`optimizer_steps_per_iteration`). An iteration around
   host-side work (a judge that runs on the host) is a `HostSplit`: two programs, the host
   function between them;
3. feeds global batches (`partitioning.make_global_batch`, each process its own rows), shows a
   tqdm bar, logs to metrics.jsonl + TensorBoard, evaluates and checkpoints periodically;
4. handles faults: SIGTERM -> checkpoint and return (exit 0); non-finite loss/gradients ->
   skip the update or halt with `NonFiniteError`; a killed run resumes bitwise-identically;
5. at the end writes the operative gin config and, last and atomically, summary.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gin
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from rlhf_jax import atomic, partitioning, rundir, settings
from rlhf_jax.errors import SettingsError
from rlhf_jax.rundir import CHECKPOINT_DIR
from rlhf_jax.steps.state import Frozen, StateFactory, describe_nonfinite_kind
from rlhf_jax.train import faults
from rlhf_jax.train.checkpoint import Checkpointer, replicated
from rlhf_jax.train.metrics import MetricsWriter, Throughput, to_python, write_json_atomic

log = logging.getLogger(__name__)

HostBatch = dict[str, np.ndarray]
StepFn = Callable[[Any, Frozen, dict, jax.Array, Any], tuple[Any, dict]]
EvalFn = Callable[[Any, Frozen, dict, jax.Array, Any], dict]


@dataclasses.dataclass(frozen=True)
class HostSplit:
    """One iteration as two programs around host-side work (e.g. a judge that only runs on
    the host): `before` -> fetch `to_host` -> `host` -> place its result -> `after`.

    Attributes:
      before: `(state, frozen, batch, rng, hparams) -> (carry, to_host)`, pure: the first
        program (it must not change the state). `carry` stays on the devices for `after`;
        `to_host` (e.g. token ids, never parameters) is fetched to the host.
      host: numpy `to_host` -> numpy pytree (e.g. one score per row); runs in the loop's
        thread between the two programs, outside any trace.
      after: `(state, frozen, carry, from_host, rng, hparams) -> (state, metrics)`, pure: the
        second program (the state is donated to it; `from_host` arrives replicated).
      timing: three metric names for the wall time (s) of `before`, `host` and `after`,
        measured on the host (the iteration then waits for `after` to finish; the first
        iteration's include compiling), or None.
    """

    before: Callable[..., tuple[Any, Any]]
    host: Callable[[Any], Any]
    after: Callable[..., tuple[Any, dict]]
    timing: tuple[str, str, str] | None = None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Host-loop settings (gin: `LoopConfig.log_every = 10`, ...).

    Attributes:
      train_steps: total iterations of the run (a resumed run stops at the same one); one
        optimiser step each for SFT, RM and DPO.
      log_every: steps between metric records (and host syncs).
      eval_every: steps between evals (0: only at the end).
      eval_batches: cap on eval batches per eval (None: the whole eval split).
      checkpoint_every: steps between checkpoints (0: only at the end and on preemption).
      keep_last / keep_best / best_metric / best_mode: retention (see train.checkpoint).
      async_checkpointing: write checkpoints in the background.
      nonfinite_policy: "skip" (drop the update, count it) or "halt" (raise NonFiniteError).
      progress_bar: show tqdm on process 0.
      tensorboard: also write RUN_DIR/tb/.
      fault_signal / fault_signal_step: test hook: send this signal (e.g. "SIGKILL") to the
        process just before running step `fault_signal_step` (= train_steps: after the final
        checkpoint, before summary.json).
    """

    train_steps: int = 100
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int | None = None
    checkpoint_every: int = 0
    keep_last: int = 2
    keep_best: int = 1
    best_metric: str | None = "eval/loss"
    best_mode: str = "min"
    async_checkpointing: bool = True
    nonfinite_policy: str = "skip"
    progress_bar: bool = True
    tensorboard: bool = True
    fault_signal: str | None = None
    fault_signal_step: int = -1

    def __post_init__(self):
        validate_loop_config(self)


def validate_loop_config(cfg: LoopConfig) -> None:
    """Type and range of every loop setting (raises `errors.SettingsError` naming it)."""
    n = "LoopConfig."
    settings.positive_int(n + "train_steps (TRAIN_STEPS)", cfg.train_steps)
    settings.positive_int(n + "log_every", cfg.log_every)
    settings.nonneg_int(n + "eval_every (EVAL_EVERY)", cfg.eval_every)
    if cfg.eval_batches is not None:
        settings.nonneg_int(n + "eval_batches", cfg.eval_batches)
    settings.nonneg_int(n + "checkpoint_every (CHECKPOINT_EVERY)", cfg.checkpoint_every)
    settings.positive_int(n + "keep_last", cfg.keep_last)
    settings.nonneg_int(n + "keep_best", cfg.keep_best)
    settings.choice(n + "best_mode", cfg.best_mode, ("min", "max"))
    settings.choice(n + "nonfinite_policy", cfg.nonfinite_policy, faults.NONFINITE_POLICIES)
    settings.integer(n + "fault_signal_step", cfg.fault_signal_step)
    for flag in ("async_checkpointing", "progress_bar", "tensorboard"):
        settings.boolean(n + flag, getattr(cfg, flag))
    if cfg.best_metric is not None and not isinstance(cfg.best_metric, str):
        raise SettingsError(f"{n}best_metric={cfg.best_metric!r} must be a metric name or None")


def count_real_tokens(batch: HostBatch) -> float:
    """Default token count of a host batch: the 1s of `attention_mask` (else its size)."""
    mask = batch.get("attention_mask")
    if mask is None:
        mask = next(iter(batch.values()))
        return float(mask.size)
    return float(np.sum(mask))


@dataclasses.dataclass
class LoopSpec:
    """What a stage hands the loop.

    Attributes:
      step_fn: `(state, frozen, batch, rng, hparams) -> (state, metrics)`, pure, static
        config bound; one iteration. Or a `HostSplit`: the iteration in two programs around
        host-side work.
      state: abstract state with shardings + fresh initialiser (`steps.state.state_factory`).
      frozen: returns the frozen models (`steps.state.Frozen`, sharded); called on every
        start, fresh or resumed (None: no frozen models).
      hparams: traced hyperparameters (a pytree of scalars); restored from a checkpoint.
      train_data: iterator of host batches (numpy dicts, this process's rows); if it has
        `state_dict()` / `load_state_dict()` its position is checkpointed, otherwise a resumed
        run skips the batches already consumed.
      eval_fn: `(state, frozen, batch, rng, hparams) -> dict of sums` over one eval batch.
      eval_data: returns a fresh iterable over the eval split each time it is called.
      summarize_eval: host function from summed eval outputs to eval metrics.
      count_tokens: tokens of one host batch (for tokens/s).
      flops_per_batch: model FLOPs of one step on one host batch (for MFU), or None.
      summary_extra: entries added to summary.json (e.g. a baseline).
      host_state / load_host_state: optional JSON state of host-side controllers.
      eval_hook: `(state, step) -> metrics`, a host-side evaluation run at every eval after
        `eval_fn` (e.g. `train.eval_hook.SampleEval`: sample, score with judges, write
        RUN_DIR/samples.jsonl); its metrics are logged under `eval/`.
    """

    step_fn: StepFn | HostSplit
    state: StateFactory
    hparams: Any
    train_data: Iterator[HostBatch]
    frozen: Callable[[], Frozen] | None = None
    eval_fn: EvalFn | None = None
    eval_data: Callable[[], Iterable[HostBatch]] | None = None
    summarize_eval: Callable[[dict[str, Any]], dict[str, Any]] = dict
    count_tokens: Callable[[HostBatch], float] = count_real_tokens
    flops_per_batch: Callable[[HostBatch], float] | None = None
    summary_extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    host_state: Callable[[], dict[str, Any]] | None = None
    load_host_state: Callable[[dict[str, Any]], None] | None = None
    eval_hook: Callable[[Any, int], dict[str, float]] | None = None


@dataclasses.dataclass
class LoopResult:
    """`status` is "done" or "preempted"; `summary` is None unless done."""

    status: str
    step: int
    state: Any
    summary: dict[str, Any] | None
    step_traces: int


def _same_values(a: Any, b: Any) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _split_step(split: HostSplit, before, after, rep, state, frozen, batch, rng, hp):
    """One iteration of a `HostSplit` with its two jitted programs (see `HostSplit`)."""
    t0 = time.perf_counter()
    carry, to_host = before(state, frozen, batch, rng, hp)
    # The iteration's only transfers, deliberate (a test runs iterations under
    # jax.transfer_guard("disallow_explicit")): what `before` hands the host, and the host
    # function's result back. Parameters stay on their devices.
    with jax.transfer_guard("allow"):
        if all(x.is_fully_addressable for x in jax.tree.leaves(to_host)):
            host_in = jax.device_get(to_host)  # waits for the first program
        else:
            host_in = multihost_utils.process_allgather(to_host, tiled=True)
    t1 = time.perf_counter()
    host_out = jax.tree.map(np.asarray, split.host(host_in))
    with jax.transfer_guard("allow"):
        from_host = jax.tree.map(
            lambda x: jax.make_array_from_callback(x.shape, rep, x.__getitem__), host_out
        )
    t2 = time.perf_counter()
    state, metrics = after(state, frozen, carry, from_host, rng, hp)
    if split.timing is not None:
        jax.block_until_ready((state, metrics))
        t3 = time.perf_counter()
        names = split.timing
        metrics = {**metrics, names[0]: np.float32(t1 - t0), names[1]: np.float32(t2 - t1),
                   names[2]: np.float32(t3 - t2)}  # fmt: skip
    return state, metrics


class _Run:
    """One execution of the loop (keeps the mutable host-side bookkeeping together)."""

    def __init__(self, spec: LoopSpec, cfg: LoopConfig, run_dir: Path, mesh: Mesh, seed: int):
        self.spec, self.cfg, self.run_dir, self.mesh = spec, cfg, run_dir, mesh
        self.rep = replicated(mesh)
        self.base_rng = jax.random.key(seed)
        self.writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard)
        self.ckpt = Checkpointer(
            run_dir / CHECKPOINT_DIR,
            keep_last=cfg.keep_last,
            keep_best=cfg.keep_best,
            best_metric=cfg.best_metric,
            best_mode=cfg.best_mode,
            async_save=cfg.async_checkpointing,
        )
        self.step_traces = 0
        self.programs = 1  # compiled programs per batch shape (2 for a HostSplit)
        self.jeval = None
        self.batch_shapes: set[tuple] = set()
        self.last_eval: dict[str, float] = {}
        self.last_train: dict[str, float] = {}
        self.known_skipped = 0
        self.last_saved: int | None = None
        self.prior_step_traces = self.prior_batch_shapes = 0
        self.prior_wall_s = 0.0
        self.t0 = time.time()

    def check_meta(self, step: int, meta: dict[str, Any]) -> None:
        """Rejects a checkpoint whose data-iterator position cannot be trusted (malformed, out
        of range, or not the position after `step` batches): the restore then falls back to
        the previous checkpoint instead of continuing on a different data order."""
        it = self.spec.train_data
        if not hasattr(it, "load_state_dict"):
            return
        data = meta.get("data")
        if data is None:
            raise ValueError("the checkpoint has no data-iterator position")
        check = getattr(it, "check_state_dict", None)
        if check is not None:
            check(data, batches=step)

    # ---------------------------------------------------------------- start / resume
    def start(self) -> None:
        spec = self.spec
        self.frozen = spec.frozen() if spec.frozen is not None else Frozen()
        restored = self.ckpt.restore(
            spec.state.abstract, spec.hparams, self.base_rng, self.mesh, self.check_meta
        )
        if restored is None:
            # No complete checkpoint: the run starts over, so records of an earlier attempt go.
            self.writer.truncate_after(0)
            self.step = 0
            self.state = spec.state.init()
            self.hp = jax.device_put(spec.hparams, self.rep)
            self.rng = jax.device_put(self.base_rng, self.rep)
            log.info("no checkpoint in %s: starting at step 0", self.ckpt.directory)
            return
        self.step, self.state, self.hp = restored.step, restored.state, restored.hparams
        if not _same_values(restored.hparams, spec.hparams):
            log.warning(
                "the checkpoint's hparams %s differ from the configured %s: resuming with the "
                "checkpoint's (start a new RUN_DIR to change them)",
                jax.device_get(restored.hparams),
                jax.device_get(spec.hparams),
            )
        self.rng = jax.device_put(restored.rng, self.rep)
        self.last_saved = restored.step
        self.known_skipped = int(restored.state.nonfinite.skipped)
        # The meta is strict JSON: non-finite metrics come back as floats.
        self.last_eval = atomic.restore_nonfinite(restored.meta.get("eval_metrics") or {})
        done = restored.meta.get("summary_state") or {}
        self.last_train = atomic.restore_nonfinite(done.get("last_train") or {})
        if self.step >= self.cfg.train_steps and done:
            # The final checkpoint: the summary a kill before summary.json lost is rebuilt
            # from what the finished process knew, so it equals an uninterrupted run's.
            self.prior_step_traces = int(done.get("step_traces", 0))
            self.prior_batch_shapes = int(done.get("batch_shapes", 0))
            self.prior_wall_s = float(done.get("wall_time_s", 0.0))
        data_state = restored.meta.get("data")
        if hasattr(spec.train_data, "load_state_dict") and data_state is not None:
            spec.train_data.load_state_dict(data_state)
        else:
            for _ in range(self.step):  # no checkpointable position: skip what was consumed
                next(spec.train_data)
        if spec.load_host_state is not None and restored.meta.get("extra") is not None:
            spec.load_host_state(restored.meta["extra"])
        self.writer.truncate_after(self.step)
        log.info("resumed from the checkpoint of step %d in %s", self.step, self.ckpt.directory)

    # ---------------------------------------------------------------- compiled functions
    @property
    def frozen_shardings(self) -> Any:
        return jax.tree.map(lambda x: x.sharding, self.frozen)

    def _batch_shardings(self, batch: dict[str, jax.Array]) -> dict[str, Any]:
        return {k: partitioning.batch_sharding(self.mesh, v.ndim) for k, v in batch.items()}

    def compile_step(self, batch: dict[str, jax.Array]) -> None:
        if isinstance(self.spec.step_fn, HostSplit):
            self.jstep = self._compile_split(batch, self.spec.step_fn)
            return

        def counted(state, frozen, batch, rng, hp):
            self.step_traces += 1  # runs at trace time only
            return self.spec.step_fn(state, frozen, batch, rng, hp)

        state_sh = self.spec.state.shardings
        hp_sh = jax.tree.map(lambda _: self.rep, self.hp)
        self.jstep = jax.jit(
            counted,
            in_shardings=(
                state_sh,
                self.frozen_shardings,
                self._batch_shardings(batch),
                self.rep,
                hp_sh,
            ),  # fmt: skip
            out_shardings=(state_sh, self.rep),
            donate_argnums=0,
        )

    def _compile_split(self, batch: dict[str, jax.Array], split: HostSplit) -> Callable:
        """The two programs of a `HostSplit` (each counted in `step_traces`) and the host
        function between them, as one step callable."""

        def counted(fn):
            def traced(*args):
                self.step_traces += 1  # runs at trace time only
                return fn(*args)

            return traced

        self.programs = 2
        state_sh, frozen_sh = self.spec.state.shardings, self.frozen_shardings
        hp_sh = jax.tree.map(lambda _: self.rep, self.hp)
        before = jax.jit(
            counted(split.before),
            in_shardings=(state_sh, frozen_sh, self._batch_shardings(batch), self.rep, hp_sh),
        )
        # The carry keeps the first program's shardings (None: taken from the arrays).
        after = jax.jit(
            counted(split.after),
            in_shardings=(state_sh, frozen_sh, None, self.rep, self.rep, hp_sh),
            out_shardings=(state_sh, self.rep),
            donate_argnums=0,
        )
        return functools.partial(_split_step, split, before, after, self.rep)

    def evaluate(self) -> dict[str, float]:
        metrics = self._eval_sums()
        if self.spec.eval_hook is not None:
            hook = self.spec.eval_hook(self.state, self.step)
            metrics.update({f"eval/{k}": v for k, v in hook.items()})
        if metrics:
            self.last_eval = metrics
        return metrics

    def _eval_sums(self) -> dict[str, float]:
        spec = self.spec
        if spec.eval_fn is None or spec.eval_data is None:
            return {}
        totals, n = None, 0
        rng = jax.random.fold_in(self.rng, 0x7FFFFFFF)
        for local in spec.eval_data():
            if self.cfg.eval_batches is not None and n >= self.cfg.eval_batches:
                break
            batch = partitioning.make_global_batch(local, self.mesh)
            if self.jeval is None:  # one jitted function for the whole run
                hp_sh = jax.tree.map(lambda _: self.rep, self.hp)
                shardings = (spec.state.shardings, self.frozen_shardings,
                             self._batch_shardings(batch), self.rep, hp_sh)  # fmt: skip
                self.jeval = jax.jit(spec.eval_fn, in_shardings=shardings, out_shardings=self.rep)
            out = self.jeval(self.state, self.frozen, batch, rng, self.hp)
            totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
            n += 1
        if totals is None:
            return {}
        sums = {k: to_python(v) for k, v in jax.device_get(totals).items()}
        return {f"eval/{k}": v for k, v in spec.summarize_eval(sums).items()}

    # ---------------------------------------------------------------- faults / checkpoints
    def check_nonfinite(self) -> None:
        nf = jax.device_get(self.state.nonfinite)
        skipped = int(nf.skipped)
        if skipped == self.known_skipped:
            return
        what = describe_nonfinite_kind(int(nf.last_kind))
        if self.cfg.nonfinite_policy == "halt":
            raise faults.NonFiniteError(int(nf.last_step), what, self.last_saved)
        log.warning(
            "non-finite %s at step %d: update skipped (%d skipped so far)",
            what,
            int(nf.last_step),
            skipped,
        )
        self.known_skipped = skipped

    def save(self) -> None:
        if self.last_saved == self.step:
            return
        self.check_nonfinite()
        spec = self.spec
        meta = {
            "step": self.step,
            "time": time.time(),
            "data": spec.train_data.state_dict()
            if hasattr(spec.train_data, "state_dict")
            else None,
            "extra": spec.host_state() if spec.host_state is not None else None,
            "eval_metrics": self.last_eval,
            # What finish() needs, should the process die between this save and summary.json.
            "summary_state": {
                "last_train": self.last_train,
                "step_traces": self.step_traces,
                "batch_shapes": len(self.batch_shapes),
                "wall_time_s": time.time() - self.t0 + self.prior_wall_s,
            },
        }
        if self.ckpt.save(
            self.step, self.state, hparams=self.hp, rng=self.rng, meta=meta, metrics=self.last_eval
        ):
            self.last_saved = self.step

    def preemption_requested(self, handler: faults.PreemptionHandler) -> bool:
        flag = handler.requested
        if jax.process_count() > 1:  # every process must stop at the same step
            if not _due(self.step, self.cfg.log_every):
                return False
            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag

    # ---------------------------------------------------------------- the loop
    def log_step(self, metrics: dict[str, jax.Array], thr: Throughput, bar: tqdm) -> dict:
        record = {f"train/{k}": to_python(v) for k, v in jax.device_get(metrics).items()}
        record.update(thr.report())
        self.last_train = record
        self.check_nonfinite()
        if self.step_traces > self.programs * len(self.batch_shapes):
            log.warning(
                "the step was traced %d times for %d batch shapes: something recompiles it "
                "(a Python value in hparams or the state that changes?)",
                self.step_traces,
                len(self.batch_shapes),
            )
        bar.set_postfix(
            loss=f"{record.get('train/loss', float('nan')):.4f}",
            tok_s=f"{record['perf/tokens_per_s']:.0f}",
        )
        return record

    def run(self, handler: faults.PreemptionHandler) -> LoopResult:
        cfg = self.cfg
        summary_path = self.run_dir / "summary.json"
        if summary_path.exists():
            if self.step >= cfg.train_steps:
                log.info("%s is complete (summary.json); nothing to do", self.run_dir)
                summary = json.loads(summary_path.read_text())
                return LoopResult("done", self.step, self.state, summary, self.step_traces)
            if jax.process_index() == 0:
                summary_path.unlink()  # the run is being extended: it is no longer done
        if jax.process_index() == 0:
            # Written once the run is known to train (after the restore and the check for a
            # finished run): a refused or finished rerun leaves the stored config alone.
            self.write_config()
        bar = tqdm(
            total=cfg.train_steps,
            initial=self.step,
            disable=not cfg.progress_bar or jax.process_index() != 0,
            desc="train",
            dynamic_ncols=True,
        )
        thr = Throughput()
        self.t0 = t0 = time.time()
        with bar:
            while self.step < cfg.train_steps:
                if self.preemption_requested(handler):
                    self.save()
                    self.ckpt.wait()
                    log.warning("preempted: checkpoint of step %d saved; exiting", self.step)
                    return LoopResult("preempted", self.step, self.state, None, self.step_traces)
                if cfg.fault_signal and self.step == cfg.fault_signal_step:
                    faults.inject_signal(cfg.fault_signal)
                self.train_step(thr)
                bar.update(1)
                self.after_step(thr, bar)
        self.ckpt.wait()
        if cfg.fault_signal and self.step == cfg.fault_signal_step:
            faults.inject_signal(cfg.fault_signal)  # after the final checkpoint, before summary
        return self.finish(time.time() - t0 + self.prior_wall_s)

    def train_step(self, thr: Throughput) -> None:
        """Fetches a batch, runs the jitted step (dispatch only) and counts its work."""
        spec = self.spec
        local = next(spec.train_data)
        batch = partitioning.make_global_batch(local, self.mesh)
        first_call = not hasattr(self, "jstep")
        if first_call:
            self.compile_step(batch)
        self.batch_shapes.add(tuple((k, v.shape) for k, v in sorted(batch.items())))
        self.state, self.metrics = self.jstep(self.state, self.frozen, batch, self.rng, self.hp)
        self.step += 1
        if first_call:
            thr.reset()  # that call compiled: keep it out of the throughput
            return
        n = jax.process_count()  # every process runs an equal share
        flops = spec.flops_per_batch(local) * n if spec.flops_per_batch else None
        thr.add(spec.count_tokens(local) * n, flops)

    def after_step(self, thr: Throughput, bar: tqdm) -> None:
        """Logging, eval and checkpointing when they are due at the current step."""
        cfg, last = self.cfg, self.step == self.cfg.train_steps
        record = {}
        if _due(self.step, cfg.log_every) or last:
            record.update(self.log_step(self.metrics, thr, bar))
        if _due(self.step, cfg.eval_every) or last:
            record.update(self.evaluate())
            thr.reset()  # keep eval time out of the training throughput
        if record:
            self.writer.write(self.step, record)
        if _due(self.step, cfg.checkpoint_every) or last:
            self.save()
            thr.reset()  # the blocking part of a save is not training time either

    def finish(self, wall_s: float) -> LoopResult:
        if not self.last_eval and (self.spec.eval_fn or self.spec.eval_hook) is not None:
            self.evaluate()
        summary = {
            "status": "done",
            "step": self.step,
            "wall_time_s": wall_s,
            "compile/step_traces": max(self.step_traces, self.prior_step_traces),
            "compile/batch_shapes": max(len(self.batch_shapes), self.prior_batch_shapes),
            "nonfinite/skipped": int(jax.device_get(self.state.nonfinite.skipped)),
            **self.last_train,
            **self.last_eval,
            **self.spec.summary_extra,
        }
        if jax.process_index() == 0:
            self.write_config(operative=True)
            write_json_atomic(self.run_dir / "summary.json", summary)
        return LoopResult("done", self.step, self.state, summary, self.step_traces)

    def write_config(self, operative: bool = False) -> None:
        """RUN_DIR/config.gin from gin's global state (a population member writes its own)."""
        rundir.write_config(self.run_dir, operative=operative)

    def close(self) -> None:
        self.ckpt.close()
        self.writer.close()


def train_loop(
    spec: LoopSpec,
    cfg: LoopConfig,
    *,
    run_dir: str | Path,
    mesh: Mesh,
    rules,
    seed: int = 0,
) -> LoopResult:
    """Runs (or resumes) a stage to `cfg.train_steps`; see the module docstring.

    The caller holds the run-directory lock (`faults.RunLock`). Returns a `LoopResult`; raises
    `faults.NonFiniteError` under the "halt" policy and
    `rundir.CheckpointRestoreError` when checkpoints exist but none restores.
    """
    run_dir = Path(run_dir)
    if logging.getLogger("absl").level == logging.NOTSET:
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax is chatty at INFO
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        run = _Run(spec, cfg, run_dir, mesh, seed)
        try:
            # Installed before the (possibly long) restore and compile: a SIGTERM then is
            # honoured at the first step boundary.
            with faults.PreemptionHandler() as handler:
                run.start()
                return run.run(handler)
        finally:
            run.close()
