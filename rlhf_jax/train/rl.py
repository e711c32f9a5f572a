"""The online-RL stage (PPO and the critic-free family): the generic stage (`train.stage`) with
the pure iteration of `steps.rl`.

`rl_stage` (gin: `train.stage = @rl_stage`) trains the policy of an SFT run (INIT_FROM, which
is also the frozen reference) on prompts from the task's prompt data: one loop iteration is one
batch of `prompts_per_iteration` prompts -> rollout (k samples each) -> score -> reference and
value forwards -> advantages -> `epochs x num_minibatches` optimiser steps, all one jitted
program of sharded state (`optimizer_steps_per_iteration = epochs x num_minibatches`), or
two around a host-side judge.

Reward sources (`reward`):

- "model": the reward model of REWARD_RUN, a frozen model beside the state (never
  checkpointed, reloaded on every start), scored with its pure `reward_fn` inside the program:
  the ensemble mean, or the conservative mean - k * std (`reward_field`, `std_coef`);
- "gold": the task's gold judge on the decoded texts (oracle-reward runs), host-side Python.
  The iteration is then two programs around it (`RLAlgorithm.host_split`, a `loop.HostSplit`):
  the rollout; the rows' token ids to the host, judged there by the loop; the forwards,
  advantages and update. Parameters never leave the devices. (`host_judge="callback"` keeps
  one program that calls the judge through `jax.pure_callback`: the same numbers.)

The critic of PPO (`RLConfig.value_model = 'separate'`) is a separate `ScalarModel` ("value"),
initialised from the reward model (trunk and the mean of its heads) or from the policy (trunk,
fresh head). The KL controller, the running reward moments and the running-mean baseline live
in `TrainState.extra`, so checkpoints carry them and a resumed run is bitwise the same.

Evaluation is the `SampleEval` hook on the task's held-out prompts, with the gold judge
("gold") logged beside the proxy reward ("proxy", the reward model on the same texts): the setup
that shows over-optimisation. The wall time of each iteration's phases (rollout, scoring,
forwards + update) is measured inside the program with host timestamps (`time/*_s`), or by
the host around the two programs of a host judge.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from rlhf_jax import settings
from rlhf_jax.data import pipeline  # noqa: F401  (registers @prompt_data for gin)
from rlhf_jax.data.tasks import judges
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.errors import SettingsError
from rlhf_jax.models import ModelConfig, ScalarModel, ValueHead
from rlhf_jax.reward_scoring import RewardNormalization, RewardScorer
from rlhf_jax.rundir import check_model_class, load_params, read_model_info, resolve_run_dir
from rlhf_jax.steps.algorithm import Algorithm, HParams
from rlhf_jax.steps.reward import make_reward_fn
from rlhf_jax.steps.rl import kl_coef, prepare_batch, update
from rlhf_jax.steps.rl_config import RLConfig, RLHParams, init_rl_extra
from rlhf_jax.steps.rollout import Rollout, greedy_rollout, rollout
from rlhf_jax.steps.state import Frozen, ModelState, StateFactory, TrainState, state_factory
from rlhf_jax.train import stages
from rlhf_jax.train.eval_hook import SampleEval
from rlhf_jax.train.loop import HostSplit, LoopResult, StepFn
from rlhf_jax.train.reward_init import policy_to_reward_params
from rlhf_jax.train.stage import Recipe, StageContext, StageData, run_stage

log = logging.getLogger(__name__)

HostBatch = dict[str, np.ndarray]
REWARD_SOURCES = ("model", "gold")
REWARD_FIELDS = ("mean", "conservative")
VALUE_INITS = ("reward", "policy")
HOST_JUDGE_MODES = ("split", "callback")


def _rl_config(**kwargs: Any) -> RLConfig:
    """`RLConfig(**kwargs)` (a function, so that gin leaves the class itself alone)."""
    return RLConfig(**kwargs)


_rl_config.__signature__ = inspect.signature(RLConfig)  # gin checks binding names against it
rl_config = gin.external_configurable(_rl_config, name="rl_config", module="rlhf_jax")


def _above_one(name: str, value: Any) -> float:
    if settings.finite(name, value) <= 1.0:
        raise SettingsError(f"{name}={value!r} must be > 1")
    return float(value)


# The traced values' ranges: (check, macro of gin/base/rl.gin or None). Checked on the Python
# numbers gin binds, before anything loads (an RLHParams pytree itself may hold arrays).
_HPARAM_CHECKS: dict[str, tuple[Callable[[str, Any], Any], str | None]] = {
    "kl_coef": (settings.nonneg_float, "KL_COEF"),
    "kl_target": (settings.positive_float, "KL_TARGET"),
    "kl_horizon": (settings.positive_float, "KL_HORIZON"),
    "gamma": (lambda n, v: settings.in_range(n, v, 0.0, 1.0), "GAMMA"),
    "lam": (lambda n, v: settings.in_range(n, v, 0.0, 1.0), "LAM"),
    "eps_low": (settings.positive_float, "EPS_LOW"),  # the ratio's clip range [1 - eps_low,
    "eps_high": (settings.positive_float, "EPS_HIGH"),  # 1 + eps_high]: empty at 0
    # Dual clip (Ye et al. 2020) bounds negative-advantage ratios by c > 1.
    "dual_clip_c": (_above_one, None),
    "value_clip": (settings.positive_float, None),
    "vf_coef": (settings.nonneg_float, "VF_COEF"),
    "entropy_coef": (settings.finite, None),
    "missing_eos_penalty": (settings.nonneg_float, "MISSING_EOS_PENALTY"),  # subtracted
    "reward_clip": (settings.positive_float, None),
    "temperature": (settings.positive_float, "TEMPERATURE"),
    "top_p": (lambda n, v: settings.in_range(n, v, 0.0, 1.0, low_open=True), None),
    "adv_eps": (settings.nonneg_float, None),
    "baseline_decay": (lambda n, v: settings.in_range(n, v, 0.0, 1.0), None),
    "lr_scale": (settings.positive_float, None),
    "debug_nan_step": (settings.integer, None),
}


def _rl_hparams(**kwargs: Any) -> RLHParams:
    """`RLHParams.create(**kwargs)` after checking each bound value's type and range.

    Raises:
      SettingsError: naming the setting (`rl_hparams.<name>` and its macro).
    """
    for name, value in kwargs.items():
        check, macro = _HPARAM_CHECKS[name]
        check(f"rl_hparams.{name}" + (f" ({macro})" if macro else ""), value)
    return RLHParams.create(**kwargs)


_rl_hparams.__signature__ = inspect.signature(RLHParams.create)
rl_hparams = gin.external_configurable(_rl_hparams, name="rl_hparams", module="rlhf_jax")


# ------------------------------------------------------------------ wall-time stamps
_CLOCK0 = time.perf_counter()


def _now(dep: np.ndarray) -> np.ndarray:
    del dep
    return np.float32(time.perf_counter() - _CLOCK0)


def _stamp(dep: jax.Array) -> jax.Array:
    """A host timestamp (s) taken once `dep` is computed (a scalar)."""
    return io_callback(_now, jax.ShapeDtypeStruct((), jnp.float32), dep)


def _after(t: jax.Array) -> jax.Array:
    """An int32 0 that depends on `t`: added to the next phase's input so that the phase
    starts only after the stamp (a timestamp is never negative, so this is always 0)."""
    return (t < 0).astype(jnp.int32)


# ------------------------------------------------------------------ scoring
def model_scorer(norm: RewardNormalization | None, field: str, std_coef: float):
    """A pure `(frozen, rollout) -> scores` of the frozen reward model "reward"."""
    norm_kw = {} if norm is None else {"norm_mean": norm.mean, "norm_std": norm.std}

    def score(frozen: Frozen, ro: Rollout) -> jax.Array:
        fn = make_reward_fn(frozen.graphdefs["reward"], **norm_kw)
        out = fn(frozen.params["reward"], ro.input_ids, ro.attention_mask, std_coef)
        return jnp.asarray(out[field], jnp.float32)

    return score


def decode_rows(tok: Tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The texts (prompt + completion, special tokens dropped) of padded id rows."""
    return tok.decode_batch([row[m > 0].tolist() for row, m in zip(ids, mask, strict=True)])


class HostJudge:
    """The task's gold judge (`judges.gold_reward`, gin-configured) on decoded rows, on the
    host: numpy `(ids, mask)` [B, T] -> float32 scores [B]."""

    def __init__(self, tokenizer_path: str):
        self.tok = Tokenizer.from_file(tokenizer_path)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        texts = decode_rows(self.tok, np.asarray(ids), np.asarray(mask))
        return np.asarray(judges.gold_reward(texts), np.float32)


def gold_scorer(judge: str | HostJudge) -> Callable[[Frozen, Rollout], jax.Array]:
    """A `(frozen, rollout) -> scores` of the task's gold judge on the decoded texts, usable
    inside a program: the judge (a `HostJudge`, or the tokenizer path to build one) runs on the
    host through a `jax.pure_callback`."""
    judge = judge if isinstance(judge, HostJudge) else HostJudge(judge)

    def score(frozen: Frozen, ro: Rollout) -> jax.Array:
        del frozen
        shape = jax.ShapeDtypeStruct(ro.tokens.shape[:1], jnp.float32)
        return jax.pure_callback(judge, shape, ro.input_ids, ro.attention_mask)

    return score


# ------------------------------------------------------------------ the algorithm
@dataclasses.dataclass(frozen=True)
class RLAlgorithm(Algorithm):
    """One online-RL iteration as an `Algorithm` of the generic stage.

    Attributes:
      rl: the iteration's static settings (`steps.rl_config.RLConfig`).
      reward_source: "model" or "gold" (for messages and the summary).
      score_fn: `(frozen, rollout) -> scores [B]`, pure (a host judge through a callback): the
        scoring of the one-program iteration (`update`).
      host_judge: a host-side judge, numpy `(ids, mask) -> scores`. When set, the loop runs
        the iteration as two programs around it (`host_split`) instead of `update`.
      timing: measure the phases' wall time (`time/rollout_s`, `time/score_s`,
        `time/update_s`): host timestamps inside the one program, or the host's clock
        around the two programs of the split.
    """

    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    reward_source: str = "model"
    score_fn: Callable[[Frozen, Rollout], jax.Array] | None = dataclasses.field(
        default=None, compare=False
    )
    host_judge: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = dataclasses.field(
        default=None, compare=False
    )
    timing: bool = True

    @property
    def optimizer_steps_per_iteration(self) -> int:  # type: ignore[override]
        return self.rl.epochs * self.rl.num_minibatches

    @staticmethod
    def _iteration_hparams(hp: HParams) -> RLHParams:
        # One lr_scale / debug_nan_step for every algorithm: the update's, not RLHParams'.
        return hp.loss.replace(lr_scale=hp.update.lr_scale, debug_nan_step=hp.update.debug_nan_step)

    def rollout_phase(
        self, state: TrainState, batch: HostBatch, rng: jax.Array, hp: HParams, *, stamps: bool
    ) -> tuple[Rollout, Rollout | None, list[jax.Array]]:
        """The rollout (and ReMax's greedy one); with `stamps`, the host times before and
        after it (the rollout then waits for the first)."""
        cfg, rl_hp = self.rl, self._iteration_hparams(hp)
        ids = jnp.asarray(batch["input_ids"], jnp.int32)
        times = []
        if stamps:
            times.append(_stamp(jnp.sum(ids)))
            ids = ids + _after(times[0])
        prompts = {"input_ids": ids, "attention_mask": batch["attention_mask"]}
        policy = state.models["policy"]
        ro = rollout(policy, prompts, jax.random.fold_in(rng, 0), rl_hp, cfg=cfg)
        greedy = None
        if cfg.estimator == "remax":  # ReMax's baseline: the greedy completion's reward
            greedy = greedy_rollout(policy, prompts, rl_hp, cfg=cfg)
        if stamps:
            times.append(_stamp(jnp.sum(ro.tokens)))
            ro = ro.replace(tokens=ro.tokens + _after(times[1]))
        return ro, greedy, times

    def update_phase(
        self, state: TrainState, frozen: Frozen, ro: Rollout, greedy: Rollout | None,
        scores: jax.Array, greedy_scores: jax.Array | None, rng: jax.Array, hp: HParams,
        *, times: list[jax.Array],
    ) -> tuple[TrainState, dict[str, jax.Array]]:  # fmt: skip
        """Forwards, advantages, epochs x minibatches of a scored rollout (step unchanged);
        `times` (the rollout phase's stamps, or empty) adds the phases' wall times."""
        cfg, rl_hp = self.rl, self._iteration_hparams(hp)
        if times:
            t2 = _stamp(jnp.sum(scores))
            ro = ro.replace(tokens=ro.tokens + _after(t2))
        rl_batch, extra, metrics = prepare_batch(
            state, frozen, ro, scores, rl_hp, cfg=cfg, greedy=greedy, greedy_scores=greedy_scores
        )
        beta = kl_coef(state, rl_hp, cfg)
        update_key = jax.random.fold_in(rng, 1)
        state, update_metrics = update(state, rl_batch, update_key, rl_hp, beta, cfg=cfg)
        metrics = {**metrics, **update_metrics}
        if "loss/total" in metrics:
            metrics["loss"] = metrics["loss/total"]  # the name the loop's progress bar shows
        if times:
            t0, t1 = times
            leaf = jax.tree.leaves(state.models["policy"].params)[0]
            t3 = _stamp(jnp.sum(leaf.astype(jnp.float32)))
            metrics.update({"time/rollout_s": t1 - t0, "time/score_s": t2 - t1,
                            "time/update_s": t3 - t2})  # fmt: skip
        return state.replace(extra=extra), metrics

    def update(
        self, state: TrainState, frozen: Frozen, batch: HostBatch, rng: jax.Array, hp: HParams
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """rollout -> score -> forwards, advantages -> epochs x minibatches (step unchanged):
        one program, `score_fn` inside it."""
        ro, greedy, times = self.rollout_phase(state, batch, rng, hp, stamps=self.timing)
        scores = self.score_fn(frozen, ro)
        greedy_scores = self.score_fn(frozen, greedy) if greedy is not None else None
        return self.update_phase(state, frozen, ro, greedy, scores, greedy_scores, rng, hp,
                                 times=times)  # fmt: skip

    def host_split(self) -> HostSplit:
        """The iteration as two programs around `host_judge`: rollout -> the rows' ids to the
        host, judged there -> forwards, advantages, update. The same rng folds and phases as
        `train_step` over `update`, so for the same scores it is the same iteration."""
        judge = self.host_judge
        if judge is None:
            raise ValueError("RLAlgorithm.host_split needs a host_judge")

        def before(state, frozen, batch, rng, hp):
            del frozen
            rng = jax.random.fold_in(rng, state.step)
            ro, greedy, _ = self.rollout_phase(state, batch, rng, hp, stamps=False)
            to_host = {"rows": (ro.input_ids, ro.attention_mask)}
            if greedy is not None:
                to_host["greedy"] = (greedy.input_ids, greedy.attention_mask)
            return {"ro": ro, "greedy": greedy}, to_host

        def host(rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
            return {name: np.asarray(judge(ids, mask), np.float32)
                    for name, (ids, mask) in rows.items()}  # fmt: skip

        def after(state, frozen, carry, scores, rng, hp):
            rng = jax.random.fold_in(rng, state.step)
            state, metrics = self.update_phase(
                state, frozen, carry["ro"], carry["greedy"], scores["rows"],
                scores.get("greedy"), rng, hp, times=[],
            )  # fmt: skip
            return state.replace(step=state.step + 1), metrics

        timing = ("time/rollout_s", "time/score_s", "time/update_s") if self.timing else None
        return HostSplit(before=before, host=host, after=after, timing=timing)


class PromptBatches:
    """The loop's batches of an RL run: the prompts themselves (`input_ids`,
    `attention_mask`, left-padded), from a prompt iterator whose position is checkpointed."""

    def __init__(self, it: Any):
        self.it = it
        for name in ("state_dict", "load_state_dict", "check_state_dict"):
            if hasattr(it, name):
                setattr(self, name, getattr(it, name))

    def __iter__(self) -> PromptBatches:
        return self

    def __next__(self) -> HostBatch:
        b = next(self.it)
        return {"input_ids": np.asarray(b["prompt_ids"], np.int32),
                "attention_mask": np.asarray(b["prompt_mask"], np.int32)}  # fmt: skip


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def check_same_tokenizer(policy_tok: str | None, reward_run: str) -> None:
    """The reward model must read the policy's token ids: same tokenizer (path or content).

    Raises:
      SettingsError: naming REWARD_RUN and both tokenizers.
    """
    rm_tok = read_model_info(resolve_run_dir(reward_run)).get("tokenizer")
    if policy_tok == rm_tok:
        return
    a, b = _file_digest(policy_tok), _file_digest(rm_tok)
    if a is None or a != b:
        raise SettingsError(
            f"rl_stage.reward_run (REWARD_RUN)={reward_run}: the reward model's tokenizer "
            f"{rm_tok} differs from the policy's {policy_tok}; the reward model scores the "
            "policy's token ids, so both must use the same tokenizer"
        )


# ------------------------------------------------------------------ the recipe
class RLRecipe(Recipe):
    """The online-RL part of the generic stage: prompts, policy (+ value) state with the RL
    extras, the frozen reference and reward model, and the finishing log line."""

    name = "rl_stage"
    supports_lora = False  # the rollout samples from full parameters

    def __init__(self, algorithm: RLAlgorithm, loss_hparams: RLHParams, *, data, reward_run,
                 value_init: str, eval_prompts: int):  # fmt: skip
        super().__init__(algorithm, loss_hparams)
        self._data, self.reward_run = data, reward_run
        self.value_init, self.eval_prompts = value_init, eval_prompts
        self.eval_texts: list[str] = []

    def data(self, ctx: StageContext, tokenizer: str | None) -> StageData:
        kwargs = {"batch_size": ctx.batch_size, "seed": ctx.seed}
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        train_it, eval_it, tok = self._data(**kwargs)
        if eval_it is not None and self.eval_prompts:
            for b in eval_it:
                valid = np.asarray(b.get("valid", np.ones(len(b["prompt_text"]))), bool)
                self.eval_texts += [str(t) for t, v in zip(b["prompt_text"], valid, strict=True)
                                    if v]  # fmt: skip
                if len(self.eval_texts) >= self.eval_prompts:
                    break
            self.eval_texts = self.eval_texts[: self.eval_prompts]
        prompt_len = max(getattr(train_it, "buckets", None) or (0,))
        seq_len = prompt_len + self.algorithm.rl.max_new_tokens
        summary = stages.truncation_summary({"train": getattr(train_it, "stats", None)})
        summary["rl/reward_source"] = self.algorithm.reward_source
        summary["rl/estimator"] = self.algorithm.rl.estimator
        return StageData(PromptBatches(train_it), None, tok.vocab_size, seq_len, tok.path,
                         summary)  # fmt: skip

    def state(self, ctx: StageContext, cfg: ModelConfig, optimizer) -> StateFactory:
        extra = init_rl_extra(self.loss_hparams)
        policy, _ = stages.model_state_factory(
            cfg, optimizer, ctx.mesh, ctx.rules, seed=ctx.seed, init_from=ctx.init_from,
            name="policy", extra=extra,
        )  # fmt: skip
        if not self.algorithm.rl.has_critic:
            return policy
        return self._with_value(ctx, cfg, optimizer, policy)

    def _with_value(self, ctx, cfg, optimizer, policy: StateFactory) -> StateFactory:
        if self.algorithm.rl.value_head:
            # A ValueHead on the policy's trunk: models["value"] holds the head alone (d_model
            # + 1 parameters and their optimiser moments), no second transformer nor second
            # copy of its optimiser state. It starts fresh (VALUE_INIT does not apply) and is
            # checkpointed with the state; the main `params` item stays a plain Transformer's.
            def create_head(key: jax.Array) -> ModelState:
                graphdef, params = nnx.split(ValueHead(cfg, rngs=nnx.Rngs(key)), nnx.Param)
                return ModelState.create(graphdef=graphdef, params=params, optimizer=optimizer)

            head = state_factory(create_head, jax.random.key(ctx.seed + 1), ctx.mesh, ctx.rules)
            return StateFactory(
                abstract=policy.abstract.with_model("value", head.abstract),
                init=lambda: policy.init().with_model("value", head.init()),
            )
        from_reward = self.value_init == "reward"
        vcfg = read_model_info(resolve_run_dir(self.reward_run))["model_config"] if from_reward \
            else cfg  # fmt: skip
        vfactory, vgraphdef = stages.model_state_factory(
            vcfg, optimizer, ctx.mesh, ctx.rules, seed=ctx.seed + 1, model_class="ScalarModel",
            model_kwargs={"num_heads": 1}, name="value",
        )  # fmt: skip
        v_abstract = vfactory.abstract.models["value"]
        v_shardings = jax.tree.map(lambda x: x.sharding, v_abstract)
        abstract = policy.abstract.with_model("value", v_abstract)
        source = self.reward_run if from_reward else ctx.init_from

        def create(key, src):
            fresh = nnx.state(ScalarModel(vcfg, rngs=nnx.Rngs(key), num_heads=1), nnx.Param)
            if from_reward:
                # The reward model's trunk, and its heads averaged into one (V ~ mean reward).
                pure = nnx.to_pure_dict(src)
                pure["head_w"] = jnp.mean(pure["head_w"], axis=-1, keepdims=True)
                pure["head_b"] = jnp.mean(pure["head_b"], axis=-1, keepdims=True)
                params = jax.tree.map(lambda x: x, fresh)
                nnx.replace_by_pure_dict(params, pure)
            else:
                params = policy_to_reward_params(fresh, src)
            return ModelState.create(graphdef=vgraphdef, params=params, optimizer=optimizer)

        def init() -> TrainState:
            state = policy.init()
            loaded = load_params(source, mesh=ctx.mesh, rules=ctx.rules)
            log.info("value model from the %s in %s", self.value_init, loaded.run_dir)
            with jax.set_mesh(ctx.mesh), nnx.logical_axis_rules(ctx.rules):
                value = jax.jit(create, out_shardings=v_shardings)(
                    jax.random.key(ctx.seed + 1), loaded.params
                )
            return state.with_model("value", value)

        return StateFactory(abstract=abstract, init=init)

    def frozen(self, ctx, cfg, factory):
        ref = stages.frozen_models("ref", init_from=ctx.init_from, mesh=ctx.mesh, rules=ctx.rules)
        reward_run = self.reward_run if self.algorithm.reward_source == "model" else None

        def load() -> Frozen:
            out = ref()
            if reward_run is None:
                return out
            rm = load_params(reward_run, mesh=ctx.mesh, rules=ctx.rules)
            return Frozen(params={**out.params, "reward": rm.params},
                          graphdefs={**out.graphdefs, "reward": rm.graphdef})  # fmt: skip

        return load

    def step(self) -> StepFn | HostSplit:
        """Two programs around the host judge (`RLAlgorithm.host_split`) when there is one,
        else the one-program iteration."""
        if self.algorithm.host_judge is not None:
            return self.algorithm.host_split()  # two programs around the host judge
        return super().step()

    def count_tokens(self, batch: HostBatch) -> float:
        # Prompt tokens of the rollout's k samples plus their completions (at most).
        rl = self.algorithm.rl
        return float(np.sum(batch["attention_mask"]) * rl.samples_per_prompt
                     + rl.rollout_batch_size * rl.max_new_tokens)  # fmt: skip

    def flops_per_batch(self, cfg: ModelConfig, batch: HostBatch) -> float:
        # Sampling + reference/old-policy forwards (~1 forward each) + epochs of training
        # (forward + backward ~ 3 forwards), per completion row.
        rl = self.algorithm.rl
        seq = batch["input_ids"].shape[1] + rl.max_new_tokens
        # A separate critic adds its own forwards and backwards; a head on the trunk adds ~nothing.
        forwards = 3 + 3 * rl.epochs + (4 if rl.has_critic and not rl.value_head else 0)
        return cfg.flops_per_token(seq) / 3.0 * forwards * rl.rollout_batch_size * seq

    def summary_extra(self, ctx: StageContext) -> dict[str, Any]:
        return {"rl/reward_run": str(self.reward_run), "rl/init_from": str(ctx.init_from)}

    def finish(self, ctx: StageContext, summary: dict[str, Any]) -> None:
        log.info(
            "RL done: %d iterations, proxy reward %.4f, KL %.3f, eval gold %.4f, %.1f s",
            summary["step"], summary.get("train/reward/proxy", float("nan")),
            summary.get("train/kl/k1", float("nan")),
            summary.get("eval/samples/gold", float("nan")), summary["wall_time_s"],
        )  # fmt: skip


def _eval_hook(hook: SampleEval | None, recipe: RLRecipe, *, tokenizer_path: str | None,
               reward_run: str | None, std_coef: float) -> SampleEval | None:  # fmt: skip
    """The SampleEval hook with the held-out prompts and the gold and proxy judges added."""
    if hook is None:
        return None
    judges_ = dict(hook.judges)
    judges_.setdefault("gold", lambda texts: judges.gold_reward(list(texts)))
    if reward_run is not None:
        scorer: list[RewardScorer] = []

        def proxy(texts):
            if not scorer:  # built at the first eval, on the run's mesh
                scorer.append(RewardScorer.from_run_dir(reward_run, std_coef=std_coef))
            return scorer[0].score_texts(list(texts))["mean"]

        judges_.setdefault("proxy", proxy)
    hook = dataclasses.replace(hook, judges=judges_)
    if not hook.prompts:
        return _LazyPrompts(hook, recipe)
    return hook


class _LazyPrompts(SampleEval):
    """A SampleEval whose prompts are the held-out prompts the recipe reads with its data."""

    def __init__(self, hook: SampleEval, recipe: RLRecipe):
        super().__init__(**{f.name: getattr(hook, f.name) for f in dataclasses.fields(hook)})
        self._recipe = recipe

    def bind(self, **kwargs):
        self.prompts = list(self._recipe.eval_texts)
        if not self.prompts:
            raise SettingsError("rl_stage.eval_hook: no prompts (the prompt data has no eval "
                                "split; set SampleEval.prompts)")  # fmt: skip
        return SampleEval.bind(self, **kwargs)


@gin.configurable
def rl_stage(
    run_dir: str = gin.REQUIRED,
    data: Callable[..., tuple] = gin.REQUIRED,
    init_from: str = gin.REQUIRED,
    reward_run: str | None = None,
    reward: str = "model",
    reward_field: str = "mean",
    std_coef: float = 1.0,
    value_init: str = "reward",
    seed: int = 0,
    lr_scale: float = 1.0,
    debug_nan_step: int = -1,
    eval_hook: SampleEval | None = None,
    eval_prompts: int = 64,
    timing: bool = True,
    host_judge: str = "split",
) -> LoopResult:
    """Online RL of an SFT policy (gin: `train.stage = @rl_stage`): PPO, RLOO, GRPO, ...

    The iteration's static settings are bound on `rl_config` (`steps.rl_config.RLConfig`: the
    estimator, k, prompts per iteration, epochs, minibatches, every switch) and its traced
    hyperparameters on `rl_hparams` (`RLHParams.create`: KL coefficient, clipping, ...); see
    gin/algorithms/{ppo,rloo,grpo}.gin. One loop iteration (TRAIN_STEPS counts them) is one
    batch of `rl_config.prompts_per_iteration` prompts.

    Args:
      run_dir: the run directory (RUN_DIR); re-running on it resumes.
      data: called as `data(batch_size=, seed=[, tokenizer=])`; returns `(train_iter,
        eval_iter or None, tokenizer)` of prompts (gin: `@prompt_data`).
      init_from: the SFT run (INIT_FROM): the policy's start, the frozen reference, the model
        config and the tokenizer.
      reward_run: the reward-model run (REWARD_RUN); needed for `reward="model"`, a PPO
        critic initialised from it, and the proxy reward logged at evals.
      reward: "model" (the reward model) or "gold" (the task's gold judge, `gold_reward`).
      reward_field: "mean" (ensemble mean) or "conservative" (mean - std_coef * std).
      std_coef: k of the conservative reward.
      value_init: PPO's critic from the "reward" model or the "policy".
      seed: init, data and rollout seed (SEED).
      lr_scale, debug_nan_step: the traced update hyperparameters.
      eval_hook: sample the held-out prompts and score them with the gold judge ("gold") and
        the reward model ("proxy") at every eval (`@SampleEval()`; its prompts default to the
        first `eval_prompts` prompts of the eval split).
      eval_prompts: held-out prompts the eval hook samples.
      timing: measure the wall time of rollout / scoring / update of each iteration.
      host_judge: how the gold judge (`reward="gold"`, host-side Python) scores: "split" (the
        iteration is two programs around it; the loop calls it on the host with numpy token
        ids) or "callback" (one program that calls it through `jax.pure_callback`).
    """
    settings.choice("rl_stage.reward", reward, REWARD_SOURCES)
    settings.choice("rl_stage.reward_field", reward_field, REWARD_FIELDS)
    settings.choice("rl_stage.value_init", value_init, VALUE_INITS)
    settings.choice("rl_stage.host_judge", host_judge, HOST_JUDGE_MODES)
    settings.boolean("rl_stage.timing", timing)
    settings.finite("rl_stage.std_coef", std_coef)
    settings.nonneg_int("rl_stage.eval_prompts", eval_prompts)
    if not isinstance(init_from, (str, Path)):
        raise SettingsError(f"rl_stage.init_from (INIT_FROM / SFT_RUN)={init_from!r}: the SFT run "
                            "the policy and the reference start from is required")  # fmt: skip
    settings.existing_path("rl_stage.init_from (INIT_FROM / SFT_RUN)", init_from)
    check_model_class(init_from, "Transformer", "rl_stage.init_from (INIT_FROM / SFT_RUN)")
    policy_tok = read_model_info(resolve_run_dir(init_from)).get("tokenizer")
    if not policy_tok:
        raise SettingsError(f"rl_stage.init_from={init_from}: its model.json names no tokenizer")
    tok = Tokenizer.from_file(policy_tok)

    overrides: dict[str, Any] = {}
    if not stages.is_bound("rl_config.eos_id"):
        overrides["eos_id"] = tok.eos_id
    if not stages.is_bound("rl_config.pad_id"):
        overrides["pad_id"] = tok.pad_id
    cfg = rl_config(**overrides)  # validates the settings (SettingsError naming them)
    hp = rl_hparams()
    needs_rm = reward == "model" or (
        cfg.has_critic and not cfg.value_head and value_init == "reward"
    )  # a value head starts fresh on the policy trunk
    if reward_run is None and needs_rm:
        what = "reward='model'" if reward == "model" else "a critic with value_init='reward'"
        raise SettingsError(f"rl_stage.reward_run (REWARD_RUN) is required for {what}")
    if reward_run is not None:
        settings.existing_path("rl_stage.reward_run (REWARD_RUN)", reward_run)
        check_model_class(reward_run, "ScalarModel", "rl_stage.reward_run (REWARD_RUN)")
        check_same_tokenizer(policy_tok, str(reward_run))

    judge = None
    if reward == "model":
        norm = RewardNormalization.load(resolve_run_dir(reward_run))
        score_fn = model_scorer(norm, reward_field, float(std_coef))
    else:
        judge = HostJudge(policy_tok)
        score_fn = gold_scorer(judge)
    algo = RLAlgorithm(rl=cfg, reward_source=reward, score_fn=score_fn, timing=timing,
                       host_judge=judge if host_judge == "split" else None)  # fmt: skip
    recipe = RLRecipe(algo, hp, data=data, reward_run=reward_run, value_init=value_init,
                      eval_prompts=eval_prompts)  # fmt: skip
    hook = _eval_hook(eval_hook, recipe, tokenizer_path=policy_tok, reward_run=reward_run,
                      std_coef=float(std_coef))  # fmt: skip
    return run_stage(
        recipe, run_dir=run_dir, seed=seed, batch_size=cfg.prompts_per_iteration,
        init_from=str(init_from), lr_scale=lr_scale, debug_nan_step=debug_nan_step,
        eval_hook=hook,
    )  # fmt: skip


__all__ = ["HostJudge", "RLAlgorithm", "RLRecipe", "rl_stage", "check_same_tokenizer"]
