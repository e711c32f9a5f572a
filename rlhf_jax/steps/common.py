"""Pieces every training step shares: micro-batch gradient accumulation and the guarded update.

- `accumulate_gradients` runs a loss over `A` micro-batches with `lax.scan` and sums gradients
  and auxiliary statistics. Losses return *sums* with their denominators in `aux`, so the step
  divides once at the end and the result equals the whole-batch gradient exactly (up to float
  rounding) whatever `A` is.
- `apply_gradients` applies one optimiser update, scaled by the traced `lr_scale`, unless the
  loss or the gradients are non-finite: then parameters and optimiser state are kept (selected
  with `jnp.where`, inside `jit`) and `TrainState.nonfinite` records the step. It also hosts the
  fault-injection hook `debug_nan_step` (a traced hyperparameter, -1 = off).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

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


def apply_gradients(
    state: TrainState,
    grads: Any,
    loss: jax.Array,
    lr_scale: jax.Array,
    debug_nan_step: jax.Array | int = -1,
) -> tuple[TrainState, Metrics]:
    """One guarded optimiser update; returns the new state and `loss`, `grad_norm`, `lr`,
    `nonfinite/skipped`.

    Args:
      state: the current state (its `tx` and `lr_schedule` are used).
      grads: gradients shaped like `state.params` (already divided by their denominator).
      loss: the scalar loss the gradients belong to (checked for finiteness).
      lr_scale: traced multiplier on the update (so on the learning rate, decay included).
      debug_nan_step: fault injection for tests: at this step the loss and the gradients are
        replaced by NaN before the checks (-1: never).
    """
    poison = state.step == debug_nan_step
    loss = jnp.where(poison, jnp.nan, loss)
    grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
    grad_norm = optax.tree.norm(grads)
    loss_ok, grads_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    ok = loss_ok & grads_ok
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)

    def keep_if_ok(new, old):
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

    nonfinite = state.nonfinite.record(state.step, loss_ok, grads_ok)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_ok(params, state.params),
        opt_state=keep_if_ok(opt_state, state.opt_state),
        nonfinite=nonfinite,
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(state.lr_schedule(state.step), jnp.float32) * lr_scale,
        "nonfinite/skipped": nonfinite.skipped,
    }
    return new_state, metrics
