"""Per-token and per-sequence log-probabilities, and masked reductions.

This module owns the small array ops every algorithm shares: masked sum / mean / variance /
whitening, gathering the log-probability of target tokens from logits (always in fp32), summing
them per sequence, a chunked variant that never materialises full-vocabulary fp32 logits
for the whole batch at once, and the teacher-forced log-probs of sampled completions
(`completion_logprobs`, the ones to use for policy ratios and KL). Everything here is a pure
`jnp` function that is safe under `jit`, `vmap` and `grad`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Axis = int | tuple[int, ...] | None


def masked_sum(x: Array, mask: Array, axis: Axis = None) -> Array:
    """Sums `x` where `mask` is non-zero, weighting each element by `mask`.

    Positions where `mask == 0` contribute exactly zero even if `x` is inf or NaN there
    (padding often holds garbage), and they pass zero gradient back to `x`.

    Args:
      x: values, any shape.
      mask: same shape as `x` (or broadcastable), bool or float weights.
      axis: axis or axes to reduce; None reduces everything.

    Returns:
      The masked sum over `axis`.
    """
    mask = jnp.asarray(mask)
    weighted = jnp.where(mask != 0, x * mask.astype(x.dtype), jnp.zeros((), x.dtype))
    return jnp.sum(weighted, axis=axis)


def masked_mean(x: Array, mask: Array, axis: Axis = None) -> Array:
    """Mean of `x` over positions where `mask` is non-zero (weighted by `mask`).

    An all-zero mask gives 0 rather than NaN, so empty rows are harmless under `jit`.

    Args:
      x: values, any shape.
      mask: same shape as `x` (or broadcastable), bool or float weights.
      axis: axis or axes to reduce; None reduces everything.

    Returns:
      `masked_sum(x, mask, axis) / masked_sum(1, mask, axis)`.
    """
    mask = jnp.broadcast_to(jnp.asarray(mask), jnp.shape(x)).astype(x.dtype)
    total = masked_sum(x, mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    return total / jnp.where(count > 0, count, jnp.ones_like(count))


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance of `x` over all positions where `mask` is non-zero.

    Args:
      x: values, any shape.
      mask: same shape as `x`, bool or float weights.
      unbiased: apply Bessel's correction n / (n - 1), with n = sum(mask). When n <= 1 the
        correction is skipped (a host check would not work under `jit`), so the result is the
        biased estimate, which is 0 for a single element.

    Returns:
      A scalar variance.
    """
    mask = jnp.broadcast_to(jnp.asarray(mask), jnp.shape(x)).astype(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(mask)
        var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1e-8), 1.0)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """Normalises `x` to unit variance (and zero mean) over the masked positions.

    Used to whiten PPO advantages. Statistics use the unbiased masked variance. Positions with
    `mask == 0` are set to 0 in the output so padding never carries large values downstream.

    Args:
      x: values, any shape.
      mask: same shape as `x`, bool or float weights.
      shift_mean: if False, the masked mean is added back after scaling (only rescales).

    Returns:
      Whitened values, same shape as `x`.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(jnp.asarray(mask) != 0, whitened, jnp.zeros((), whitened.dtype))


def token_logprobs(logits_BTV: Array, targets_BT: Array) -> Array:
    """Log-probability of each target token under the softmax of `logits`, computed in fp32.

    Only the target logit and the log-partition function are needed, so the full
    log-softmax is never written out.

    Args:
      logits_BTV: logits aligned with `targets` (already shifted by the caller), any float dtype.
      targets_BT: integer token ids.

    Returns:
      `logps_BT` in float32.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return target_logit_BT - lse_BT


def entropy_from_logits(logits_BTV: Array) -> Array:
    """Entropy of the softmax distribution at each position, computed in fp32.

    Args:
      logits_BTV: logits, any float dtype.

    Returns:
      `entropy_BT` in float32: logsumexp(l) - sum(softmax(l) * l).
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    probs_BTV = jnp.exp(logits_BTV - lse_BT[..., None])
    return lse_BT - jnp.sum(probs_BTV * logits_BTV, axis=-1)


def sequence_logprobs(token_logps_BT: Array, mask_BT: Array) -> tuple[Array, Array]:
    """Sums per-token log-probs over each sequence's completion tokens.

    The count is returned beside the sum so callers can length-normalise, or accumulate
    exactly across micro-batches.

    Args:
      token_logps_BT: per-token log-probs.
      mask_BT: 1 on completion tokens, 0 on prompt and padding.

    Returns:
      `(logps_B, counts_B)`: summed log-probs and number of masked-in tokens (float32).
    """
    mask_BT = jnp.asarray(mask_BT).astype(jnp.float32)
    return masked_sum(token_logps_BT.astype(jnp.float32), mask_BT, axis=-1), jnp.sum(
        mask_BT, axis=-1
    )


def chunked_token_logprobs(
    hidden_BTD: Array,
    unembed_fn: Callable[[Array], Array],
    targets_BT: Array,
    chunk_size: int,
    *,
    return_entropy: bool = False,
) -> Array | tuple[Array, Array]:
    """Per-token log-probs (and optionally entropy) computed one sequence chunk at a time.

    `unembed_fn` maps a `[B, C, D]` hidden chunk to `[B, C, V]` logits. Chunks are processed by
    `jax.lax.map`, and each chunk's computation is wrapped in `jax.checkpoint`, so neither the
    forward nor the backward pass holds more than one chunk of fp32 `[B, C, V]` logits: the
    backward recomputes each chunk's logits from its (small) hidden states instead of storing
    them. The results equal `token_logprobs(unembed_fn(hidden_BTD), targets_BT)` up to float
    rounding, and so do the gradients with respect to `hidden_BTD` and anything `unembed_fn`
    closes over.

    Args:
      hidden_BTD: final hidden states aligned with `targets_BT`.
      unembed_fn: pure function from `[B, C, D]` hidden states to `[B, C, V]` logits; may close
        over (traced) parameters.
      targets_BT: integer token ids.
      chunk_size: static number of positions per chunk. T need not be a multiple: the last
        chunk is zero-padded and the padding sliced off.
      return_entropy: also return per-token entropy of the predicted distribution.

    Returns:
      `logps_BT` (float32), or `(logps_BT, entropy_BT)` if `return_entropy`.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, D = hidden_BTD.shape
    num_chunks = -(-T // chunk_size)
    pad = num_chunks * chunk_size - T
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    # [B, N*C, ...] -> [N, B, C, ...] so lax.map iterates over chunks.
    hidden_NBCD = hidden_BTD.reshape(B, num_chunks, chunk_size, D).swapaxes(0, 1)
    targets_NBC = targets_BT.reshape(B, num_chunks, chunk_size).swapaxes(0, 1)

    @jax.checkpoint
    def one_chunk(args: tuple[Array, Array]) -> tuple[Array, Array]:
        hidden_BCD, targets_BC = args
        logits_BCV = unembed_fn(hidden_BCD)
        logps_BC = token_logprobs(logits_BCV, targets_BC)
        if return_entropy:
            entropy_BC = entropy_from_logits(logits_BCV)
        else:
            entropy_BC = jnp.zeros_like(logps_BC)
        return logps_BC, entropy_BC

    logps_NBC, entropy_NBC = jax.lax.map(one_chunk, (hidden_NBCD, targets_NBC))
    logps_BT = logps_NBC.swapaxes(0, 1).reshape(B, num_chunks * chunk_size)[:, :T]
    if not return_entropy:
        return logps_BT
    entropy_BT = entropy_NBC.swapaxes(0, 1).reshape(B, num_chunks * chunk_size)[:, :T]
    return logps_BT, entropy_BT


def completion_logprobs(
    hidden_BTD: Array,
    unembed_fn: Callable[[Array], Array],
    completion_BN: Array,
    completion_mask_BN: Array,
    chunk_size: int = 128,
) -> Array:
    """Teacher-forced per-token log-probs of completions that follow a (left-padded) prompt.

    `hidden_BTD` are a model's final hidden states from one forward over prompt + completion
    (T = P + N, laid out as `generate.sequence_batch` does): the state at column P − 1 + j
    predicts completion token j, so only those N columns are unembedded, `chunk_size`
    positions at a time (`chunked_token_logprobs`). The stop token that ended a completion
    counts (it was sampled too); positions outside `completion_mask_BN` are zero.

    These are the log-probs to use for policy ratios and KL (PPO's π/π_old, GRPO, RLOO, the
    KL to a reference): computed the same way for every model and every time, a policy
    compared with itself gives exactly zero. The decode loop's own log-probs
    (`SampleOutput.model_logprobs`) come from its cached incremental forward and differ from
    these in the last bits (eval/policy.py explains), so never mix the two in one ratio.

    Args:
      hidden_BTD: final hidden states over prompt + completion, [B, P + N, D].
      unembed_fn: `[B, C, D]` hidden states -> `[B, C, V]` logits.
      completion_BN: the completion tokens, [B, N].
      completion_mask_BN: 1 on completion tokens (through the stop token), 0 after.
      chunk_size: positions unembedded at a time.

    Returns:
      float32 [B, N] log-probs, zero where `completion_mask_BN` is 0 (sum over the last axis
      for a sequence log-prob).
    """
    n_new = completion_BN.shape[1]
    prompt_len = hidden_BTD.shape[1] - n_new
    hidden_BND = hidden_BTD[:, prompt_len - 1 : prompt_len - 1 + n_new]
    logps_BN = chunked_token_logprobs(hidden_BND, unembed_fn, completion_BN, chunk_size)
    return logps_BN * completion_mask_BN
