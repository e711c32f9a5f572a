"""One online-RL iteration (PPO with a critic, and the critic-free family) as pure functions.

This module owns the iteration `rollout -> score -> reference/value forwards -> rewards and
advantages -> epochs x minibatches` (purejaxrl-style, Huang et al. 2024's details as switches
of `RLConfig`):

- `rl_iteration(state, frozen, prompts, rng, hp, *, cfg, score_fn)`: the whole iteration, one
  program, when the reward is a pure function (the reward model, a synthetic reward).
- `rollout_program` -> host-side scores -> `update_program`: the same iteration split in two
  programs around a host judge; for the same scores it gives the same result.
- `prepare_batch` (shaped rewards, advantages, KL controller and reward-moment updates, the
  rollout's diagnostics) and `update` (`lax.scan` over epochs and minibatches, clipped policy
  loss + value loss, NaN guard) are the pieces, each pure.

State (issue 13's named models): `state.models["policy"]` (and `["value"]` for PPO: a separate
`ScalarModel`, or with `value_model="head"` only a `ValueHead` read from the policy's trunk) are
`ModelState`s; `state.extra` holds `kl_ctl`, `reward_moments`, `baseline`
(`rl_config.init_rl_extra`); `state.step` counts iterations. `frozen.params["ref"]` is the
reference (SFT) policy. Randomness: `fold_in(rng, state.step)`, split into the rollout's and the
update's keys, so a resumed run draws the same samples.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from rlhf_jax.losses.advantages import (
    clip_rewards,
    compute_advantages,
    ended_with_stop,
    mask_truncated,
    missing_eos_penalty,
    token_rewards,
)
from rlhf_jax.losses.controllers import (
    normalize_with_moments,
    running_mean_update,
    update_kl_controller,
    update_moments,
)
from rlhf_jax.losses.policy import (
    aggregate_loss,
    explained_variance,
    kl_loss_per_token,
    policy_loss,
    value_loss,
)
from rlhf_jax.ops.kl import KL_KINDS, kl_penalty
from rlhf_jax.ops.logprobs import masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_jax.steps.rl_config import RLConfig, RLHParams
from rlhf_jax.steps.rollout import (
    Rollout,
    ScoreFn,
    completion_logps,
    completion_logps_and_values,
    completion_values,
    constrain_rows,
    greedy_rollout,
    rollout,
)
from rlhf_jax.steps.state import Frozen

Metrics = dict[str, jax.Array]


@struct.dataclass
class RLBatch:
    """What the update reads, per completion row ([B, N] unless noted)."""

    rollout: Rollout
    mask: jax.Array  # float32 training mask (truncated rows zeroed with mask_truncated)
    old_logps: jax.Array
    ref_logps: jax.Array  # zeros without a reference
    old_values: jax.Array  # zeros without a critic
    advantages: jax.Array
    returns: jax.Array


def _mean_std(x: jax.Array, mask: jax.Array, prefix: str) -> Metrics:
    any_token = jnp.any(mask > 0)  # min/max are 0, not inf, when every row is masked out
    return {
        f"{prefix}/mean": masked_mean(x, mask),
        f"{prefix}/std": jnp.sqrt(masked_var(x, mask)),
        f"{prefix}/min": jnp.where(any_token, jnp.min(jnp.where(mask > 0, x, jnp.inf)), 0.0),
        f"{prefix}/max": jnp.where(any_token, jnp.max(jnp.where(mask > 0, x, -jnp.inf)), 0.0),
    }


def kl_coef(state: Any, hp: RLHParams, cfg: RLConfig) -> jax.Array:
    """This iteration's beta: `hp.kl_coef` (fixed) or the adaptive controller's state."""
    if cfg.kl_controller == "adaptive":
        return state.extra["kl_ctl"].coef
    return hp.kl_coef


def _score_shaper(scores_B, ended_B, moments, hp: RLHParams, cfg: RLConfig):
    """The map raw score -> shaped score of this rollout: missing-EOS penalty, then
    normalisation, then clipping (Huang et al. 2024's order).

    The normalisation's statistics come from this rollout's (penalised) scores (or the running
    moments), so ReMax's greedy baseline is shaped by exactly the same affine map.
    """
    penalised = missing_eos_penalty(scores_B, ended_B, hp.missing_eos_penalty)
    if cfg.reward_norm == "batch":
        ones = jnp.ones_like(penalised)
        mean, inv_std = (
            masked_mean(penalised, ones),
            jax.lax.rsqrt(masked_var(penalised, ones) + 1e-8),
        )

    def shape(s_B, ended):
        s = missing_eos_penalty(s_B, ended, hp.missing_eos_penalty)
        if cfg.reward_norm == "running":
            s = normalize_with_moments(moments, s)
        elif cfg.reward_norm == "batch":
            s = (s - mean) * inv_std
        if cfg.clip_reward:
            s = clip_rewards(s, hp.reward_clip)
        return s

    return shape


def _ended(ro: Rollout, cfg: RLConfig) -> jax.Array:
    stops = cfg.sampling_config.stop_tokens
    if not stops:
        return jnp.zeros(ro.tokens.shape[:1], bool)
    return ended_with_stop(ro.tokens, ro.mask, stops)


def _forwards(state: Any, frozen: Frozen, ro: Rollout, hp: RLHParams, cfg: RLConfig):
    """Teacher-forced forwards of the sampling parameters, the reference and the critic.

    With a value head (`cfg.value_head`) the policy's forward gives the values too; a separate
    critic runs its own forward.

    Returns `(tf_logps, entropy, old_logps, ref_logps, old_values)`, [B, N], 0 on padding.
    """
    sg = jax.lax.stop_gradient
    comp_mask = ro.mask != 0
    policy = state.models["policy"]
    tf_kw = dict(temperature=hp.temperature, chunk_size=cfg.logits_chunk_size, entropy=True)
    if cfg.value_head:
        head = state.models["value"]
        tf_logps, entropy, values = completion_logps_and_values(
            policy.graphdef, sg(policy.params), head.graphdef, sg(head.params), ro, **tf_kw
        )
    else:
        tf_logps, entropy = completion_logps(policy.graphdef, sg(policy.params), ro, **tf_kw)
    old_logps = tf_logps if cfg.old_logps == "teacher_forced" else ro.sampler_logps
    old_logps = jnp.where(comp_mask, old_logps, 0.0)
    if cfg.use_reference:
        ref_logps = completion_logps(
            frozen.graphdefs["ref"], sg(frozen.params["ref"]), ro,
            temperature=hp.temperature, chunk_size=cfg.logits_chunk_size,
        )  # fmt: skip
        ref_logps = jnp.where(comp_mask, ref_logps, 0.0)
    else:
        ref_logps = old_logps  # no reference: every KL term is 0
    if cfg.has_critic:
        if not cfg.value_head:
            value = state.models["value"]
            values = completion_values(value.graphdef, sg(value.params), ro)
        old_values = jnp.where(comp_mask, values, 0.0)
    else:
        old_values = jnp.zeros_like(old_logps)
    return tf_logps, entropy, old_logps, ref_logps, old_values


def prepare_batch(
    state: Any,
    frozen: Frozen,
    ro: Rollout,
    scores_B: jax.Array,
    hp: RLHParams,
    *,
    cfg: RLConfig,
    greedy: Rollout | None = None,
    greedy_scores: jax.Array | None = None,
) -> tuple[RLBatch, dict[str, Any], Metrics]:
    """Teacher-forced forwards, shaped rewards and advantages of a scored rollout.

    Args:
      state: the train state (policy, value, extras).
      frozen: frozen models ("ref").
      ro: the rollout; scores_B: one score per row (the proxy reward).
      hp, cfg: hyperparameters and settings.
      greedy, greedy_scores: ReMax's greedy rollout and its scores (estimator "remax").

    Returns:
      `(batch, new_extra, metrics)`: the update's inputs, `state.extra` after this rollout
      (KL controller, reward moments, baseline), and the rollout's diagnostics.
    """
    sg = jax.lax.stop_gradient
    comp_mask = (ro.mask != 0).astype(jnp.float32)
    ended_B = _ended(ro, cfg)
    mask = mask_truncated(comp_mask, ended_B) if cfg.mask_truncated else comp_mask
    extra = dict(state.extra)
    tf_logps, entropy, old_logps, ref_logps, old_values = _forwards(state, frozen, ro, hp, cfg)

    # Scores -> per-token rewards.
    moments = extra["reward_moments"]
    if cfg.reward_norm == "running":
        penalised = missing_eos_penalty(scores_B, ended_B, hp.missing_eos_penalty)
        moments = extra["reward_moments"] = update_moments(moments, penalised)
    shape = _score_shaper(scores_B, ended_B, moments, hp, cfg)
    shaped_B = shape(scores_B, ended_B)
    beta = kl_coef(state, hp, cfg)
    kl_BN = kl_penalty(old_logps, ref_logps, cfg.kl_estimator) * comp_mask
    rewards_BN = token_rewards(shaped_B, mask, kl_BN if cfg.kl_in_reward else None, beta)

    baseline_B = None
    if cfg.estimator == "remax":
        greedy_shaped = shape(greedy_scores, _ended(greedy, cfg))
        baseline_B = jnp.repeat(greedy_shaped, cfg.samples_per_prompt)
    elif cfg.estimator == "running_mean":
        baseline_B = jnp.broadcast_to(extra["baseline"].value, shaped_B.shape)
        extra["baseline"] = running_mean_update(
            extra["baseline"], jnp.sum(rewards_BN, axis=-1), decay=hp.baseline_decay
        )
    advantages, returns = compute_advantages(
        rewards_BN, mask, estimator=cfg.estimator, values_BT=old_values, baseline_B=baseline_B,
        gamma=hp.gamma, lam=hp.lam, group_size=cfg.samples_per_prompt, eps=hp.adv_eps,
    )  # fmt: skip
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)

    # KL to the reference per estimator, as sums over each completion (nats per sequence).
    seq_kls = {
        kind: masked_sum(kl_penalty(old_logps, ref_logps, kind), comp_mask, axis=-1)
        for kind in KL_KINDS
    }
    if cfg.kl_controller == "adaptive":
        extra["kl_ctl"] = update_kl_controller(
            extra["kl_ctl"], jnp.mean(seq_kls[cfg.kl_estimator]), cfg.rollout_batch_size,
            kind="adaptive", target=hp.kl_target, horizon=hp.kl_horizon,
        )  # fmt: skip

    metrics = _rollout_metrics(
        ro, scores_B, shaped_B, rewards_BN, seq_kls, beta, entropy, tf_logps, ended_B,
        advantages, returns, old_values, mask, cfg,
    )  # fmt: skip
    if cfg.estimator == "remax":
        metrics["reward/greedy"] = jnp.mean(greedy_scores)
    batch = RLBatch(
        rollout=ro, mask=mask, old_logps=sg(old_logps), ref_logps=sg(ref_logps),
        old_values=sg(old_values), advantages=sg(advantages), returns=sg(returns),
    )  # fmt: skip
    return batch, extra, metrics


def _rollout_metrics(
    ro, scores_B, shaped_B, rewards_BN, seq_kls, beta, entropy, tf_logps, ended_B,
    advantages, returns, old_values, mask, cfg: RLConfig,
) -> Metrics:  # fmt: skip
    """The rollout's diagnostics (rewards, KL per estimator, entropy, sampler gap, ...)."""
    rows = jnp.ones_like(scores_B)
    comp_mask = (ro.mask != 0).astype(jnp.float32)
    gap = jnp.where(comp_mask > 0, ro.sampler_logps - tf_logps, 0.0)
    metrics: Metrics = {
        "reward/proxy": jnp.mean(scores_B),
        "reward/proxy_std": jnp.sqrt(masked_var(scores_B, rows)),
        "reward/shaped": jnp.mean(shaped_B),
        "reward/total": jnp.mean(jnp.sum(rewards_BN, axis=-1)),
        **{f"kl/{kind}": jnp.mean(v) for kind, v in seq_kls.items()},
        "kl/coef": jnp.asarray(beta, jnp.float32),
        "entropy": masked_mean(entropy, comp_mask),
        # The trainer-sampler mismatch: the sampler's log-probs against a teacher-forced
        # forward of the very same parameters (0 up to numerics unless top-k/top-p filter).
        "sampler/logp_gap_abs": masked_mean(jnp.abs(gap), comp_mask),
        "sampler/logp_gap_max": jnp.max(jnp.abs(gap)),
        "sampler/kl_k3": masked_mean(kl_penalty(ro.sampler_logps, tf_logps, "k3"), comp_mask),
        "response/length": jnp.mean(ro.lengths.astype(jnp.float32)),
        "response/eos_share": jnp.mean(ended_B.astype(jnp.float32)),
        **_mean_std(advantages, mask, "advantages"),
        **_mean_std(returns, mask, "returns"),
    }
    if cfg.has_critic:
        metrics["value/explained_var"] = explained_variance(old_values, returns, mask)
        metrics["value/rollout_mean"] = masked_mean(old_values, mask)
    return metrics


def _policy_forward(params, ro: Rollout, models, hp: RLHParams, cfg: RLConfig):
    """(logps, entropy or None, values or None) of a minibatch under `params`: one forward of
    the policy's trunk (its value head included with `cfg.value_head`), and the separate
    critic's own forward otherwise."""
    policy = models["policy"]
    kw = dict(temperature=hp.temperature, chunk_size=cfg.logits_chunk_size,
              entropy=cfg.entropy_bonus)  # fmt: skip
    if cfg.value_head:
        head = models["value"]
        return completion_logps_and_values(
            policy.graphdef, params["policy"], head.graphdef, params["value"], ro, **kw
        )
    out = completion_logps(policy.graphdef, params["policy"], ro, **kw)
    logps, entropy = out if cfg.entropy_bonus else (out, None)
    values = None
    if cfg.has_critic:
        values = completion_values(models["value"].graphdef, params["value"], ro)
    return logps, entropy, values


def _minibatch_loss(params, mb: RLBatch, models, beta, hp: RLHParams, cfg: RLConfig):
    """Total loss of one minibatch (policy + vf_coef * value) and its statistics.

    With a value head the value loss differentiates into the shared trunk as well (through
    the hidden states both heads read), weighted by `vf_coef` like the head itself.
    """
    ro, mask = mb.rollout, mb.mask
    logps, entropy, v_BN = _policy_forward(params, ro, models, hp, cfg)
    pl_BN, sums = policy_loss(
        logps, mb.old_logps, mb.advantages, mask, loss_type=cfg.policy_loss,
        ratio_level=cfg.ratio_level, eps_low=hp.eps_low, eps_high=hp.eps_high,
        dual_clip_c=hp.dual_clip_c if cfg.dual_clip else None,
    )  # fmt: skip
    per_token = pl_BN
    if entropy is not None:
        per_token = per_token - hp.entropy_coef * jnp.where(mask > 0, entropy, 0.0)
    if cfg.use_reference and not cfg.kl_in_reward:
        # The KL as a loss term (GRPO, Shao et al. 2024, Eq. 4), same aggregation.
        per_token = per_token + beta * kl_loss_per_token(
            logps, mb.ref_logps, mask, kind=cfg.kl_estimator
        )
    loss_sum, denom = aggregate_loss(per_token, mask, mode=cfg.loss_agg_mode,
                                     max_len=cfg.max_new_tokens)  # fmt: skip
    p_loss = loss_sum / jnp.maximum(denom, 1.0)
    tokens = jnp.maximum(sums.pop("tokens"), 1.0)
    aux = {k: v / tokens for k, v in sums.items()}
    aux["loss/policy"] = p_loss
    total = p_loss
    if cfg.has_critic:
        vl_BN, vsums = value_loss(
            v_BN, mb.old_values, mb.returns, mask,
            clip_range=hp.value_clip if cfg.value_clip else None,
        )  # fmt: skip
        v_tokens = jnp.maximum(vsums.pop("tokens"), 1.0)
        v_loss = jnp.sum(vl_BN) / v_tokens
        aux.update({k: v / v_tokens for k, v in vsums.items()})
        aux["loss/value"] = v_loss
        total = total + hp.vf_coef * v_loss
    return total, aux


def update(
    state: Any, batch: RLBatch, rng: jax.Array, hp: RLHParams, beta: jax.Array, *, cfg: RLConfig
) -> tuple[Any, Metrics]:
    """Epochs x minibatches of guarded optimiser steps on every trained model (`lax.scan`).

    Each epoch draws a row permutation from `fold_in(rng, epoch)` (or strides rows when
    `shuffle_minibatches` is off) and splits it into `cfg.num_minibatches` minibatches. A
    minibatch whose loss or gradients are non-finite (or is poisoned by `hp.debug_nan_step`)
    changes nothing (`ModelState.apply_gradients(..., ok=False)`) and is recorded in
    `state.nonfinite`; during `critic_warmup` iterations only the critic is updated.

    Returns:
      The state (models and `nonfinite` updated; `step` unchanged) and the metrics averaged
      over all minibatches.
    """
    B, M = cfg.rollout_batch_size, cfg.num_minibatches
    poison = state.step == hp.debug_nan_step
    policy_on = state.step >= cfg.critic_warmup
    grad_fn = jax.value_and_grad(_minibatch_loss, has_aux=True)

    def minibatch(carry, idx):
        models, nonfinite = carry
        mb = jax.tree.map(lambda x: constrain_rows(x[idx]), batch)
        params = {name: m.params for name, m in models.items()}
        (loss, aux), grads = grad_fn(params, mb, models, beta, hp, cfg)
        loss = jnp.where(poison, jnp.nan, loss)
        grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
        norms = {name: optax.tree.norm(g) for name, g in grads.items()}
        loss_ok = jnp.isfinite(loss)
        grads_ok = jnp.all(jnp.stack([jnp.isfinite(n) for n in norms.values()]))
        ok = loss_ok & grads_ok
        new_models = {}
        for name, m in models.items():
            ok_m = ok & policy_on if name == "policy" else ok
            new_models[name] = m.apply_gradients(grads[name], lr_scale=hp.lr_scale, ok=ok_m)
        nonfinite = nonfinite.record(state.step, loss_ok, grads_ok)
        aux = {**aux, "loss/total": loss, **{f"grad_norm/{n}": v for n, v in norms.items()}}
        return (new_models, nonfinite), aux

    def epoch(carry, e):
        if cfg.shuffle_minibatches:
            order = jax.random.permutation(jax.random.fold_in(rng, e), B)
        else:
            order = jnp.arange(B)
        # Row r of minibatch m is order[r * M + m]: strided, so with rows sharded in blocks
        # every device contributes equally to each minibatch when the order is the identity.
        idx_MS = order.reshape(B // M, M).T
        return jax.lax.scan(minibatch, carry, idx_MS)

    (models, nonfinite), aux_EM = jax.lax.scan(
        epoch, (state.models, state.nonfinite), jnp.arange(cfg.epochs)
    )
    metrics = {k: jnp.mean(v) for k, v in aux_EM.items()}
    metrics["nonfinite/skipped"] = nonfinite.skipped
    lr = state.models["policy"].lr_schedule
    if lr is not None:
        # At the iteration's first optimiser step (the schedule counts optimiser steps).
        first = state.step * cfg.epochs * cfg.num_minibatches
        metrics["lr"] = jnp.asarray(lr(first), jnp.float32) * hp.lr_scale
    return state.replace(models=models, nonfinite=nonfinite), metrics


def _keys(state: Any, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rollout key, update key) of this iteration."""
    rng = jax.random.fold_in(rng, state.step)
    return jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)


def rollout_program(
    state: Any, frozen: Frozen, prompts: dict[str, jax.Array], rng: jax.Array, hp: RLHParams,
    *, cfg: RLConfig,
) -> tuple[Rollout, Rollout | None]:  # fmt: skip
    """First program of the split iteration: the rollout (and ReMax's greedy rollout).

    Score every row of the rollout (and of the greedy rollout, for "remax") on the host, then
    call `update_program` with the same state, rng and hparams. Do not donate `state` here.
    """
    del frozen
    rollout_key, _ = _keys(state, rng)
    policy = state.models["policy"]
    ro = rollout(policy, prompts, rollout_key, hp, cfg=cfg)
    greedy = greedy_rollout(policy, prompts, hp, cfg=cfg) if cfg.estimator == "remax" else None
    return ro, greedy


def update_program(
    state: Any, frozen: Frozen, ro: Rollout, scores_B: jax.Array, rng: jax.Array,
    hp: RLHParams, *, cfg: RLConfig, greedy: Rollout | None = None,
    greedy_scores: jax.Array | None = None,
) -> tuple[Any, Metrics]:  # fmt: skip
    """Second program of the split iteration: forwards, advantages, update; `step` + 1.

    Args:
      state, rng, hp: exactly those given to `rollout_program`.
      frozen: frozen models ("ref").
      ro, greedy: `rollout_program`'s outputs.
      scores_B, greedy_scores: the host's scores of their rows (float32 [B] and [prompts]).
      cfg: static settings.
    """
    _, update_key = _keys(state, rng)
    ro = jax.tree.map(constrain_rows, ro)
    scores_B = constrain_rows(jnp.asarray(scores_B, jnp.float32))
    batch, extra, metrics = prepare_batch(
        state, frozen, ro, scores_B, hp, cfg=cfg, greedy=greedy, greedy_scores=greedy_scores
    )
    beta = kl_coef(state, hp, cfg)
    state, update_metrics = update(state, batch, update_key, hp, beta, cfg=cfg)
    state = state.replace(step=state.step + 1, extra=extra)
    return state, {**metrics, **update_metrics}


def rl_iteration(
    state: Any, frozen: Frozen, prompts: dict[str, jax.Array], rng: jax.Array, hp: RLHParams,
    *, cfg: RLConfig, score_fn: ScoreFn,
) -> tuple[Any, Metrics]:  # fmt: skip
    """One whole online-RL iteration as one pure program (the reward is a pure function).

    rollout (k samples per prompt from the policy's own parameter arrays) -> `score_fn` ->
    reference / critic forwards -> shaped rewards and advantages -> epochs x minibatches.

    Args:
      state: train state with `models["policy"]` (and `["value"]`), `extra`, `step`.
      frozen: frozen models: "ref" (and whatever `score_fn` reads, e.g. "reward").
      prompts: `input_ids`, `attention_mask` [prompts_per_iteration, P], left-padded.
      rng: the run's base key (folded with `state.step` here).
      hp: traced hyperparameters.
      cfg: static settings.
      score_fn: `(frozen, rollout) -> scores [B]`, pure (e.g. `reward_model_scorer(...)`).

    Returns:
      `(state, metrics)`: `step` + 1, models, `extra` and `nonfinite` updated; metrics as
      listed in docs (reward/*, kl/*, entropy, ppo/*, sampler/*, value/*, advantages/*,
      returns/*, response/*, loss/*, grad_norm/*).
    """
    ro, greedy = rollout_program(state, frozen, prompts, rng, hp, cfg=cfg)
    scores_B = score_fn(frozen, ro)
    greedy_scores = score_fn(frozen, greedy) if greedy is not None else None
    return update_program(
        state, frozen, ro, scores_B, rng, hp, cfg=cfg, greedy=greedy, greedy_scores=greedy_scores
    )


def jit_rl_iteration(cfg: RLConfig, score_fn: ScoreFn, *, donate: bool = True):
    """`rl_iteration` jitted with `cfg` and `score_fn` bound (state donated when `donate`).

    Shardings follow the inputs (placed by the caller); call it under the mesh and rules.
    """
    fn = functools.partial(rl_iteration, cfg=cfg, score_fn=score_fn)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())
