"""Pieces every training step shares: micro-batch gradient accumulation and the guarded update.

- `accumulate_gradients` runs a loss over `A` micro-batches with `lax.scan` and sums gradients
  and auxiliary statistics. Losses return *sums* with their denominators in `aux`, so the step
  divides once at the end and the result equals the whole-batch gradient exactly (up to float
  rounding) whatever `A` is.
- `guarded_update` applies one optimiser update to one named model (`ModelState.
  apply_gradients`, scaled by the traced `lr_scale`) unless the loss or the gradients are
  non-finite: then parameters and optimiser state are kept (selected with `jnp.where`, inside
  `jit`) and `TrainState.nonfinite` records the step. It also hosts the fault-injection hook
  `debug_nan_step` (a traced hyperparameter, -1 = off). Both live in `UpdateHParams`, the one
  place every algorithm's traced hyperparameters share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax.partitioning import with_logical_constraint
from rlhf_jax.steps.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# loss_fn(params, batch, rng) -> (sum to differentiate, dict of summed statistics)
SumLossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def split_microbatches(batch: Batch, num_micro: int) -> Batch:
    """Reshapes each `[B, ...]` array to `[A, B/A, ...]`, micro-batch `a` = rows `a, a+A, ...`.

    Strided rather than contiguous: with rows sharded over (data, fsdp) in contiguous blocks,
    striding gives every device an equal share of each micro-batch, so no rows move between
    devices. Sums over all micro-batches are unchanged by the permutation.
    """

    def split(x: jax.Array) -> jax.Array:
        B = x.shape[0]
        if B % num_micro:
            raise ValueError(f"batch of {B} rows does not split into {num_micro} micro-batches")
        x = x.reshape(B // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
        return with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return {k: split(v) for k, v in batch.items()}


def accumulate_gradients(
    loss_fn: SumLossFn, params: Any, batch: Batch, rng: jax.Array, num_micro: int = 1
) -> tuple[Any, jax.Array, dict[str, jax.Array]]:
    """Summed gradients, loss sum and aux sums of `loss_fn` over `num_micro` micro-batches.

    Micro-batch `i` gets `fold_in(rng, i)`. With `num_micro == 1` there is no scan.

    Returns:
      `(grads, total, aux)`, all sums over the micro-batches.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_micro == 1:
        (total, aux), grads = grad_fn(params, batch, rng)
        return grads, total, aux
    micro = split_microbatches(batch, num_micro)

    def body(carry, xs):
        i, mb = xs
        (total, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (grads, total, aux)), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, first, rng))
    (total_s, aux_s), grads_s = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_s, total_s, aux_s))
    (grads, total, aux), _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
    return grads, total, aux


@struct.dataclass
class UpdateHParams:
    """The traced hyperparameters of the update itself, shared by every algorithm.

    Attributes:
      lr_scale: multiplies the scheduled learning rate.
      debug_nan_step: fault injection for tests; the loss and gradients of this iteration are
        replaced by NaN before the checks (-1: never).
    """

    lr_scale: jax.Array
    debug_nan_step: jax.Array

    @classmethod
    def create(cls, lr_scale: float = 1.0, debug_nan_step: int = -1) -> UpdateHParams:
        return cls(
            lr_scale=jnp.asarray(lr_scale, jnp.float32),
            debug_nan_step=jnp.asarray(debug_nan_step, jnp.int32),
        )


def guarded_update(
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    hp: UpdateHParams,
    *,
    model: str = "policy",
    opt_step: jax.Array | None = None,
) -> tuple[TrainState, Metrics]:
    """One guarded optimiser update of `state.models[model]`.

    Does not advance `state.step` (the step function counts iterations). Returns the new state
    and `loss`, `grad_norm`, `lr`, `nonfinite/skipped`.

    Args:
      state: the current state.
      grads: gradients shaped like the model's params (already divided by their denominator).
      loss: the scalar loss the gradients belong to (checked for finiteness).
      hp: `lr_scale` (traced multiplier on the update, so on the learning rate, decay included)
        and `debug_nan_step` (at this iteration the loss and the gradients become NaN).
      model: which trained model to update.
      opt_step: the optimiser step the schedule is at (default: `state.step`, one per iteration).
    """
    poison = state.step == hp.debug_nan_step
    loss = jnp.where(poison, jnp.nan, loss)
    grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
    grad_norm = optax.tree.norm(grads)
    loss_ok, grads_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    ms = state.models[model]
    new_ms = ms.apply_gradients(grads, lr_scale=hp.lr_scale, ok=loss_ok & grads_ok)
    nonfinite = state.nonfinite.record(state.step, loss_ok, grads_ok)
    state = state.with_model(model, new_ms).replace(nonfinite=nonfinite)
    at = state.step if opt_step is None else opt_step
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(ms.lr_schedule(at), jnp.float32) * hp.lr_scale,
        "nonfinite/skipped": nonfinite.skipped,
    }
    return state, metrics
