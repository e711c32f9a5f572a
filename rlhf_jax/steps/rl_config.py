"""Settings and carried state of the online-RL iteration (PPO and the critic-free family).

This module owns `RLConfig`, the static settings of one RL iteration (every implementation
detail of Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", as a switch:
estimator, ratio level, policy loss, loss aggregation, KL estimator, KL in the reward or in the
loss, fixed or adaptive KL coefficient, critic, rollout shape, epochs and minibatches, reward
and advantage normalisation), validated before any work with messages that name the setting;
`RLHParams`, the traced continuous hyperparameters (changing them never recompiles); and the
algorithm state the iteration carries in `TrainState.extra` (KL controller, running reward
moments, running-mean baseline).

The pure functions that use them live in `steps/rollout.py` (sampling and teacher-forced
forwards) and `steps/rl.py` (advantages, update, the iteration). The losses and estimators
themselves, with their papers, are in `rlhf_jax.losses` (see docs/PPO.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax.errors import SettingsError
from rlhf_jax.generate import SamplingConfig
from rlhf_jax.losses.advantages import ADVANTAGE_ESTIMATORS, GROUPED_ESTIMATORS
from rlhf_jax.losses.controllers import (
    KL_CONTROLLERS,
    KLControllerState,
    RunningMean,
    RunningMoments,
)
from rlhf_jax.losses.policy import check_policy_choices
from rlhf_jax.steps import state as state_lib

VALUE_MODELS: tuple[str, ...] = ("separate", "head", "none")
REWARD_NORMS: tuple[str, ...] = ("none", "running", "batch")
OLD_LOGPS: tuple[str, ...] = ("teacher_forced", "sampler")
# "ppo" names PPO's estimator as verl/OpenRLHF users say it; it is GAE with a critic.
ESTIMATOR_ALIASES: dict[str, str] = {"ppo": "gae"}


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SettingsError(f"RLConfig.{name}={value!r} must be an integer >= {minimum}")


def _one_of(name: str, value: Any, known: tuple[str, ...]) -> None:
    if value not in known:
        raise SettingsError(f"RLConfig.{name}={value!r} is not one of {known}")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Static settings of one online-RL iteration (hashable; bound before `jit`).

    Attributes:
      estimator: advantage estimator, one of `losses.ADVANTAGE_ESTIMATORS` ("gae" is PPO with
        a critic, alias "ppo"; "rloo", "grpo", "dr_grpo", "reinforce", "reinforce_pp",
        "reinforce_pp_baseline", "remax", "running_mean").
      policy_loss: "ppo" (clipped surrogate) or "cispo" (clipped, stopped IS weights).
      ratio_level: "token" (PPO) or "sequence" (GSPO).
      loss_agg_mode: verl's `loss_agg_mode` (`losses.LOSS_AGG_MODES`).
      kl_estimator: "k1", "k2" or "k3" (the KL to the reference, in the reward or the loss).
      kl_in_reward: fold -beta * KL_t into the per-token reward (PPO, REINFORCE++); False adds
        beta * KL to the loss instead (GRPO's choice).
      kl_controller: "fixed" (beta = `RLHParams.kl_coef`) or "adaptive" (Ziegler et al. 2019;
        beta lives in `extra["kl_ctl"]`, starting from `RLHParams.kl_coef`).
      use_reference: run the frozen reference ("ref") at all; False drops every KL term.
      value_model: the critic of "gae": "separate" (its own transformer, `models["value"]` a
        `ScalarModel`), "head" (a `models.ValueHead` on the policy's trunk: `models["value"]`
        holds only the head, the policy's one forward gives logits and values and the value
        loss, times `vf_coef`, trains the shared trunk too), or "none" (critic-free estimators).
      critic_warmup: iterations at the start that train only the critic (with "head": only
        the head, the shared trunk stays the policy's).
      prompts_per_iteration: prompts sampled per iteration.
      samples_per_prompt: k completions per prompt (consecutive rows form a group).
      epochs: passes over the rollout per iteration.
      num_minibatches: optimiser steps per epoch; must divide the rollout batch.
      shuffle_minibatches: a fresh row permutation per epoch (else strided minibatches).
      max_new_tokens, min_new_tokens, top_k, eos_id, stop_ids, pad_id, use_top_p,
        segment_len: the sampler's static settings (`generate.SamplingConfig`).
      old_logps: the PPO ratio's denominator: "teacher_forced" (a forward of the sampling
        parameters over the rollout, as verl recomputes it) or "sampler" (the sampler's own
        log-probs, saving that forward).
      reward_norm: "none", "running" (running mean/std of the scores, OpenRLHF's
        `normalize_reward`) or "batch" (whiten the scores over the rollout).
      clip_reward: clip scores to +-`RLHParams.reward_clip`.
      whiten_advantages: whiten advantages over the rollout's tokens (Huang et al. 2024).
      mask_truncated: completions without EOS get no gradient (DAPO's overlong filtering).
      dual_clip: the dual clip of Ye et al. 2020 (c = `RLHParams.dual_clip_c`), "ppo" only.
      value_clip: clip the value loss around the rollout's values (`RLHParams.value_clip`).
      entropy_bonus: add -entropy_coef * entropy to the loss (costs a softmax per token).
      logits_chunk_size: sequence positions unembedded at a time in teacher-forced forwards.
    """

    estimator: str = "rloo"
    policy_loss: str = "ppo"
    ratio_level: str = "token"
    loss_agg_mode: str = "token_mean"
    kl_estimator: str = "k1"
    kl_in_reward: bool = True
    kl_controller: str = "fixed"
    use_reference: bool = True
    value_model: str = "none"
    critic_warmup: int = 0
    prompts_per_iteration: int = 8
    samples_per_prompt: int = 4
    epochs: int = 1
    num_minibatches: int = 1
    shuffle_minibatches: bool = True
    max_new_tokens: int = 16
    min_new_tokens: int = 0
    top_k: int = 0
    eos_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    use_top_p: bool = False
    segment_len: int = 0
    old_logps: str = "teacher_forced"
    reward_norm: str = "none"
    clip_reward: bool = False
    whiten_advantages: bool = False
    mask_truncated: bool = False
    dual_clip: bool = False
    value_clip: bool = False
    entropy_bonus: bool = False
    logits_chunk_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "estimator", ESTIMATOR_ALIASES.get(self.estimator, self.estimator))
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))
        known = ADVANTAGE_ESTIMATORS + tuple(ESTIMATOR_ALIASES)
        _one_of("estimator", self.estimator, known)
        try:
            check_policy_choices(
                loss_type=self.policy_loss,
                ratio_level=self.ratio_level,
                agg_mode=self.loss_agg_mode,
                kl_estimator=self.kl_estimator,
                dual_clip=self.dual_clip,
            )
        except ValueError as e:
            raise SettingsError(f"RLConfig: {e}") from None
        _one_of("kl_controller", self.kl_controller, KL_CONTROLLERS)
        _one_of("value_model", self.value_model, VALUE_MODELS)
        _one_of("reward_norm", self.reward_norm, REWARD_NORMS)
        _one_of("old_logps", self.old_logps, OLD_LOGPS)
        for name in ("prompts_per_iteration", "samples_per_prompt", "epochs", "num_minibatches"):
            _positive_int(name, getattr(self, name))
        for name in ("max_new_tokens", "logits_chunk_size"):
            _positive_int(name, getattr(self, name))
        _positive_int("critic_warmup", self.critic_warmup, minimum=0)
        if self.estimator == "gae" and self.value_model == "none":
            raise SettingsError(
                "RLConfig.estimator='gae' (PPO) needs a critic: set value_model='separate' "
                "(a value model) or 'head' (a value head on the policy's trunk)"
            )
        if self.estimator != "gae" and self.value_model != "none":
            raise SettingsError(
                f"RLConfig.value_model={self.value_model!r} is only used by estimator='gae'; "
                f"estimator={self.estimator!r} is critic-free (set value_model='none')"
            )
        if self.critic_warmup and self.value_model == "none":
            raise SettingsError("RLConfig.critic_warmup > 0 needs a critic (value_model)")
        if self.estimator in GROUPED_ESTIMATORS and self.samples_per_prompt < 2:
            raise SettingsError(
                f"RLConfig.samples_per_prompt={self.samples_per_prompt}: estimator="
                f"{self.estimator!r} compares the samples of one prompt and needs "
                "samples_per_prompt >= 2"
            )
        if self.rollout_batch_size % self.num_minibatches:
            raise SettingsError(
                f"RLConfig.num_minibatches={self.num_minibatches} does not divide the rollout "
                f"batch of {self.rollout_batch_size} completions (prompts_per_iteration="
                f"{self.prompts_per_iteration} x samples_per_prompt={self.samples_per_prompt})"
            )
        if self.kl_controller == "adaptive" and not self.use_reference:
            raise SettingsError(
                "RLConfig.kl_controller='adaptive' needs the reference (use_reference=True)"
            )
        try:
            self.sampling_config  # noqa: B018 (validates the sampler's settings)
        except ValueError as e:
            raise SettingsError(f"RLConfig: {e}") from None

    @property
    def rollout_batch_size(self) -> int:
        """Completions per iteration: prompts_per_iteration x samples_per_prompt."""
        return self.prompts_per_iteration * self.samples_per_prompt

    @property
    def minibatch_size(self) -> int:
        return self.rollout_batch_size // self.num_minibatches

    @property
    def has_critic(self) -> bool:
        """A critic `models["value"]` is trained (a separate model or a head on the policy)."""
        return self.value_model != "none"

    @property
    def value_head(self) -> bool:
        """The critic is a value head on the policy's trunk (one forward for both)."""
        return self.value_model == "head"

    @property
    def sampling_config(self) -> SamplingConfig:
        """The sampler's static config for the rollout."""
        return SamplingConfig(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            top_k=self.top_k,
            eos_id=self.eos_id,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
            use_top_p=self.use_top_p,
            segment_len=self.segment_len,
        )

    @property
    def greedy_config(self) -> SamplingConfig:
        """ReMax's baseline rollout: the same settings, argmax decoding."""
        return dataclasses.replace(self.sampling_config, greedy=True)


def _f32(x: Any) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


@struct.dataclass
class RLHParams:
    """Traced hyperparameters of the RL iteration (float32 scalars; changing one never
    recompiles). Which settings read which value is in `RLConfig`'s docstring."""

    kl_coef: jax.Array  # beta (fixed), or the adaptive controller's initial value
    kl_target: jax.Array  # adaptive controller: target sequence KL (nats)
    kl_horizon: jax.Array  # adaptive controller: horizon in samples
    gamma: jax.Array
    lam: jax.Array
    eps_low: jax.Array
    eps_high: jax.Array
    dual_clip_c: jax.Array
    value_clip: jax.Array
    vf_coef: jax.Array
    entropy_coef: jax.Array
    missing_eos_penalty: jax.Array
    reward_clip: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    adv_eps: jax.Array  # GRPO's std epsilon
    baseline_decay: jax.Array  # running-mean baseline EMA decay
    lr_scale: jax.Array
    debug_nan_step: jax.Array  # int32: poison the loss at this iteration (-1: never)

    @classmethod
    def create(
        cls,
        *,
        kl_coef: float = 0.05,
        kl_target: float = 6.0,
        kl_horizon: float = 10000.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        dual_clip_c: float = 3.0,
        value_clip: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        missing_eos_penalty: float = 0.0,
        reward_clip: float = 10.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        adv_eps: float = 1e-6,
        baseline_decay: float = 0.9,
        lr_scale: float = 1.0,
        debug_nan_step: int = -1,
    ) -> RLHParams:
        """Builds the pytree from Python numbers (defaults: verl/OpenRLHF-like PPO values)."""
        args = dict(locals())
        del args["cls"]
        nan_step = args.pop("debug_nan_step")
        return cls(
            **{k: _f32(v) for k, v in args.items()},
            debug_nan_step=jnp.asarray(nan_step, jnp.int32),
        )


def init_rl_extra(hp: RLHParams) -> dict[str, Any]:
    """The algorithm state an RL run keeps in `TrainState.extra` (checkpointed with it).

    `kl_ctl`: the KL coefficient of the adaptive controller (starts at `hp.kl_coef`);
    `reward_moments`: running score moments ("running" reward normalisation);
    `baseline`: the running-mean REINFORCE baseline.
    """
    extra = {
        "kl_ctl": KLControllerState.create(hp.kl_coef),
        "reward_moments": RunningMoments.create(),
        "baseline": RunningMean.create(),
    }
    # Fresh buffers: the constructors share one zero between fields (and kl_coef with `hp`),
    # and a donated state must not hold the same buffer twice.
    return jax.tree.map(lambda x: jnp.array(x, copy=True), extra)


def create_rl_state(
    *,
    policy: state_lib.ModelState,
    hp: RLHParams,
    value: state_lib.ModelState | None = None,
) -> Any:
    """A fresh RL train state at iteration 0: models "policy" (and "value"), RL extras."""
    models = {"policy": policy}
    if value is not None:
        models["value"] = value
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        models=models,
        nonfinite=state_lib.NonFiniteStats.zeros(),
        extra=init_rl_extra(hp),
    )
