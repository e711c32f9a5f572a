"""The DPO stage: the generic stage (`train.stage`) with the `steps.dpo.DPOConfig` algorithm.

`dpo_stage` (bound as `train.stage = @dpo_stage`) trains any DPO-family loss on preference
pairs from a gin-configured data callable, normally `@preference_data`. The policy starts from
`init_from` (the SFT run), whose model.json also gives the model config and the tokenizer; the
reference is that same starting point, either a frozen model beside the state, reloaded on
every start and never checkpointed (`reference="params"`), or reference log-probs precomputed
once and cached on disk, shared by every run of a sweep (`reference="precomputed"`, see
`train.ref_cache`). Reference-free types (simpo, orpo) use neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gin

from rlhf_jax import settings
from rlhf_jax.data import pipeline  # noqa: F401  (registers @preference_data for gin)
from rlhf_jax.models import ModelConfig
from rlhf_jax.steps.dpo import DPOConfig, DPOHParams
from rlhf_jax.train import ref_cache, stages
from rlhf_jax.train.eval_hook import SampleEval
from rlhf_jax.train.loop import LoopResult
from rlhf_jax.train.pairs import PairRecipe, pair_stage_data
from rlhf_jax.train.stage import StageContext, StageData, run_stage

dpo_hparams = gin.external_configurable(DPOHParams.create, name="dpo_hparams", module="rlhf_jax")


class DPORecipe(PairRecipe):
    """The DPO part of the generic stage: preference data, the reference (frozen model or
    cached log-probs) and the end-of-run log line."""

    name, label = "dpo_stage", "DPO"
    done_line = (("eval loss %.4f", "eval/loss"),
                 ("eval accuracy %.3f", "eval/rewards/accuracies"),
                 ("eval margin %.4f", "eval/rewards/margins"))  # fmt: skip

    def __init__(self, algorithm: DPOConfig, loss_hparams: DPOHParams, *, data, data_kwargs,
                 ref_cache_dir: str | None):  # fmt: skip
        super().__init__(algorithm, loss_hparams)
        self._data, self.data_kwargs, self.ref_cache_dir = data, data_kwargs, ref_cache_dir
        self.lengths = ref_cache.length_settings(**data_kwargs)  # part of the cache key

    def data(self, ctx: StageContext, tokenizer: str | None) -> StageData:
        kwargs = dict(batch_size=ctx.batch_size, seed=ctx.seed, **self.data_kwargs)
        kwargs["buckets"] = tuple(self.lengths["buckets"])
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        return pair_stage_data(*self._data(**kwargs), seq_len=self.lengths["buckets"][-1])

    def prepare(self, ctx, data, cfg, factory):
        algo = self.algorithm
        if not (algo.needs_reference and algo.reference == "precomputed"):
            return data
        return ref_cache.precompute_stage_reference(
            data, ctx, cfg, factory, cache_dir=self.ref_cache_dir, lengths=self.lengths,
            chunk_size=algo.logits_chunk_size,
        )  # fmt: skip

    def frozen(self, ctx, cfg, factory):
        if not self.algorithm.uses_ref_params or cfg.lora_rank:  # LoRA: the base is the ref
            return None
        graphdef = factory.abstract.policy.graphdef
        return stages.frozen_models(
            "ref", init_from=ctx.init_from, mesh=ctx.mesh, rules=ctx.rules,
            fresh=lambda: (graphdef, factory.init().policy.params),
        )  # fmt: skip

    def flops_per_batch(self, cfg: ModelConfig, batch) -> float:
        # A reference forward is ~1/3 of a training step's forward + backward.
        scale = 4.0 / 3.0 if self.algorithm.uses_ref_params else 1.0
        return super().flops_per_batch(cfg, batch) * scale


@gin.configurable
def dpo_stage(
    run_dir: str = gin.REQUIRED,
    data: Callable[..., tuple] = gin.REQUIRED,
    init_from: str | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    buckets: Sequence[int] = (64, 128),
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    on_long_prompt: str = "truncate",
    loss_type: str | Sequence[str] = "sigmoid",
    reference: str = "precomputed",
    ref_cache_dir: str | None = ref_cache.DEFAULT_CACHE_DIR,
    grad_accum_steps: int = 1,
    logits_chunk_size: int = 128,
    lr_scale: float = 1.0,
    debug_nan_step: int = -1,
    eval_hook: SampleEval | None = None,
    match_vocab: bool = True,
) -> LoopResult:
    """Offline preference optimisation of a causal LM (gin: `train.stage = @dpo_stage`).

    The traced loss hyperparameters (beta, label smoothing, ...) are bound on `dpo_hparams`
    (`steps.dpo.DPOHParams.create`; gin/algorithms/dpo.gin binds them to macros).

    Args:
      run_dir: the run directory (RUN_DIR); re-running on it resumes from its checkpoints.
      data: called as `data(batch_size=, seed=, buckets=, max_len=, max_prompt_len=,
        on_long_prompt=[, tokenizer=])`; returns `(train_iter, eval_iter or None, tokenizer)`
        like `make_preference_iterator` (gin: `@preference_data`).
      init_from: the SFT run (or checkpoint) the policy and the reference start from (INIT_FROM);
        its model.json defines the model and the tokenizer. None: a fresh `model_config()` model.
      tokenizer: overrides the tokenizer of `init_from`'s model.json.
      seed: init and data seed.
      batch_size: global batch of pairs; divisible by data×fsdp and by `grad_accum_steps`.
      buckets, max_len, max_prompt_len, on_long_prompt: length settings of the pairs (both
        sides of a batch share one bucket); part of the reference-cache key.
      loss_type: a preference loss type or a tuple of them (see gin/algorithms/dpo.gin).
      reference: "precomputed" (cached reference log-probs) or "params" (the frozen reference
        model, run forward every step).
      ref_cache_dir: the shared cache of precomputed reference log-probs (REF_CACHE_DIR; None:
        `$RLHF_JAX_CACHE/ref_cache`, by default ~/.cache/rlhf_jax/ref_cache).
      grad_accum_steps, logits_chunk_size: static step settings (`DPOConfig`).
      lr_scale: traced learning-rate multiplier.
      debug_nan_step: fault injection: the loss/gradients of this step become NaN (-1: off).
      eval_hook: sample, score and log at every eval (`@SampleEval()`, train/eval_hook.py).
      match_vocab: without `init_from`, set the model's vocab_size to the tokenizer's.
    """
    settings.choice("dpo_stage.reference", reference, ("precomputed", "params"))
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    settings.lengths(buckets, max_len, max_prompt_len, on_long_prompt, prefix="dpo_stage.")
    settings.positive_int("dpo_stage.logits_chunk_size", logits_chunk_size)
    hp = dpo_hparams(num_loss_types=len(types))  # validates its values (SettingsError)
    algo = DPOConfig(
        loss_type=types[0] if isinstance(loss_type, str) else types,
        reference=reference,
        grad_accum_steps=grad_accum_steps,
        logits_chunk_size=logits_chunk_size,
        rpo=float(hp.rpo_alpha) != 0.0,
    )
    data_kwargs = dict(buckets=buckets, max_len=max_len, max_prompt_len=max_prompt_len,
                       on_long_prompt=on_long_prompt)  # fmt: skip
    recipe = DPORecipe(algo, hp, data=data, data_kwargs=data_kwargs, ref_cache_dir=ref_cache_dir)
    return run_stage(
        recipe, run_dir=run_dir, seed=seed, batch_size=batch_size, init_from=init_from,
        tokenizer=tokenizer, match_vocab=match_vocab, lr_scale=lr_scale,
        debug_nan_step=debug_nan_step, eval_hook=eval_hook,
    )  # fmt: skip
