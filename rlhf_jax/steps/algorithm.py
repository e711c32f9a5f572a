"""One interface for every training algorithm, and the generic step built on it.

An algorithm (in the spirit of t5x's `BaseModel`) is a frozen dataclass of static settings
(bound before `jit`) with a few pure methods:

- `loss_sums(state, frozen, params, batch, rng, hp, prepared)`: the loss summed over the rows of
  one micro-batch, differentiable in `params`, and a dict of summed statistics that includes its
  denominator (`denominator(sums)`), so micro-batches add up exactly;
- `prepare(batch, hp)`: whole-batch quantities every micro-batch shares (default: none);
- `train_metrics(sums, denominator)`: the step's metrics from the sums;
- `eval_sums(state, frozen, batch, hp)` and `summarize_eval(sums)` (host side);
- `update(...)`: one iteration; the default is one optimiser step (`one_update`), an online RL
  algorithm takes several (`optimizer_steps_per_iteration`).

Its traced hyperparameters are its own pytree (`HParams.loss`); the ones of the update itself
(`lr_scale`, `debug_nan_step`) live once in `HParams.update`. `train_step` and `eval_step` are
the functions the loop jits: `(state, frozen, batch, rng, hparams, *, cfg) -> ...`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax.errors import SettingsError
from rlhf_jax.models import lora
from rlhf_jax.steps.common import (
    Batch,
    Metrics,
    UpdateHParams,
    accumulate_gradients,
    guarded_update,
)
from rlhf_jax.steps.state import Frozen, TrainState


@struct.dataclass
class NoHParams:
    """The traced loss hyperparameters of an algorithm that has none (a placeholder scalar, so
    that checkpoints hold a non-empty tree)."""

    unused: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.float32))


@struct.dataclass
class HParams:
    """Every traced hyperparameter of a run: the update's and the algorithm's loss's."""

    update: UpdateHParams
    loss: Any

    @classmethod
    def create(cls, loss: Any = None, *, lr_scale: float = 1.0, debug_nan_step: int = -1):
        return cls(
            update=UpdateHParams.create(lr_scale, debug_nan_step),
            loss=NoHParams() if loss is None else loss,
        )


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Base class of the algorithms' static configs (see the module docstring).

    Attributes:
      grad_accum_steps: micro-batches per optimiser step (the batch is split inside the step).
    """

    model: ClassVar[str] = "policy"  # the trained model of `TrainState.models`
    optimizer_steps_per_iteration: ClassVar[int] = 1

    grad_accum_steps: int = 1

    def __post_init__(self):
        n = self.grad_accum_steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SettingsError(f"grad_accum_steps={n!r} must be a positive integer")

    def prepare(self, batch: Batch, hp: Any) -> Any:
        """Quantities of the whole batch that every micro-batch's loss reads (default: none)."""
        del batch, hp

    def loss_sums(
        self,
        state: TrainState,
        frozen: Frozen,
        params: nnx.State,
        batch: Batch,
        rng: jax.Array,
        hp: Any,
        prepared: Any,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    def denominator(self, sums: dict[str, jax.Array]) -> jax.Array:
        """What the summed loss and gradients are divided by (default: 1, already a mean)."""
        del sums
        return jnp.ones((), jnp.float32)

    def train_metrics(self, sums: dict[str, jax.Array], denom: jax.Array) -> Metrics:
        del denom
        return dict(sums)

    def eval_sums(self, state: TrainState, frozen: Frozen, batch: Batch, hp: Any) -> Metrics:
        raise NotImplementedError

    def summarize_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return dict(sums)

    def update(
        self, state: TrainState, frozen: Frozen, batch: Batch, rng: jax.Array, hp: HParams
    ) -> tuple[TrainState, Metrics]:
        """One iteration (the iteration counter is advanced by `train_step`)."""
        return one_update(self, state, frozen, batch, rng, hp)


def one_update(
    algo: Algorithm,
    state: TrainState,
    frozen: Frozen,
    batch: Batch,
    rng: jax.Array,
    hp: HParams,
    *,
    opt_step: jax.Array | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimiser step of `algo.model` on `batch`: accumulate the summed loss over the
    micro-batches, divide by the denominator, apply the guarded update."""
    prepared = algo.prepare(batch, hp.loss)

    def loss_fn(params, micro, micro_rng):
        with lora.dropout(micro_rng):  # LoRA adapter dropout (a no-op without it)
            return algo.loss_sums(state, frozen, params, micro, micro_rng, hp.loss, prepared)

    params = state.models[algo.model].params
    grads, loss_sum, sums = accumulate_gradients(loss_fn, params, batch, rng, algo.grad_accum_steps)
    denom = algo.denominator(sums)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    state, update_metrics = guarded_update(
        state, grads, loss_sum / denom, hp.update, model=algo.model, opt_step=opt_step
    )
    return state, {**algo.train_metrics(sums, denom), **update_metrics}


def train_step(
    state: TrainState,
    frozen: Frozen,
    batch: Batch,
    rng: jax.Array,
    hp: HParams,
    *,
    cfg: Algorithm,
) -> tuple[TrainState, Metrics]:
    """One iteration of any algorithm: rng folded with the iteration, `cfg.update`, count."""
    rng = jax.random.fold_in(rng, state.step)
    state, metrics = cfg.update(state, frozen, batch, rng, hp)
    return state.replace(step=state.step + 1), metrics


def eval_step(
    state: TrainState,
    frozen: Frozen,
    batch: Batch,
    rng: jax.Array,
    hp: HParams,
    *,
    cfg: Algorithm,
) -> Metrics:
    """Sums over one eval batch (`cfg.eval_sums`); the host adds them up over batches."""
    del rng
    return cfg.eval_sums(state, frozen, batch, hp.loss)
