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
from flax import nnx

from rlhf_jax.ops import chunked_token_logprobs, masked_sum
from rlhf_jax.steps.algorithm import Algorithm
from rlhf_jax.steps.common import Batch, Metrics
from rlhf_jax.steps.state import TrainState


@dataclasses.dataclass(frozen=True)
class SFTConfig(Algorithm):
    """Supervised fine-tuning as an `Algorithm` (static settings; no traced loss hyperparameters).

    Attributes:
      grad_accum_steps: micro-batches per step (the batch is split inside the step).
      logits_chunk_size: sequence positions unembedded at a time.
    """

    logits_chunk_size: int = 128

    def loss_sums(self, state, frozen, params, batch, rng, hp, prepared):
        """Summed completion-token NLL and `tokens`, its denominator."""
        del frozen, rng, hp, prepared
        return sft_nll(state.models["policy"].graphdef, params, batch, self.logits_chunk_size)

    def denominator(self, sums):
        return jnp.maximum(sums["tokens"], 1.0)

    def train_metrics(self, sums, denom):
        return {"tokens": sums["tokens"]}

    def eval_sums(self, state, frozen, batch, hp):
        return sft_eval_sums(state, batch, self.logits_chunk_size)

    def summarize_eval(self, sums):
        return summarize_eval(sums)


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


def sft_eval_sums(state: TrainState, batch: Batch, chunk: int) -> Metrics:
    """Sums over one eval batch (`valid` rows only): `nll_sum`, `correct`, `tokens`."""
    model = state.models["policy"].module()
    targets_BT, mask_BT = _targets(batch)
    hidden_BTD = _hidden(model, batch)
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
