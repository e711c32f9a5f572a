"""The one training stage: the wiring every algorithm shares, from settings to `train_loop`.

An algorithm's stage module (train/sft.py, train/reward.py, train/dpo.py) writes a `Recipe`:
its algorithm object and traced loss hyperparameters (`steps.algorithm`), how it gets its data
(`StageData`, the one data contract), and the few hooks where it differs (the model class,
frozen models, data preparation such as a reference cache, the finishing step). `run_stage`
then owns the rest, in this order:

1. the settings every stage shares are checked (before anything loads) and the run-directory
   lock is taken;
2. the mesh, the data (with the tokenizer of the `init_from` run unless the recipe's data has
   its own), the `ModelConfig` (the `init_from` run's or the gin one, `fit_vocab` to the
   tokenizer, LoRA when gin sets it, sequence length checked);
3. the optimiser, its schedule built for the run's total optimiser steps (iterations times
   `optimizer_steps_per_iteration`), the state factory and RUN_DIR/model.json;
4. the `LoopSpec` (generic `train_step` / `eval_step` bound to the algorithm), `train_loop`,
   and the recipe's `finish` on the summary.

Steps 1-3 and the `LoopSpec` are `check_stage` and `build_stage`, so that a population
(`train.population`) wires each member exactly as a single run; inside `capture_stage()` a gin
stage function's `run_stage` call returns its recipe and arguments (`StageCaptured`) instead of
training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from rlhf_jax import partitioning
from rlhf_jax.models import ModelConfig, lora, model_config
from rlhf_jax.rundir import read_model_info, resolve_run_dir
from rlhf_jax.steps.algorithm import Algorithm, HParams, eval_step, train_step
from rlhf_jax.steps.state import Frozen, StateFactory
from rlhf_jax.train import stages
from rlhf_jax.train.eval_hook import SampleEval, bind_hook
from rlhf_jax.train.faults import RunLock
from rlhf_jax.train.loop import (
    HostSplit,
    LoopConfig,
    LoopResult,
    LoopSpec,
    StepFn,
    count_real_tokens,
    train_loop,
)
from rlhf_jax.train.optim import Optimizer

log = logging.getLogger(__name__)

HostBatch = dict[str, np.ndarray]


@dataclasses.dataclass
class StageData:
    """What every stage's data source returns (SFT rows, preference pairs alike).

    Attributes:
      train: endless iterator of host batches (this process's rows); checkpointable when it has
        `state_dict()` / `load_state_dict()`.
      eval: the eval split, re-iterable: each `iter()` is one full pass from its start (padded
        last batch with `valid`), or None.
      vocab_size: the tokenizer's number of ids.
      seq_len: the longest batch length (the largest bucket).
      tokenizer_path: recorded in RUN_DIR/model.json for later stages.
      summary: entries for summary.json (row counts, truncation, baselines).
    """

    train: Iterator[HostBatch]
    eval: Iterable[HostBatch] | None
    vocab_size: int
    seq_len: int
    tokenizer_path: str | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What the hooks of a `Recipe` may read: the run's placement and common settings."""

    run_dir: Path
    mesh: Mesh
    rules: Any
    seed: int
    batch_size: int
    init_from: str | None
    init_info: dict[str, Any] | None  # model.json of init_from


class Recipe:
    """The per-algorithm part of a stage (see the module docstring); override what differs.

    Attributes:
      name: the gin name of the stage function (in messages and model.json).
      algorithm: the static algorithm object.
      loss_hparams: its traced loss hyperparameters.
      model_class / model_kwargs: the trained model (a policy `Transformer` by default).
      supports_lora: whether gin/algorithms/lora.gin may turn on adapters.
      label / done_line: the end-of-run log line, "<label> done: N steps, <done_line>, T s",
        where `done_line` holds (printf text, summary key) pairs (a missing key prints nan).
    """

    name: str = "stage"
    model_class: str = "Transformer"
    supports_lora: bool = True
    label: str = ""
    done_line: tuple[tuple[str, str], ...] = ()

    def __init__(self, algorithm: Algorithm, loss_hparams: Any = None):
        self.algorithm, self.loss_hparams = algorithm, loss_hparams
        self.model_kwargs: dict[str, Any] | None = None

    def check_settings(self) -> None:
        """Validates the recipe's own settings (raises `errors.SettingsError`)."""

    def data(self, ctx: StageContext, tokenizer: str | None) -> StageData:
        raise NotImplementedError

    def optimizer(self, optimizer: Optimizer) -> Optimizer:
        return optimizer

    def state(self, ctx: StageContext, cfg: ModelConfig, optimizer: Optimizer) -> StateFactory:
        factory, _ = stages.model_state_factory(
            cfg, optimizer, ctx.mesh, ctx.rules, seed=ctx.seed, init_from=ctx.init_from,
            model_class=self.model_class, model_kwargs=self.model_kwargs,
            name=self.algorithm.model,
        )  # fmt: skip
        return factory

    def prepare(
        self, ctx: StageContext, data: StageData, cfg: ModelConfig, factory: StateFactory
    ) -> StageData:
        """Last changes to the data once the model exists (e.g. cached reference log-probs)."""
        del ctx, cfg, factory
        return data

    def frozen(
        self, ctx: StageContext, cfg: ModelConfig, factory: StateFactory
    ) -> Callable[[], Frozen] | None:
        """A loader of the frozen models the steps read (None: none)."""
        del ctx, cfg, factory

    def step(self) -> StepFn | HostSplit:
        """What the loop runs per iteration: the generic `train_step` of the algorithm (one
        program), or a `loop.HostSplit` (two programs around host-side work)."""
        return functools.partial(train_step, cfg=self.algorithm)

    def count_tokens(self, batch: HostBatch) -> float:
        return count_real_tokens(batch)

    def flops_per_batch(self, cfg: ModelConfig, batch: HostBatch) -> float:
        rows, seq_len = batch["input_ids"].shape
        return cfg.flops_per_token(seq_len) * rows * seq_len

    def summary_extra(self, ctx: StageContext) -> dict[str, Any]:
        del ctx
        return {}

    def finish(self, ctx: StageContext, summary: dict[str, Any]) -> None:
        """Host-side work once the run is done (summary.json is written): by default the
        end-of-run log line."""
        del ctx
        unit = "steps" if self.algorithm.optimizer_steps_per_iteration == 1 else "iterations"
        parts = [f"{summary['step']} {unit}"]
        parts += [text % summary.get(key, math.nan) for text, key in self.done_line]
        parts.append(f"{summary['wall_time_s']:.1f} s")
        log.info("%s done: %s", self.label or self.name, ", ".join(parts))


def _model_config(recipe: Recipe, ctx: StageContext, vocab_size: int, match: bool):
    if ctx.init_info is not None:
        cfg = stages.fit_vocab(ctx.init_info["model_config"], vocab_size, match=False)
    else:
        cfg = stages.fit_vocab(model_config(), vocab_size, match)
    if recipe.supports_lora:
        return lora.with_lora(cfg)  # adapters when gin/algorithms/lora.gin sets a rank
    return cfg


@dataclasses.dataclass
class BuiltStage:
    """A stage wired up and ready for `train_loop` (what `build_stage` returns)."""

    recipe: Recipe
    ctx: StageContext
    spec: LoopSpec
    loop_cfg: LoopConfig


class StageCaptured(Exception):
    """Raised by `run_stage` inside `capture_stage()`: the stage's call, not run."""

    def __init__(self, recipe: Recipe, kwargs: dict[str, Any]):
        super().__init__(recipe.name)
        self.recipe, self.kwargs = recipe, kwargs


_capturing = False


@contextlib.contextmanager
def capture_stage() -> Iterator[None]:
    """Within this context `run_stage` trains nothing: it raises `StageCaptured` with the recipe
    and arguments a gin stage function built. A population (`train.population`) uses it to get
    each member's recipe from the same gin files a single run reads."""
    global _capturing
    before, _capturing = _capturing, True
    try:
        yield
    finally:
        _capturing = before


def check_stage(recipe: Recipe, *, run_dir: str, seed: int = 0, batch_size: int = 32,
                init_from: str | None = None, lr_scale: float = 1.0, **_: Any) -> None:  # fmt: skip
    """The settings checks `run_stage` makes before anything loads (raises `SettingsError`)."""
    stages.check_stage_settings(
        run_dir=run_dir, seed=seed, batch_size=batch_size,
        grad_accum_steps=recipe.algorithm.grad_accum_steps, lr_scale=lr_scale,
        init_from=init_from, stage=recipe.name,
    )  # fmt: skip
    recipe.check_settings()
    if not recipe.supports_lora:
        lora.check_unsupported(recipe.name)


def run_stage(recipe: Recipe, **kwargs: Any) -> LoopResult:
    """Runs (or resumes) one training stage of `recipe` (see the module docstring).

    Args:
      recipe: the algorithm's part.
      **kwargs: `build_stage`'s arguments (run_dir, seed, batch_size, init_from, ...).
    """
    if _capturing:
        raise StageCaptured(recipe, kwargs)
    check_stage(recipe, **kwargs)
    with RunLock(Path(kwargs["run_dir"])):
        built = build_stage(recipe, **kwargs)
        ctx = built.ctx
        result = train_loop(built.spec, built.loop_cfg, run_dir=ctx.run_dir, mesh=ctx.mesh,
                            rules=ctx.rules, seed=ctx.seed)  # fmt: skip
        if result.summary is not None:
            recipe.finish(ctx, result.summary)
        return result


def build_stage(
    recipe: Recipe,
    *,
    run_dir: str,
    seed: int = 0,
    batch_size: int = 32,
    init_from: str | None = None,
    tokenizer: str | None = None,
    match_vocab: bool = True,
    lr_scale: float = 1.0,
    debug_nan_step: int = -1,
    eval_hook: SampleEval | None = None,
) -> BuiltStage:
    """Everything of a stage before its loop; the caller checked it (`check_stage`) and holds
    the run-directory lock.

    Args:
      recipe: the algorithm's part.
      run_dir: RUN_DIR; re-running on it resumes from its checkpoints.
      seed: init and data seed (SEED).
      batch_size: global batch size (BATCH_SIZE, rows or pairs).
      init_from: a run (or checkpoint) directory the trained model starts from; its model.json
        then defines the model (and the tokenizer, unless `tokenizer` is given).
      tokenizer: overrides the tokenizer of `init_from`.
      match_vocab: without `init_from`, set the model's vocab_size to the tokenizer's (else
        check that it fits).
      lr_scale, debug_nan_step: the traced update hyperparameters (`HParams.update`).
      eval_hook: a host-side evaluation of the trained policy at every eval
        (`train.eval_hook.SampleEval`: samples, judges, RUN_DIR/samples.jsonl).
    """
    loop_cfg = LoopConfig()
    algo = recipe.algorithm
    run_dir_path = Path(run_dir)
    mesh, rules = partitioning.make_mesh(), partitioning.logical_rules()
    partitioning.check_batch_divisible(batch_size, mesh)
    info = read_model_info(resolve_run_dir(init_from)) if init_from else None
    ctx = StageContext(run_dir_path, mesh, rules, seed, batch_size, init_from, info)
    data = recipe.data(ctx, tokenizer or (info or {}).get("tokenizer"))
    cfg = _model_config(recipe, ctx, data.vocab_size, match_vocab)
    stages.check_seq_len(cfg, data.seq_len)
    total = loop_cfg.train_steps * algo.optimizer_steps_per_iteration
    optimizer = recipe.optimizer(stages.build_optimizer(total))
    factory = recipe.state(ctx, cfg, optimizer)
    stages.record_model(
        run_dir_path, cfg, stage=recipe.name, tokenizer_path=data.tokenizer_path,
        model_class=recipe.model_class, model_kwargs=recipe.model_kwargs,
        lora_base=init_from if cfg.lora_rank else None,
    )  # fmt: skip
    data = recipe.prepare(ctx, data, cfg, factory)
    evals = data.eval
    spec = LoopSpec(
        step_fn=recipe.step(),
        state=factory,
        hparams=HParams.create(
            recipe.loss_hparams, lr_scale=lr_scale, debug_nan_step=debug_nan_step
        ),
        train_data=data.train,
        frozen=recipe.frozen(ctx, cfg, factory),
        eval_fn=functools.partial(eval_step, cfg=algo) if evals is not None else None,
        eval_data=(lambda: iter(evals)) if evals is not None else None,
        summarize_eval=algo.summarize_eval,
        count_tokens=recipe.count_tokens,
        flops_per_batch=functools.partial(recipe.flops_per_batch, cfg),
        summary_extra={**data.summary, **recipe.summary_extra(ctx)},
        eval_hook=bind_hook(
            eval_hook, ctx=ctx, cfg=cfg, factory=factory, tokenizer_path=data.tokenizer_path
        ),  # fmt: skip
    )
    return BuiltStage(recipe, ctx, spec, loop_cfg)


def pair_tokens(batch: HostBatch) -> float:
    """Real tokens of a preference batch (both sides)."""
    return float(np.sum(batch["chosen_attention_mask"]) + np.sum(batch["rejected_attention_mask"]))


def pair_flops(cfg: ModelConfig, batch: HostBatch) -> float:
    """Model FLOPs of a training step on a preference batch (forward + backward, both sides)."""
    rows, seq_len = batch["chosen_input_ids"].shape
    return cfg.flops_per_token(seq_len) * 2 * rows * seq_len
