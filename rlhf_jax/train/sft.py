"""The SFT stage: gin wiring from data and model to the generic loop, plus SFT data sources.

`sft_stage` (bound as `train.stage = @sft_stage`) takes its data from a gin-configured callable
returning `SFTData`: `@pipeline_sft_data` (the data pipeline, e.g. the built-in reviews corpus
through gin/tasks/reviews.gin) or `@synthetic_sft_data` (tests, benchmarks). Each data source
also reports the unigram baseline: the cross-entropy of the eval completion tokens under the
(add-one smoothed) unigram distribution of the train completion tokens, the loss a model that
ignores context would reach.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gin
import numpy as np

from rlhf_jax import partitioning
from rlhf_jax.models import lora, model_config
from rlhf_jax.steps.algorithm import HParams, eval_step, train_step
from rlhf_jax.steps.sft import SFTConfig
from rlhf_jax.train import stages
from rlhf_jax.train.checkpoint import read_model_info, resolve_run_dir
from rlhf_jax.train.faults import RunLock
from rlhf_jax.train.loop import LoopConfig, LoopResult, LoopSpec, train_loop
from rlhf_jax.train.synthetic import SyntheticSFTIterator, synthetic_eval_batches

log = logging.getLogger(__name__)

HostBatch = dict[str, np.ndarray]


@dataclasses.dataclass
class SFTData:
    """What an SFT data source returns.

    Attributes:
      train: endless iterator of host batches (this process's rows), checkpointable.
      eval: returns a fresh pass over the eval split (padded last batch with `valid`).
      vocab_size: the tokenizer's number of ids.
      seq_len: the batches' sequence length T.
      tokenizer_path: recorded in RUN_DIR/model.json for later stages.
      summary: entries for summary.json (e.g. the unigram baseline).
    """

    train: Iterator[HostBatch]
    eval: Callable[[], Iterable[HostBatch]] | None
    vocab_size: int
    seq_len: int
    tokenizer_path: str | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


def unigram_baseline(
    train_batches: Iterable[HostBatch], eval_batches: Iterable[HostBatch], vocab_size: int
) -> dict[str, float]:
    """Unigram baseline over completion targets (`loss_mask` positions of `valid` rows).

    Returns:
      `baseline/unigram_eval_loss`: mean -log p(token) over eval targets, p = add-one smoothed
      train unigram; `baseline/unigram_train_entropy`: entropy of that distribution (nats).
    """

    def counts(batches: Iterable[HostBatch]) -> np.ndarray:
        c = np.zeros(vocab_size, np.float64)
        for b in batches:
            mask = b["loss_mask"].astype(bool)
            if "valid" in b:
                mask &= b["valid"].astype(bool)[:, None]
            np.add.at(c, b["input_ids"][mask], 1.0)
        return c

    train_c, eval_c = counts(train_batches), counts(eval_batches)
    p = (train_c + 1.0) / (train_c.sum() + vocab_size)
    eval_loss = float(-(eval_c * np.log(p)).sum() / max(eval_c.sum(), 1.0))
    entropy = float(-(p * np.log(p)).sum())
    return {"baseline/unigram_eval_loss": eval_loss, "baseline/unigram_train_entropy": entropy}


@gin.configurable
def synthetic_sft_data(
    batch_size: int,
    seed: int = 0,
    seq_len: int = 32,
    vocab_size: int = 64,
    eval_rows: int = 40,
    baseline_batches: int = 20,
) -> SFTData:
    """Synthetic SFT data (see `train.synthetic`): no files, instant, learnable."""
    evals = synthetic_eval_batches(batch_size, seq_len, vocab_size, eval_rows, seed=seed + 10_000)
    probe = SyntheticSFTIterator(batch_size, seq_len, vocab_size, seed)
    baseline = unigram_baseline(itertools.islice(probe, baseline_batches), evals, vocab_size)
    return SFTData(
        train=SyntheticSFTIterator(batch_size, seq_len, vocab_size, seed),
        eval=lambda: iter(evals),
        vocab_size=vocab_size,
        seq_len=seq_len,
        summary=baseline,
    )


@gin.configurable
def pipeline_sft_data(batch_size: int, seed: int = 0, baseline: bool = True) -> SFTData:
    """SFT data from the data pipeline: `rlhf_jax.data.make_sft_iterator` as gin configures it
    (`sft_data.task`, `sft_data.buckets`, ...; gin/tasks/reviews.gin sets the reviews task).

    Args:
      batch_size: global batch size (overrides `sft_data.batch_size`).
      seed: shuffling seed (overrides `sft_data.seed`).
      baseline: compute the unigram baseline (one pass over the train split).
    """
    from rlhf_jax.data import BatchIterator, make_sft_iterator

    train, ev, tok = make_sft_iterator(batch_size=batch_size, seed=seed)
    summary = stages.truncation_summary(
        {"train": train.stats, "eval": ev.stats if ev is not None else None}
    )
    if baseline and ev is not None:
        one_pass = BatchIterator.for_eval(train.examples, batch_size, train.buckets)
        summary.update(unigram_baseline(one_pass, ev, tok.vocab_size))
    return SFTData(
        train=train,
        eval=(lambda: iter(ev)) if ev is not None else None,
        vocab_size=tok.vocab_size,
        seq_len=max(train.buckets),
        tokenizer_path=tok.path,
        summary=summary,
    )


def _flops_per_batch(cfg, batch: HostBatch) -> float:
    rows, seq_len = batch["input_ids"].shape
    return cfg.flops_per_token(seq_len) * rows * seq_len


@gin.configurable
def sft_stage(
    run_dir: str = gin.REQUIRED,
    data: Callable[..., SFTData] = gin.REQUIRED,
    seed: int = 0,
    batch_size: int = 32,
    init_from: str | None = None,
    match_vocab: bool = True,
    grad_accum_steps: int = 1,
    logits_chunk_size: int = 128,
    lr_scale: float = 1.0,
    debug_nan_step: int = -1,
) -> LoopResult:
    """Supervised fine-tuning of a causal LM (gin: `train.stage = @sft_stage`).

    Args:
      run_dir: the run directory (RUN_DIR); re-running on it resumes from its checkpoints.
      data: called as `data(batch_size=..., seed=...)`, returns `SFTData`.
      seed: init and data seed (SEED).
      batch_size: global batch size (BATCH_SIZE); divisible by data×fsdp and the accumulation.
      init_from: a run/checkpoint directory to initialise the policy from; its model.json
        then defines the model (the gin model config is not used).
      match_vocab: set the model's vocab_size to the tokenizer's (else check that it fits).
      grad_accum_steps: micro-batches per step.
      logits_chunk_size: positions per chunk of the chunked cross-entropy.
      lr_scale: traced learning-rate multiplier.
      debug_nan_step: fault injection: the loss/gradients of this step become NaN (-1: off).
    """
    loop_cfg = LoopConfig()
    stages.check_stage_settings(
        run_dir=run_dir, seed=seed, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
        lr_scale=lr_scale, init_from=init_from, stage="sft_stage",
    )  # fmt: skip
    run_dir_path = Path(run_dir)
    with RunLock(run_dir_path):
        mesh, rules = partitioning.make_mesh(), partitioning.logical_rules()
        partitioning.check_batch_divisible(batch_size, mesh)
        sft_data = data(batch_size=batch_size, seed=seed)
        if init_from is not None:
            cfg = read_model_info(resolve_run_dir(init_from))["model_config"]
            cfg = stages.fit_vocab(cfg, sft_data.vocab_size, match=False)
        else:
            cfg = stages.fit_vocab(model_config(), sft_data.vocab_size, match_vocab)
        cfg = lora.with_lora(cfg)  # LoRA adapters when gin/algorithms/lora.gin sets a rank
        stages.check_seq_len(cfg, sft_data.seq_len)
        optimizer = stages.build_optimizer(loop_cfg.train_steps)
        factory, _ = stages.model_state_factory(
            cfg, optimizer, mesh, rules, seed=seed, init_from=init_from
        )
        stages.record_model(
            run_dir_path, cfg, stage="sft_stage", tokenizer_path=sft_data.tokenizer_path,
            lora_base=init_from if cfg.lora_rank else None,
        )  # fmt: skip
        step_cfg = SFTConfig(grad_accum_steps=grad_accum_steps, logits_chunk_size=logits_chunk_size)
        spec = LoopSpec(
            step_fn=functools.partial(train_step, cfg=step_cfg),
            state=factory,
            hparams=HParams.create(lr_scale=lr_scale, debug_nan_step=debug_nan_step),
            train_data=sft_data.train,
            eval_fn=functools.partial(eval_step, cfg=step_cfg),
            eval_data=sft_data.eval,
            summarize_eval=step_cfg.summarize_eval,
            flops_per_batch=functools.partial(_flops_per_batch, cfg),
            summary_extra=sft_data.summary,
        )
        result = train_loop(spec, loop_cfg, run_dir=run_dir_path, mesh=mesh, rules=rules, seed=seed)
        if result.summary is not None:
            _log_summary(result.summary)
        return result


def _log_summary(summary: dict[str, Any]) -> None:
    loss = summary.get("eval/loss", math.nan)
    base = summary.get("baseline/unigram_eval_loss", math.nan)
    log.info(
        "SFT done: %d steps, eval loss %.4f vs unigram baseline %.4f, %.1f s",
        summary["step"],
        loss,
        base,
        summary["wall_time_s"],
    )
