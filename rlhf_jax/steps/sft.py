"""Supervised fine-tuning: next-token cross-entropy on completion tokens, as a pure sharded step.

Batch format (numpy from the data pipeline, global `jax.Array`s here): `input_ids` [B, T] int32,
right-padded `[bos] prompt completion [eos] pad...`; `attention_mask` [B, T] (1 = real token);
`loss_mask` [B, T] (1 where `input_ids[t]` is a target predicted from position t-1); eval
batches also carry `valid` [B] (0 on the padding rows of the last batch).

Full-vocabulary fp32 logits are never materialised for the whole batch: the model returns
hidden states (`Transformer.forward`) and `ops.chunked_token_logprobs` unembeds and
log-softmaxes one sequence chunk at a time (recomputing each chunk in the backward pass).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax.models import lora
from rlhf_jax.ops import chunked_token_logprobs, masked_sum
from rlhf_jax.steps.common import Batch, Metrics, accumulate_gradients, apply_gradients
from rlhf_jax.steps.state import TrainState


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Static SFT settings (bound with `functools.partial` before `jit`).

    Attributes:
      grad_accum_steps: micro-batches per step (the batch is split inside the step).
      logits_chunk_size: sequence positions unembedded at a time.
    """

    grad_accum_steps: int = 1
    logits_chunk_size: int = 128


@struct.dataclass
class SFTHParams:
    """Traced SFT hyperparameters: changing them does not recompile the step.

    Attributes:
      lr_scale: multiplies the scheduled learning rate.
      debug_nan_step: fault injection for tests; the loss and gradients of this step are
        replaced by NaN (-1: never).
    """

    lr_scale: jax.Array
    debug_nan_step: jax.Array

    @classmethod
    def create(cls, lr_scale: float = 1.0, debug_nan_step: int = -1) -> SFTHParams:
        return cls(
            lr_scale=jnp.asarray(lr_scale, jnp.float32),
            debug_nan_step=jnp.asarray(debug_nan_step, jnp.int32),
        )


def _targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Shifted targets [B, T-1] and their loss weights (completion tokens of valid rows)."""
    targets_BT = batch["input_ids"][:, 1:]
    mask_BT = batch["loss_mask"][:, 1:].astype(jnp.float32)
    if "valid" in batch:
        mask_BT = mask_BT * batch["valid"].astype(jnp.float32)[:, None]
    return targets_BT, mask_BT


def _hidden(model: nnx.Module, batch: Batch) -> jax.Array:
    hidden_BTD, _ = model.forward(batch["input_ids"], batch["attention_mask"], right_padded=True)
    return hidden_BTD[:, :-1]


def sft_nll(
    graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, chunk_size: int
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Summed negative log-likelihood of the completion tokens, and their count.

    Returns:
      `(nll_sum, {"tokens": count})`; the mean loss is `nll_sum / count`.
    """
    model = nnx.merge(graphdef, params)
    targets_BT, mask_BT = _targets(batch)
    logps_BT = chunked_token_logprobs(_hidden(model, batch), model.unembed, targets_BT, chunk_size)
    return -masked_sum(logps_BT, mask_BT), {"tokens": mask_BT.sum()}


def sft_step(
    state: TrainState, batch: Batch, rng: jax.Array, hp: SFTHParams, *, cfg: SFTConfig
) -> tuple[TrainState, Metrics]:
    """One SFT update: mean token NLL over the batch's completion tokens.

    Metrics: `loss`, `tokens`, `grad_norm`, `lr`, `nonfinite/skipped`.
    """
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params, micro_batch, _rng):
        with lora.dropout(_rng):  # LoRA adapter dropout (a no-op without it)
            return sft_nll(state.graphdef, params, micro_batch, cfg.logits_chunk_size)

    grads, nll_sum, aux = accumulate_gradients(
        loss_fn, state.params, batch, rng, cfg.grad_accum_steps
    )
    denom = jnp.maximum(aux["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    state, metrics = apply_gradients(state, grads, nll_sum / denom, hp.lr_scale, hp.debug_nan_step)
    return state, {**metrics, "tokens": aux["tokens"]}


def _chunked_argmax_hits(
    hidden_BTD: jax.Array, unembed_fn, targets_BT: jax.Array, chunk_size: int
) -> jax.Array:
    """1.0 where the most likely token equals the target, one sequence chunk at a time."""
    B, T, D = hidden_BTD.shape
    n = -(-T // chunk_size)
    pad = n * chunk_size - T
    hidden_NBCD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
    hidden_NBCD = hidden_NBCD.reshape(B, n, chunk_size, D).swapaxes(0, 1)
    targets_NBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(B, n, chunk_size).swapaxes(0, 1)

    def hits(args):
        h_BCD, t_BC = args
        return (jnp.argmax(unembed_fn(h_BCD), axis=-1) == t_BC).astype(jnp.float32)

    hits_NBC = jax.lax.map(hits, (hidden_NBCD, targets_NBC))
    return hits_NBC.swapaxes(0, 1).reshape(B, n * chunk_size)[:, :T]


def sft_eval_step(
    state: TrainState, batch: Batch, rng: jax.Array, hp: SFTHParams, *, cfg: SFTConfig
) -> Metrics:
    """Sums over one eval batch (`valid` rows only): `nll_sum`, `correct`, `tokens`."""
    del rng, hp
    model = state.model()
    targets_BT, mask_BT = _targets(batch)
    hidden_BTD = _hidden(model, batch)
    chunk = cfg.logits_chunk_size
    logps_BT = chunked_token_logprobs(hidden_BTD, model.unembed, targets_BT, chunk)
    hits_BT = _chunked_argmax_hits(hidden_BTD, model.unembed, targets_BT, chunk)
    return {
        "nll_sum": -masked_sum(logps_BT, mask_BT),
        "correct": masked_sum(hits_BT, mask_BT),
        "tokens": mask_BT.sum(),
    }


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
    """Host-side: eval sums over all batches -> `loss`, `accuracy`, `perplexity`, `tokens`."""
    tokens = max(float(sums["tokens"]), 1.0)
    loss = float(sums["nll_sum"]) / tokens
    return {
        "loss": loss,
        "accuracy": float(sums["correct"]) / tokens,
        "perplexity": math.exp(min(loss, 80.0)),
        "tokens": float(sums["tokens"]),
    }
