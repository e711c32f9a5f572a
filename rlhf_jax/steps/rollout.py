"""The sampling half of an online-RL iteration: rollouts, scoring and teacher-forced forwards.

This module owns the `Rollout` pytree (prompts repeated k times, the sampled completions and
the sampler's log-probs), the pure `rollout` that samples it from the policy's own parameter
arrays with `generate.generate` (so rollout and update share the arrays on the same mesh, no
host copy), ReMax's greedy baseline rollout, the teacher-forced forwards of a policy, reference
or critic over a rollout, and the scorer signature (`ScoreFn`) with an adapter for the trained
reward model (mean, or the ensemble's conservative mean - k * std). A critic is either a
separate `ScalarModel` (`completion_values`) or a value head on the policy's trunk, read from the
policy's own forward (`completion_logps_and_values`). Everything is pure and usable inside
`jit`.

Layout. Prompts are left-padded to P, completions right-padded to N = max_new_tokens; the
teacher-forced sequence is `[prompt | completion]` ([B, P + N], `generate.sequence_batch`), and
the hidden state at column P - 1 + j predicts completion token j. Completion-aligned arrays
([B, N]) follow docs/PPO.md: `mask` 1 on a row's completion tokens (stop token included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax.generate import SampleOutput, SamplingHParams, generate
from rlhf_jax.models.transformer import default_positions
from rlhf_jax.ops.logprobs import chunked_token_logprobs, entropy_from_logits, token_logprobs
from rlhf_jax.partitioning import with_logical_constraint
from rlhf_jax.steps.rl_config import RLConfig, RLHParams
from rlhf_jax.steps.state import Frozen


def constrain_rows(x: jax.Array) -> jax.Array:
    """Rows over the batch axes of the mesh, the rest replicated."""
    return with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


@struct.dataclass
class Rollout:
    """Sampled completions of a batch of prompts ([B, P] left-padded prompts, [B, N] completions).

    Attributes:
      prompt_ids, prompt_mask: the prompts, each repeated k times (rows of one prompt are
        consecutive).
      tokens: completion token ids (pad after the stop).
      mask: 1 on completion tokens, the stop token included (the sampler's completion mask).
      sampler_logps: log-probs under the sampling distribution (temperature, top-k, top-p)
        as the sampler computed them; 0 on padding.
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    sampler_logps: jax.Array

    @property
    def input_ids(self) -> jax.Array:
        """[B, P + N] prompt then completion."""
        return jnp.concatenate([self.prompt_ids.astype(jnp.int32), self.tokens], axis=1)

    @property
    def attention_mask(self) -> jax.Array:
        """[B, P + N]: prompt mask then completion mask."""
        prompt = self.prompt_mask.astype(jnp.int32)
        return jnp.concatenate([prompt, self.mask.astype(jnp.int32)], axis=1)

    @property
    def positions(self) -> jax.Array:
        """Real tokens before each one, as the sampler numbered them."""
        return default_positions(self.attention_mask)

    @property
    def lengths(self) -> jax.Array:
        return jnp.sum(self.mask, axis=-1)


# A scorer: (frozen models, rollout) -> one float32 score per row. It must be pure (it runs
# inside the jitted iteration); a host-side judge instead scores between the two programs.
ScoreFn = Callable[[Frozen, Rollout], jax.Array]


def _from_output(prompt_ids, prompt_mask, out: SampleOutput) -> Rollout:
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        tokens=out.tokens,
        mask=out.completion_mask,
        sampler_logps=out.logprobs,
    )


def _sampling_hparams(hp: RLHParams) -> SamplingHParams:
    return SamplingHParams(temperature=hp.temperature, top_p=hp.top_p)


def rollout(
    policy: Any, prompts: dict[str, jax.Array], rng: jax.Array, hp: RLHParams, *, cfg: RLConfig
) -> Rollout:
    """Samples k completions of every prompt from the policy's parameters.

    Args:
      policy: the policy's `ModelState` (its `params` and `graphdef` are used as they are).
      prompts: `input_ids` and `attention_mask` [prompts_per_iteration, P], left-padded.
      rng: the rollout's key (the sampler folds in the step index).
      hp: temperature and top-p are read.
      cfg: static settings (k, the sampler's config).

    Returns:
      A `Rollout` of `cfg.rollout_batch_size` rows, prompt i's samples at rows i*k .. i*k+k-1.
    """
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    if ids.shape[0] != cfg.prompts_per_iteration:
        raise ValueError(
            f"{ids.shape[0]} prompts given, RLConfig.prompts_per_iteration="
            f"{cfg.prompts_per_iteration}"
        )
    k = cfg.samples_per_prompt
    ids = constrain_rows(jnp.repeat(jnp.asarray(ids, jnp.int32), k, axis=0))
    mask = constrain_rows(jnp.repeat(jnp.asarray(mask, jnp.int32), k, axis=0))
    out = generate(
        policy.params,
        ids,
        mask,
        rng,
        _sampling_hparams(hp),
        graphdef=policy.graphdef,
        config=cfg.sampling_config,
    )
    return _from_output(ids, mask, out)


def greedy_rollout(
    policy: Any, prompts: dict[str, jax.Array], hp: RLHParams, *, cfg: RLConfig
) -> Rollout:
    """One greedy completion per prompt (ReMax's baseline; Li et al. 2024), not repeated."""
    ids = constrain_rows(jnp.asarray(prompts["input_ids"], jnp.int32))
    mask = constrain_rows(jnp.asarray(prompts["attention_mask"], jnp.int32))
    out = generate(
        policy.params,
        ids,
        mask,
        jax.random.key(0),  # unused by greedy decoding
        _sampling_hparams(hp),
        graphdef=policy.graphdef,
        config=cfg.greedy_config,
    )
    return _from_output(ids, mask, out)


def _safe_temperature(temperature: jax.Array) -> jax.Array:
    t = jnp.asarray(temperature, jnp.float32)
    return jnp.where(t > 0, t, 1.0)


def _completion_hidden(model: Any, ro: Rollout) -> jax.Array:
    """The policy's final hidden states that predict each completion token, [B, N, D]."""
    hidden_BSD, _ = model.forward(ro.input_ids, ro.attention_mask, ro.positions)
    prompt_len = ro.prompt_ids.shape[1]
    return hidden_BSD[:, prompt_len - 1 : -1]


def _logps_from_hidden(model, hidden_BND, ro: Rollout, temperature, chunk_size, entropy):
    inv_t = 1.0 / _safe_temperature(temperature)

    def unembed(h):
        return model.unembed(h) * inv_t

    if chunk_size >= ro.tokens.shape[1]:
        # The whole completion's logits in one piece: no map and no rematerialisation, a
        # smaller program (short completions, tests); same numbers as the chunked path.
        logits_BNV = unembed(hidden_BND)
        logps_BN = token_logprobs(logits_BNV, ro.tokens)
        return (logps_BN, entropy_from_logits(logits_BNV)) if entropy else logps_BN
    return chunked_token_logprobs(
        hidden_BND, unembed, ro.tokens, chunk_size, return_entropy=entropy
    )


def completion_logps(
    graphdef: nnx.GraphDef,
    params: Any,
    ro: Rollout,
    *,
    temperature: jax.Array,
    chunk_size: int,
    entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Teacher-forced log-probs of the completion tokens, [B, N] float32.

    Logits are divided by the sampling temperature, so the log-probs are those of the
    distribution the sampler draws from (before top-k / top-p), as TRL and verl compute them
    for the policy and the reference alike. Differentiable in `params`.

    Args:
      graphdef, params: a `Transformer` (policy or reference).
      ro: the rollout.
      temperature: traced; 0 (greedy) is treated as 1.
      chunk_size: positions unembedded at a time (`ops.chunked_token_logprobs`).
      entropy: also return the per-token entropy of that distribution.

    Returns:
      `logps_BN`, or `(logps_BN, entropy_BN)`; values on padding are meaningless (mask them).
    """
    model = nnx.merge(graphdef, params)
    hidden_BND = _completion_hidden(model, ro)
    return _logps_from_hidden(model, hidden_BND, ro, temperature, chunk_size, entropy)


def completion_logps_and_values(
    graphdef: nnx.GraphDef,
    params: Any,
    head_graphdef: nnx.GraphDef,
    head_params: Any,
    ro: Rollout,
    *,
    temperature: jax.Array,
    chunk_size: int,
    entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """One forward of the policy's trunk for its log-probs and its value head's values.

    The critic `RLConfig.value_model = "head"`: a `models.ValueHead` on the policy's final
    hidden states. Both outputs read the same hidden states, so a loss on the values
    differentiates into the trunk's parameters (`params`) as well as the head's. The log-probs
    are exactly `completion_logps(graphdef, params, ...)`'s (the head does not touch them).

    Args:
      graphdef, params: the policy (`Transformer`).
      head_graphdef, head_params: its `ValueHead`.
      ro, temperature, chunk_size, entropy: as for `completion_logps`.

    Returns:
      `(logps_BN, entropy_BN or None, values_BN)`, float32; padding is meaningless. The value
      at completion token j is V of the context before it (column P - 1 + j), as in
      `completion_values`.
    """
    model = nnx.merge(graphdef, params)
    hidden_BND = _completion_hidden(model, ro)
    out = _logps_from_hidden(model, hidden_BND, ro, temperature, chunk_size, entropy)
    logps, ent = out if entropy else (out, None)
    values_BN = nnx.merge(head_graphdef, head_params)(hidden_BND)
    return logps, ent, values_BN


def completion_values(graphdef: nnx.GraphDef, params: Any, ro: Rollout) -> jax.Array:
    """A critic's (`ScalarModel`'s) value V(s_t) of each completion token's context, [B, N].

    V at completion token j is read from the hidden state that predicts it (column P - 1 + j),
    i.e. the value of the state before the token is chosen, as GAE expects.
    """
    model = nnx.merge(graphdef, params)
    values_BSK = model(ro.input_ids, ro.attention_mask, ro.positions, per_token=True)
    prompt_len = ro.prompt_ids.shape[1]
    return values_BSK[:, prompt_len - 1 : -1, 0]


def tokens_scorer(fn: Callable[[jax.Array, jax.Array], jax.Array]) -> ScoreFn:
    """A `ScoreFn` from a pure `fn(tokens_BN, mask_BN) -> scores_B` of the completions alone
    (a synthetic or rule-based reward that needs no model)."""

    def score(frozen: Frozen, ro: Rollout) -> jax.Array:
        del frozen
        return jnp.asarray(fn(ro.tokens, ro.mask), jnp.float32)

    return score


def reward_model_scorer(
    reward_fn: Callable[..., dict[str, jax.Array]],
    *,
    name: str = "reward",
    field: str = "mean",
    std_coef: float = 1.0,
) -> ScoreFn:
    """A `ScoreFn` from `steps.reward.make_reward_fn`'s function and the frozen model `name`.

    Args:
      reward_fn: `reward_fn(params, input_ids, attention_mask, std_coef) -> dict`.
      name: the reward model's key in `Frozen.params`.
      field: "mean" (the ensemble's mean) or "conservative" (mean - std_coef * std; Coste et
        al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization").
      std_coef: k of the conservative estimate.
    """

    def score(frozen: Frozen, ro: Rollout) -> jax.Array:
        out = reward_fn(frozen.params[name], ro.input_ids, ro.attention_mask, std_coef)
        return jnp.asarray(out[field], jnp.float32)

    return score
