"""Sampling from the decoder with its KV cache, as one compiled program per shape.

This module owns the sampler: the static `SamplingConfig`, the traced `SamplingHParams`
(temperature, top-p), the logit filters (`top_k_filter`, `top_p_filter`), the pure `generate`
function (prefill + a `lax.while_loop` decode, usable inside any jitted step), the `Sampler`
that jits it with explicit shardings on the (data, fsdp, tensor) mesh, and `sequence_batch`,
which lays prompt + completion out for teacher forcing.

Layout. Prompts are LEFT-padded to a bucket length P (`prompt_mask` 1 = real); every prompt
needs at least one real token. Cache slot s < P holds prompt token s (slot mask = prompt
mask); slot P + i holds new token i. The slot mask is therefore fixed for the whole decode
(`prompt_mask` followed by ones): the model's causal test (`slot <= query slot`) hides slots
not yet written, so nothing is recomputed per step. Position ids count real tokens, so a
left-padded prompt samples exactly what the unpadded one would.

Loop. `segment_len=0`: one `while_loop` that exits at the first step where every row is done.
`segment_len>0`: fixed-length `fori_loop` segments (no per-step host read-back of the loop
condition on GPU), each skipped once every row is done, with the cache grown between segments
so early steps read only the slots that can be filled. The parameters' matrices are cast to
the compute dtype once, before the loop.

Static vs traced. Everything that changes shapes or code paths (max/min new tokens, top-k,
greedy, stop ids, segment length) is in the frozen `SamplingConfig`; a new value compiles a new
program. Temperature and top-p are traced (`SamplingHParams`), scalar or per row [B]: changing
them never recompiles. Temperature 0 means greedy for that row; top-p >= 1 skips the nucleus
sort at run time (`lax.cond`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import (
    CACHE_AXES,
    CACHE_LENGTH_AXIS,
    Cache,
    Transformer,
    default_positions,
)
from rlhf_jax.partitioning import batch_sharding, check_batch_divisible
from rlhf_jax.partitioning import with_logical_constraint as wlc

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (hashable; each distinct value is one compiled program).

    Attributes:
      max_new_tokens: N, the number of decode steps at most (and the output width).
      min_new_tokens: stop tokens get logit -inf before this many new tokens.
      greedy: argmax decoding (the traced temperature/top-p are then ignored).
      top_k: keep the k most likely tokens (0 = off). Ties at the k-th logit are all kept.
      eos_id: end-of-sequence id (None = never stop early on EOS).
      stop_ids: further ids that end a row (the stop token itself is part of the completion).
      pad_id: written after a row has stopped.
      segment_len: 0 = one `while_loop` over the full-size cache that exits as soon as every
        row is done (the host reads the loop condition back at every step on GPU). > 0 =
        decode in segments of this many steps, each a `fori_loop` with a static trip count (no
        per-step read-back), skipped once every row is done, with the cache grown between
        segments so that a step attends over (and reads) only the slots filled so far. Same
        numbers either way; segments cost one compiled loop body and one cache copy each.
      use_top_p: compile the nucleus filter (it runs, behind a `lax.cond`, only when some
        row's top_p < 1). False drops it and the cond: `Sampler` then rejects top_p < 1.
    """

    max_new_tokens: int
    min_new_tokens: int = 0
    greedy: bool = False
    top_k: int = 0
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    segment_len: int = 0
    use_top_p: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens={self.min_new_tokens} must be in [0, max_new_tokens="
                f"{self.max_new_tokens}]"
            )
        if self.top_k < 0 or self.segment_len < 0:
            raise ValueError("top_k and segment_len must be >= 0")
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))

    @property
    def stop_tokens(self) -> tuple[int, ...]:
        """EOS (if set) and the extra stop ids, without duplicates."""
        ids = ((self.eos_id,) if self.eos_id is not None else ()) + self.stop_ids
        return tuple(dict.fromkeys(ids))


@flax.struct.dataclass
class SamplingHParams:
    """Traced sampling knobs: scalars or per-row [B] arrays (changing them never recompiles).

    Attributes:
      temperature: logits are divided by it; 0 means greedy for that row.
      top_p: nucleus mass; keeps the smallest set of tokens whose probability sums to >= top_p
        (always at least one token); >= 1 disables the filter.
    """

    temperature: Any = 1.0
    top_p: Any = 1.0

    def as_arrays(self) -> SamplingHParams:
        """fp32 arrays, so Python floats and arrays trace to the same abstract value."""
        return SamplingHParams(
            jnp.asarray(self.temperature, jnp.float32), jnp.asarray(self.top_p, jnp.float32)
        )


@flax.struct.dataclass
class SampleOutput:
    """What `generate` returns; N = max_new_tokens.

    Attributes:
      tokens: [B, N] new token ids, `pad_id` after the row stopped.
      completion_mask: [B, N] 1 on generated tokens, including the stop token that ended it.
      lengths: [B] number of generated tokens (the mask's row sums).
      logprobs: [B, N] log-prob of each token under the sampling distribution (after
        min-new-token masking, temperature, top-k and top-p; 0 for greedy rows); 0 on padding.
      model_logprobs: [B, N] log-prob under the unmodified model (temperature 1, no
        filtering), what PPO needs for its old-policy ratio; 0 on padding.
    """

    tokens: jax.Array
    completion_mask: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array


# --------------------------------------------------------------------------- logit filters


def _per_row(x: jax.Array) -> jax.Array:
    """A scalar or [B] knob, shaped to broadcast against [B, V] logits."""
    x = jnp.asarray(x, jnp.float32)
    return x[:, None] if x.ndim == 1 else x


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
    """Sets every logit below the k-th largest of its row to -inf (k <= 0 or >= V: no-op)."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
    return jnp.where(logits_BV < kth_B1, NEG_INF, logits_BV)


def top_p_filter(logits_BV: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Nucleus filter: keeps the smallest set of most-likely tokens with total prob >= top_p.

    Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", Sec. 3.1. A token is
    kept when the probability mass strictly before it (in descending order) is < top_p, so the
    most likely token is always kept. Tokens tied with the last kept logit are kept too.

    Args:
      logits_BV: [..., V] logits (may already hold -inf).
      top_p: scalar or per-row [B].
    """
    p = _per_row(top_p)
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = (mass_before_BV < p).at[..., 0].set(True)
    n_keep_B1 = keep_BV.sum(-1, keepdims=True)
    threshold_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    return jnp.where(logits_BV < threshold_B1, NEG_INF, logits_BV)


def _take(x_BV: jax.Array, tok_B: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BV, tok_B[:, None], axis=-1)[:, 0]


def choose_tokens(
    logits_BV: jax.Array,
    key: jax.Array,
    step: jax.Array,
    hp: SamplingHParams,
    config: SamplingConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Picks the next token of every row.

    Returns:
      (token [B] int32, log-prob under the sampling distribution [B], log-prob under the
      unmodified model [B]).
    """
    # Log-probs of the chosen tokens only (x[tok] - logsumexp(x)): no [B, V] log-softmax is
    # written out at each decode step.
    model_logits_BV = logits_BV
    model_lse_B = jax.nn.logsumexp(model_logits_BV, axis=-1)

    def model_lp(tok_B):
        return _take(model_logits_BV, tok_B) - model_lse_B

    stops = config.stop_tokens
    if config.min_new_tokens > 0 and stops:
        is_stop_V = jnp.zeros(logits_BV.shape[-1], bool).at[jnp.asarray(stops)].set(True)
        logits_BV = jnp.where(is_stop_V & (step < config.min_new_tokens), NEG_INF, logits_BV)
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    if config.greedy:
        return greedy_B, jnp.zeros(greedy_B.shape, jnp.float32), model_lp(greedy_B)
    temp = _per_row(hp.temperature)
    scaled_BV = logits_BV / jnp.where(temp > 0, temp, 1.0)
    scaled_BV = top_k_filter(scaled_BV, config.top_k)
    if config.use_top_p:
        scaled_BV = jax.lax.cond(
            jnp.any(jnp.asarray(hp.top_p) < 1.0),
            lambda x: top_p_filter(x, hp.top_p),
            lambda x: x,
            scaled_BV,
        )
    sampled_B = jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)
    sample_lp_B = _take(scaled_BV, sampled_B) - jax.nn.logsumexp(scaled_BV, axis=-1)
    is_greedy_B = jnp.broadcast_to(temp <= 0, (logits_BV.shape[0], 1))[:, 0]
    tok_B = jnp.where(is_greedy_B, greedy_B, sampled_B)
    lp_B = jnp.where(is_greedy_B, 0.0, sample_lp_B)
    return tok_B, lp_B, model_lp(tok_B)


# --------------------------------------------------------------------------- decode loop


@flax.struct.dataclass
class _Carry:
    step: jax.Array  # index of the token chosen next
    cache: Cache
    last_B: jax.Array  # the token chosen at step - 1
    done_B: jax.Array
    out: SampleOutput  # lengths is filled at the end


def _record(carry: _Carry, tok_B, lp_B, model_lp_B, config: SamplingConfig) -> _Carry:
    """Writes column `step` (pad for finished rows) and updates the done mask."""
    alive_B = ~carry.done_B
    tok_B = jnp.where(alive_B, tok_B, config.pad_id)
    i, out = carry.step, carry.out

    def put(buf_BN, col_B):
        return jax.lax.dynamic_update_index_in_dim(buf_BN, col_B.astype(buf_BN.dtype), i, 1)

    out = out.replace(
        tokens=put(out.tokens, tok_B),
        completion_mask=put(out.completion_mask, alive_B),
        logprobs=put(out.logprobs, jnp.where(alive_B, lp_B, 0.0)),
        model_logprobs=put(out.model_logprobs, jnp.where(alive_B, model_lp_B, 0.0)),
    )
    done_B = carry.done_B
    if config.stop_tokens:
        hit_B = jnp.any(tok_B[:, None] == jnp.asarray(config.stop_tokens)[None], axis=-1)
        done_B = done_B | (alive_B & hit_B)
    return carry.replace(step=i + 1, last_B=tok_B, done_B=done_B, out=out)


def _empty_output(batch: int, n: int, pad_id: int) -> SampleOutput:
    def col(value, dtype):
        return wlc(jnp.full((batch, n), value, dtype), ("batch", None))

    return SampleOutput(
        tokens=col(pad_id, jnp.int32),
        completion_mask=col(0, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        logprobs=col(0.0, jnp.float32),
        model_logprobs=col(0.0, jnp.float32),
    )


def _constrain_cache(cache: Cache) -> Cache:
    return [{name: wlc(x, CACHE_AXES) for name, x in layer.items()} for layer in cache]


def _grow_cache(cache: Cache, size: int) -> Cache:
    """Pads every K/V buffer with empty slots at the end, up to `size` slots."""
    extra = size - cache[0]["k"].shape[CACHE_LENGTH_AXIS]
    if extra == 0:
        return cache
    widths = [(0, 0)] * cache[0]["k"].ndim
    widths[CACHE_LENGTH_AXIS] = (0, extra)
    return _constrain_cache([{n: jnp.pad(x, widths) for n, x in layer.items()} for layer in cache])


def _slot_mask(prompt_mask_BP: jax.Array, size: int) -> jax.Array:
    """Prompt padding 0, every slot after the prompt 1 (the causal test hides unwritten ones)."""
    batch, prompt_len = prompt_mask_BP.shape
    tail = jnp.ones((batch, size - prompt_len), jnp.int32)
    return jnp.concatenate([prompt_mask_BP.astype(jnp.int32), tail], axis=1)


def segment_ends(max_new_tokens: int, segment_len: int) -> list[int]:
    """Exclusive end step of each decode segment (steps 1 .. N-1; step 0 follows prefill)."""
    n = max_new_tokens
    if segment_len <= 0 or segment_len >= n - 1:
        return [n]
    return list(range(segment_len + 1, n, segment_len)) + [n]


def _compute_params(params: Any, dtype) -> Any:
    """Casts matrices (ndim >= 2) to the compute dtype once, outside the loop.

    The model casts every weight to its compute dtype at each use, so a cast here changes no
    number, but spares a full read-convert-write of the weights at every decode step. Vectors
    (norm scales and biases) stay as they are: the norms use them in fp32.
    """

    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2:
            return x.astype(dtype)
        return x

    return jax.tree.map(cast, params)


def generate(
    params: Any,
    prompt_ids_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    rng: jax.Array,
    hparams: SamplingHParams,
    *,
    graphdef: Any,
    config: SamplingConfig,
) -> SampleOutput:
    """Samples up to `config.max_new_tokens` tokens after left-padded prompts (pure, jittable).

    One prefill forward over the prompt, then one token per loop step over the KV cache,
    stopping early once every row has stopped (per step, or per segment with
    `segment_len > 0`). The rng of step i is `fold_in(rng, i)`. Call it under `jax.set_mesh`
    and `nnx.logical_axis_rules` for sharded activations (or use `Sampler`).

    Args:
      params: the model's `nnx.Param` state.
      prompt_ids_BP: [B, P] int token ids, left-padded.
      prompt_mask_BP: [B, P] 1 on real prompt tokens; each row needs at least one.
      rng: a PRNG key.
      hparams: traced temperature and top-p.
      graphdef: the model's graphdef (static).
      config: static sampling settings.

    Returns:
      A `SampleOutput`.
    """
    batch, prompt_len = prompt_ids_BP.shape
    n_new = config.max_new_tokens
    dtype = nnx.merge(graphdef, params).cfg.dtype
    model: Transformer = nnx.merge(graphdef, _compute_params(params, dtype))
    _check_length(model.cfg, prompt_len, n_new)
    hp = hparams.as_arrays()
    n_real_B = prompt_mask_BP.astype(jnp.int32).sum(-1)
    ends = segment_ends(n_new, config.segment_len)

    size = prompt_len + ends[0] - 1
    cache = _constrain_cache(model.init_cache(batch, size))
    hidden_BPD, cache = model.forward(
        prompt_ids_BP,
        _slot_mask(prompt_mask_BP, size),
        default_positions(prompt_mask_BP),
        cache=cache,
        cache_index=0,
    )
    logits_BV = model.unembed(hidden_BPD[:, -1])
    carry = _Carry(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        last_B=jnp.zeros((batch,), jnp.int32),
        done_B=jnp.zeros((batch,), bool),
        out=_empty_output(batch, n_new, config.pad_id),
    )
    tok_B, lp_B, model_lp_B = choose_tokens(logits_BV, jax.random.fold_in(rng, 0), 0, hp, config)
    carry = _record(carry, tok_B, lp_B, model_lp_B, config)

    for start, end in zip([1, *ends[:-1]], ends, strict=True):
        size = prompt_len + end - 1
        carry = carry.replace(cache=_grow_cache(carry.cache, size))
        step = functools.partial(
            _decode_step,
            model=model,
            slot_mask_BS=_slot_mask(prompt_mask_BP, size),
            n_real_B=n_real_B,
            prompt_len=prompt_len,
            rng=rng,
            hp=hp,
            config=config,
        )
        carry = _run_segment(carry, step, start, end, early_exit_per_step=not config.segment_len)

    out = carry.out
    return out.replace(lengths=out.completion_mask.sum(-1))


def _run_segment(
    carry: _Carry,
    step: Callable[[_Carry], _Carry],
    start: int,
    end: int,
    *,
    early_exit_per_step: bool,
) -> _Carry:
    """Runs decode steps [start, end).

    Per-step early exit is a `while_loop` whose condition is read back by the host at every
    step on GPU. Otherwise the segment is a `fori_loop` with a static trip count (no per-step
    read-back), skipped as a whole once every row is done.
    """
    if early_exit_per_step:

        def running(c: _Carry) -> jax.Array:
            return (c.step < end) & ~jnp.all(c.done_B)

        return jax.lax.while_loop(running, step, carry)

    def run(c: _Carry) -> _Carry:
        return jax.lax.fori_loop(start, end, lambda _, c: step(c), c)

    return jax.lax.cond(jnp.all(carry.done_B), lambda c: c, run, carry)


def _decode_step(
    carry: _Carry,
    *,
    model: Transformer,
    slot_mask_BS: jax.Array,
    n_real_B: jax.Array,
    prompt_len: int,
    rng: jax.Array,
    hp: SamplingHParams,
    config: SamplingConfig,
) -> _Carry:
    """Feeds the token of step i-1 (slot P+i-1) and chooses the token of step i."""
    i = carry.step
    positions_B1 = (n_real_B + i - 1)[:, None]
    hidden_B1D, cache = model.forward(
        carry.last_B[:, None],
        slot_mask_BS,
        positions_B1,
        cache=carry.cache,
        cache_index=prompt_len + i - 1,
    )
    logits_BV = model.unembed(hidden_B1D[:, 0])
    tok_B, lp_B, model_lp_B = choose_tokens(logits_BV, jax.random.fold_in(rng, i), i, hp, config)
    carry = carry.replace(cache=_constrain_cache(cache))
    return _record(carry, tok_B, lp_B, model_lp_B, config)


def _check_length(cfg: ModelConfig, prompt_len: int, n_new: int) -> None:
    if cfg.pos_emb == "learned" and prompt_len + n_new > cfg.max_seq_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {n_new} exceeds the model's "
            f"max_seq_len {cfg.max_seq_len}"
        )


# --------------------------------------------------------------------------- sharded entry point


class Sampler:
    """`generate` jitted on a mesh with explicit shardings; one program per config and shape.

    Batch rows are sharded over (data, fsdp) (the batch must divide by data × fsdp), the cache
    is constrained to `CACHE_AXES` ("batch", "act_kv_heads", "length", None), and the
    parameters keep their own shardings. In a multi-process job every process passes the same
    full prompt batch; `partitioning.to_host` gathers the outputs back to every process.

    Example:
      sampler = Sampler(graphdef, cfg, mesh, rules, params_shardings=shardings)
      out = sampler(params, prompt_ids, prompt_mask, rng, SamplingConfig(max_new_tokens=64),
                    SamplingHParams(temperature=0.7, top_p=0.9))
    """

    def __init__(
        self,
        graphdef: Any,
        cfg: ModelConfig,
        mesh: Mesh,
        rules: Any,
        params_shardings: Any = None,
    ):
        self.graphdef, self.cfg, self.mesh, self.rules = graphdef, cfg, mesh, rules
        self.params_shardings = params_shardings
        self.trace_count = 0  # bumped at every trace; tests use it as a recompile guard
        self._jitted: dict[SamplingConfig, Callable] = {}

    def _traced(self, params, ids, mask, rng, hp, *, config: SamplingConfig) -> SampleOutput:
        self.trace_count += 1
        return generate(params, ids, mask, rng, hp, graphdef=self.graphdef, config=config)

    def _compile(self, config: SamplingConfig, params: Any) -> Callable:
        if config not in self._jitted:
            rows = batch_sharding(self.mesh, 2)
            replicated = NamedSharding(self.mesh, PartitionSpec())
            p_shard = self.params_shardings
            if p_shard is None:
                p_shard = jax.tree.map(lambda x: x.sharding, params)
            out = SampleOutput(
                tokens=rows,
                completion_mask=rows,
                lengths=batch_sharding(self.mesh, 1),
                logprobs=rows,
                model_logprobs=rows,
            )
            self._jitted[config] = jax.jit(
                functools.partial(self._traced, config=config),
                in_shardings=(p_shard, rows, rows, replicated, replicated),
                out_shardings=out,
            )
        return self._jitted[config]

    def _inputs(self, prompt_ids_BP, prompt_mask_BP, config, hparams):
        check_batch_divisible(prompt_ids_BP.shape[0], self.mesh)
        hparams = hparams or SamplingHParams()
        if not (config.use_top_p or config.greedy) and np.any(np.asarray(hparams.top_p) < 1):
            raise ValueError("top_p < 1 needs SamplingConfig(use_top_p=True)")
        rows = batch_sharding(self.mesh, 2)
        # A host batch must be the same, in full, on every process of a multi-process job.
        ids = jax.device_put(jnp.asarray(prompt_ids_BP, jnp.int32), rows)
        mask = jax.device_put(jnp.asarray(prompt_mask_BP, jnp.int32), rows)
        return ids, mask, hparams.as_arrays()

    def __call__(
        self,
        params: Any,
        prompt_ids_BP: Any,
        prompt_mask_BP: Any,
        rng: jax.Array,
        config: SamplingConfig,
        hparams: SamplingHParams | None = None,
    ) -> SampleOutput:
        """Samples completions; see `generate` for the arguments."""
        ids, mask, hp = self._inputs(prompt_ids_BP, prompt_mask_BP, config, hparams)
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return self._compile(config, params)(params, ids, mask, rng, hp)

    def lower(
        self,
        params: Any,
        prompt_ids_BP: Any,
        prompt_mask_BP: Any,
        rng: jax.Array,
        config: SamplingConfig,
        hparams: SamplingHParams | None = None,
    ) -> jax.stages.Lowered:
        """The lowered program `__call__` would run (for `.compile().as_text()` or AOT use)."""
        ids, mask, hp = self._inputs(prompt_ids_BP, prompt_mask_BP, config, hparams)
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return self._compile(config, params).lower(params, ids, mask, rng, hp)


def sequence_batch(
    prompt_ids_BP: jax.Array, prompt_mask_BP: jax.Array, out: SampleOutput
) -> dict[str, jax.Array]:
    """Prompt + completion laid out for a teacher-forced forward, [B, P + N] each.

    Returns a dict with `input_ids`, `attention_mask` (prompt mask then completion mask),
    `positions` (real tokens before each one, as the sampler used) and `completion_mask`
    (0 on the prompt). The logits at column P - 1 + j predict completion token j, i.e. the
    log-prob of `input_ids[:, t]` is read from the logits at column t - 1.
    """
    ids = jnp.concatenate([jnp.asarray(prompt_ids_BP, jnp.int32), out.tokens], axis=1)
    prompt_mask = jnp.asarray(prompt_mask_BP, jnp.int32)
    mask = jnp.concatenate([prompt_mask, out.completion_mask], axis=1)
    completion = jnp.concatenate([jnp.zeros_like(prompt_mask), out.completion_mask], axis=1)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "positions": default_positions(mask),
        "completion_mask": completion,
    }
