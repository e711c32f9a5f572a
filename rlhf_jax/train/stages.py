"""Building blocks that every stage's wiring shares (SFT, reward model, DPO).

A stage function (gin-configurable, bound as `train.stage = @..._stage`) typically:

1. takes the run-directory lock (`faults.RunLock`);
2. builds the mesh and rules (`partitioning.make_mesh()`, `logical_rules()`), its data, and its
   `ModelConfig` (checked against the tokenizer and sequence length here);
3. builds the optimiser (`build_optimizer`), a `StateFactory` of its trained models
   (`model_state_factory`) and a loader of its frozen ones (`frozen_models`), then records the
   model in RUN_DIR/model.json (`rundir.write_model_info`);
4. binds its algorithm (`steps.algorithm`) to the generic `train_step` / `eval_step` with
   `functools.partial` and calls `loop.train_loop` with a `LoopSpec`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import jax
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import settings
from rlhf_jax.errors import SettingsError
from rlhf_jax.models import ModelConfig, lora
from rlhf_jax.rundir import (
    MODEL_CLASSES,
    check_model_class,
    check_run_identity,
    load_params,
    model_record,
    write_model_info,
)
from rlhf_jax.steps.state import Frozen, ModelState, StateFactory, TrainState, state_factory
from rlhf_jax.train.optim import Optimizer, make_optimizer

log = logging.getLogger(__name__)


def fit_vocab(cfg: ModelConfig, vocab_size: int, match: bool = True) -> ModelConfig:
    """The model config with `vocab_size` set to the tokenizer's (`match`), or checked to fit.

    Raises:
      ValueError: the tokenizer has more ids than the model's vocabulary (when not matching).
    """
    if match:
        if cfg.vocab_size != vocab_size:
            log.info("model vocab_size %d -> %d (the tokenizer's)", cfg.vocab_size, vocab_size)
        return dataclasses.replace(cfg, vocab_size=vocab_size)
    if vocab_size > cfg.vocab_size:
        raise SettingsError(
            f"the tokenizer has {vocab_size} ids but the model's vocab_size is {cfg.vocab_size}: "
            "set model_config.vocab_size >= the tokenizer's, or let the stage match it"
        )
    return cfg


def check_seq_len(cfg: ModelConfig, seq_len: int) -> None:
    """Learned position tables cap the sequence length; fail before compiling, not inside."""
    if cfg.pos_emb == "learned" and seq_len > cfg.max_seq_len:
        raise SettingsError(
            f"batches are {seq_len} tokens long but the model's max_seq_len is "
            f"{cfg.max_seq_len}: lower the data's max_len or raise model_config.max_seq_len"
        )


def check_stage_settings(
    *,
    run_dir: Any,
    seed: Any,
    batch_size: Any,
    grad_accum_steps: Any = 1,
    lr_scale: Any = 1.0,
    init_from: Any = None,
    stage: str = "stage",
) -> None:
    """The settings every stage shares, checked before the lock is taken or anything loads.

    Raises:
      errors.SettingsError / rundir.NotARunDirError: naming the setting.
    """
    settings.run_dir(f"{stage}.run_dir (RUN_DIR)", run_dir)
    settings.integer(f"{stage}.seed (SEED)", seed)
    settings.positive_int(f"{stage}.batch_size (BATCH_SIZE)", batch_size)
    settings.positive_int(f"{stage}.grad_accum_steps", grad_accum_steps)
    if batch_size % grad_accum_steps:
        raise SettingsError(
            f"{stage}.batch_size={batch_size} is not divisible by "
            f"grad_accum_steps={grad_accum_steps}"
        )
    settings.finite(f"{stage}.lr_scale", lr_scale)
    if init_from is not None:
        settings.existing_path(f"{stage}.init_from", init_from)
        # The stages start from a policy; a reward-model run has no LM head to start from.
        check_model_class(init_from, "Transformer", f"{stage}.init_from")


def record_model(
    run_dir: Path,
    cfg: ModelConfig,
    *,
    stage: str,
    tokenizer_path: str | None,
    model_class: str = "Transformer",
    model_kwargs: dict[str, Any] | None = None,
    lora_base: str | None = None,
) -> None:
    """Checks that RUN_DIR holds no other run (`check_run_identity`), then writes model.json.

    Raises:
      errors.RunDirMismatchError: before anything is written.
    """
    kwargs = dict(
        tokenizer_path=tokenizer_path,
        model_class=model_class,
        model_kwargs=model_kwargs,
        lora_base=lora_base,
    )
    check_run_identity(run_dir, model_record(cfg, stage=stage, **kwargs))
    write_model_info(run_dir, cfg, stage=stage, **kwargs)


TRUNCATION_STATS = (
    "long_prompt_truncated",
    "long_prompt_dropped",
    "completion_truncated",
    "bad_rows",
)


def truncation_summary(stats_by_split: dict[str, dict[str, int] | None]) -> dict[str, int]:
    """summary.json entries `data/<split>/<count>` for rows truncated, dropped or skipped while
    tokenising, logged as well when any is non-zero: a long input is never cut silently."""
    out = {}
    for split, stats in stats_by_split.items():
        if not stats:
            continue
        for key in TRUNCATION_STATS:
            out[f"data/{split}/{key}"] = int(stats.get(key, 0))
        cut = {k: stats.get(k, 0) for k in TRUNCATION_STATS if stats.get(k, 0)}
        if cut:
            log.warning("%s split: %s of %d rows", split, cut, stats.get("rows", 0))
    return out


def is_bound(selector: str) -> bool:
    """Whether gin binds `selector` (e.g. "make_optimizer.total_steps")."""
    try:
        gin.query_parameter(selector)
    except ValueError:
        return False
    return True


def build_optimizer(train_steps: int, builder: Callable[..., Optimizer] = make_optimizer):
    """The gin-configured optimiser; its schedule spans the run unless gin sets total_steps."""
    if is_bound("make_optimizer.total_steps"):
        return builder()
    return builder(total_steps=train_steps)


def model_state_factory(
    cfg: ModelConfig,
    optimizer: Optimizer,
    mesh: Mesh,
    rules,
    *,
    seed: int = 0,
    model_class: str = "Transformer",
    model_kwargs: dict[str, Any] | None = None,
    init_from: str | None = None,
    name: str = "policy",
    extra: dict[str, Any] | None = None,
) -> tuple[StateFactory, nnx.GraphDef]:
    """Abstract + sharded-init `TrainState` of one trained model (`name`), optionally
    initialised from a run.

    Args:
      cfg: the model config.
      optimizer: from `build_optimizer`.
      mesh, rules: placement.
      seed: init seed (`jax.random.key(seed)`).
      model_class: "Transformer" or "ScalarModel".
      model_kwargs: extra constructor arguments (e.g. `num_heads` of a ScalarModel).
      init_from: a run or checkpoint directory whose params initialise the model (only used
        when the run starts fresh; a resumed run restores its own checkpoint).
      name: the model's name in `TrainState.models`.
      extra: initial `TrainState.extra` (controller state arrays).

    Returns:
      `(factory, graphdef)`.
    """
    cls, kwargs = MODEL_CLASSES[model_class], dict(model_kwargs or {})
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **kwargs)))

    def from_params(params: nnx.State) -> TrainState:
        model = ModelState.create(graphdef=graphdef, params=params, optimizer=optimizer)
        return TrainState.create({name: model}, extra=extra)

    def create(key: jax.Array) -> TrainState:
        return from_params(nnx.state(cls(cfg, rngs=nnx.Rngs(key), **kwargs), nnx.Param))

    factory = state_factory(create, jax.random.key(seed), mesh, rules)
    if init_from is None:
        return factory, graphdef

    def init_from_checkpoint() -> TrainState:
        loaded = load_params(init_from, mesh=mesh, rules=rules)
        log.info("initialising from %s (step %d)", loaded.run_dir, loaded.step)
        # LoRA on a plain checkpoint: its weights are the frozen base, the adapters start fresh.
        params = lora.with_fresh_adapters(
            loaded.params, cfg, cls, kwargs, jax.random.key(seed), mesh, rules
        )
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return jax.jit(from_params, out_shardings=factory.shardings)(params)

    return dataclasses.replace(factory, init=init_from_checkpoint), graphdef


def frozen_models(
    name: str,
    *,
    init_from: str | None,
    mesh: Mesh,
    rules,
    fresh: Callable[[], tuple[nnx.GraphDef, nnx.State]] | None = None,
) -> Callable[[], Frozen]:
    """A loader of one frozen model `name` (e.g. "ref"): the parameters of the run or checkpoint
    `init_from`, sharded, or `fresh()` without one. Called on every start, so a resumed run
    reads them again instead of keeping them in its checkpoints."""

    def load() -> Frozen:
        if init_from is None:
            if fresh is None:
                raise ValueError(f"the frozen model {name!r} needs init_from")
            graphdef, params = fresh()
        else:
            loaded = load_params(init_from, mesh=mesh, rules=rules)
            graphdef, params = loaded.graphdef, loaded.params
        return Frozen(params={name: params}, graphdefs={name: graphdef})

    return load
