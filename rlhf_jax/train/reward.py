"""The reward-model stage: the generic stage (`train.stage`) with the `steps.reward.RewardConfig`
algorithm (Bradley-Terry, optionally a K-head bootstrap ensemble).

`reward_stage` (gin: `train.stage = @reward_stage`) reads preference pairs with their gold
columns (`train.pairs.reward_preference_data`), starts the trunk from an SFT policy
(`train.reward_init`; optionally frozen: no update and no optimiser state for `trunk/`),
evaluates every EVAL_EVERY steps, and as its finishing step writes RUN_DIR/reward_norm.json
from the final eval's per-head reward statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gin
import jax

from rlhf_jax import settings
from rlhf_jax.reward_scoring import RewardNormalization
from rlhf_jax.steps.reward import RewardConfig, RewardHParams
from rlhf_jax.train import stages
from rlhf_jax.train.loop import LoopResult
from rlhf_jax.train.metrics import write_json_atomic
from rlhf_jax.train.pairs import PairRecipe, reward_preference_data  # noqa: F401  (gin)
from rlhf_jax.train.reward_init import freeze_trunk_updates, reward_state_factory
from rlhf_jax.train.stage import StageContext, StageData, run_stage

log = logging.getLogger(__name__)

reward_hparams = gin.external_configurable(
    RewardHParams.create, name="reward_hparams", module="rlhf_jax"
)


def write_normalization(run_dir: Path, summary: Mapping[str, Any], num_heads: int) -> None:
    """RUN_DIR/reward_norm.json from the final eval's per-head statistics (if it has them)."""
    keys = [(f"eval/rewards/head{k}_mean", f"eval/rewards/head{k}_std") for k in range(num_heads)]
    if not all(m in summary and s in summary for m, s in keys):
        log.warning("no eval statistics: %s/reward_norm.json not written", run_dir)
        return
    norm = RewardNormalization.create(
        [summary[m] for m, _ in keys],
        [summary[s] for _, s in keys],
        count=int(2 * summary.get("eval/pairs", 0)),
        source=f"eval split, chosen and rejected, step {summary['step']}",
    )
    norm.save(run_dir)


class RewardRecipe(PairRecipe):
    """The reward-model part of the generic stage."""

    name, label = "reward_stage", "reward model"
    model_class = "ScalarModel"
    supports_lora = False  # gin/algorithms/lora.gin would freeze the whole model
    done_line = (("eval loss %.4f", "eval/loss"), ("accuracy %.3f", "eval/accuracy"),
                 ("gold agreement %.3f", "eval/gold/agreement"),
                 ("gold ceiling %.3f", "eval/gold/ceiling"))  # fmt: skip

    def __init__(self, algorithm: RewardConfig, loss_hparams: RewardHParams, *, data,
                 normalize: bool):  # fmt: skip
        super().__init__(algorithm, loss_hparams)
        self._data, self.normalize = data, normalize
        self.model_kwargs = {"num_heads": algorithm.num_heads}

    def data(self, ctx: StageContext, tokenizer: str | None) -> StageData:
        # The SFT run's tokenizer, when there is one; else the data source's own setting.
        tok = {} if tokenizer is None else {"tokenizer": tokenizer}
        return self._data(batch_size=ctx.batch_size, seed=ctx.seed, **tok)

    def optimizer(self, optimizer):
        return freeze_trunk_updates(optimizer) if self.algorithm.freeze_trunk else optimizer

    def state(self, ctx, cfg, optimizer):
        factory, _ = reward_state_factory(
            cfg, optimizer, ctx.mesh, ctx.rules, seed=ctx.seed,
            num_heads=self.algorithm.num_heads, init_from=ctx.init_from,
        )  # fmt: skip
        return factory

    def summary_extra(self, ctx: StageContext) -> dict[str, Any]:
        return {"reward/init_from": str(ctx.init_from),
                "reward/num_heads": self.algorithm.num_heads,
                "reward/freeze_trunk": self.algorithm.freeze_trunk}  # fmt: skip

    def finish(self, ctx: StageContext, summary: dict[str, Any]) -> None:
        if self.normalize:
            write_normalization(ctx.run_dir, summary, self.algorithm.num_heads)
            summary["reward/normalized"] = (ctx.run_dir / "reward_norm.json").exists()
            if jax.process_index() == 0:  # summary.json stays the last file written
                write_json_atomic(ctx.run_dir / "summary.json", summary)
        super().finish(ctx, summary)


@gin.configurable
def reward_stage(
    run_dir: str = gin.REQUIRED,
    data: Callable[..., StageData] = gin.REQUIRED,
    seed: int = 0,
    batch_size: int = 32,
    init_from: str | None = None,
    num_heads: int = 1,
    freeze_trunk: bool = False,
    bootstrap: bool = True,
    grad_accum_steps: int = 1,
    ece_bins: int = 10,
    match_vocab: bool = True,
    normalize: bool = True,
    lr_scale: float = 1.0,
    debug_nan_step: int = -1,
) -> LoopResult:
    """Trains a Bradley-Terry reward model (gin: `train.stage = @reward_stage`).

    The traced loss hyperparameters (label smoothing, centering, margin scale, bootstrap seed:
    SEED unless bound) are bound on `reward_hparams` (`steps.reward.RewardHParams.create`).

    Args:
      run_dir: the run directory (RUN_DIR); re-running on it resumes.
      data: called as `data(batch_size=, seed=)` and, with `init_from`, `tokenizer=` the SFT
        run's tokenizer; returns `StageData` (normally `@reward_preference_data`).
      seed: init, data and (by default) bootstrap seed (SEED).
      batch_size: global batch size in pairs (BATCH_SIZE).
      init_from: an SFT run (or checkpoint) directory (INIT_FROM): its model.json defines the
        model and its policy params the trunk (None: fresh init from the gin model config).
      num_heads: ensemble size K (NUM_HEADS).
      freeze_trunk: train the heads only.
      bootstrap: with K > 1, train each head on its bootstrap resample (steps/reward.py).
      grad_accum_steps: micro-batches per step.
      ece_bins: calibration bins.
      match_vocab: fresh init only: set the model's vocab_size to the tokenizer's.
      normalize: write RUN_DIR/reward_norm.json at the end (used by the scorer).
      lr_scale, debug_nan_step: the traced update hyperparameters.
    """
    settings.positive_int("reward_stage.num_heads (NUM_HEADS)", num_heads)
    settings.positive_int("reward_stage.ece_bins", ece_bins)
    settings.integer("reward_stage.seed (SEED)", seed)
    seeded = stages.is_bound("reward_hparams.bootstrap_seed")
    hp = reward_hparams(**({} if seeded else {"bootstrap_seed": seed}))  # validates its values
    algo = RewardConfig(
        grad_accum_steps=grad_accum_steps, num_heads=num_heads, bootstrap=bootstrap,
        freeze_trunk=freeze_trunk, ece_bins=ece_bins,
    )  # fmt: skip
    return run_stage(
        RewardRecipe(algo, hp, data=data, normalize=normalize), run_dir=run_dir, seed=seed,
        batch_size=batch_size, init_from=init_from, match_vocab=match_vocab,
        lr_scale=lr_scale, debug_nan_step=debug_nan_step,
    )  # fmt: skip
