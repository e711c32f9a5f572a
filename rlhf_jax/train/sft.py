"""The SFT stage: the generic stage (`train.stage`) with the `steps.sft.SFTConfig` algorithm.

`sft_stage` (bound as `train.stage = @sft_stage`) takes its data from a gin-configured callable
returning `StageData`: `@pipeline_sft_data` or `@synthetic_sft_data` (train/sft_data.py).
"""

from __future__ import annotations

from collections.abc import Callable

import gin

from rlhf_jax.steps.sft import SFTConfig
from rlhf_jax.train.eval_hook import SampleEval
from rlhf_jax.train.loop import LoopResult
from rlhf_jax.train.sft_data import pipeline_sft_data, synthetic_sft_data  # noqa: F401  (gin)
from rlhf_jax.train.stage import Recipe, StageContext, StageData, run_stage


class SFTRecipe(Recipe):
    """The SFT part of the generic stage: its data callable and the end-of-run log line."""

    name, label = "sft_stage", "SFT"
    done_line = (("eval loss %.4f", "eval/loss"),
                 ("unigram baseline %.4f", "baseline/unigram_eval_loss"))  # fmt: skip

    def __init__(self, algorithm: SFTConfig, data: Callable[..., StageData]):
        super().__init__(algorithm)
        self._data = data

    def data(self, ctx: StageContext, tokenizer: str | None) -> StageData:
        del tokenizer  # the data source brings its own (a policy's tokenizer is the corpus's)
        return self._data(batch_size=ctx.batch_size, seed=ctx.seed)


@gin.configurable
def sft_stage(
    run_dir: str = gin.REQUIRED,
    data: Callable[..., StageData] = gin.REQUIRED,
    seed: int = 0,
    batch_size: int = 32,
    init_from: str | None = None,
    match_vocab: bool = True,
    grad_accum_steps: int = 1,
    logits_chunk_size: int = 128,
    lr_scale: float = 1.0,
    debug_nan_step: int = -1,
    eval_hook: SampleEval | None = None,
) -> LoopResult:
    """Supervised fine-tuning of a causal LM (gin: `train.stage = @sft_stage`).

    Args:
      run_dir: the run directory (RUN_DIR); re-running on it resumes from its checkpoints.
      data: called as `data(batch_size=..., seed=...)`, returns `StageData`.
      seed: init and data seed (SEED).
      batch_size: global batch size (BATCH_SIZE); divisible by data×fsdp and the accumulation.
      init_from: a run/checkpoint directory to initialise the policy from (INIT_FROM); its
        model.json then defines the model (the gin model config is not used).
      match_vocab: set the model's vocab_size to the tokenizer's (else check that it fits).
      grad_accum_steps: micro-batches per step.
      logits_chunk_size: positions per chunk of the chunked cross-entropy.
      lr_scale: traced learning-rate multiplier.
      debug_nan_step: fault injection: the loss/gradients of this step become NaN (-1: off).
      eval_hook: sample, score and log at every eval (`@SampleEval()`, train/eval_hook.py).
    """
    algo = SFTConfig(grad_accum_steps=grad_accum_steps, logits_chunk_size=logits_chunk_size)
    return run_stage(
        SFTRecipe(algo, data), run_dir=run_dir, seed=seed, batch_size=batch_size,
        init_from=init_from, match_vocab=match_vocab, lr_scale=lr_scale,
        debug_nan_step=debug_nan_step, eval_hook=eval_hook,
    )  # fmt: skip
