"""SFT data sources (gin): `@pipeline_sft_data` (the data pipeline, e.g. the built-in reviews
corpus through gin/tasks/reviews.gin) and `@synthetic_sft_data` (tests, benchmarks), both
returning `StageData`. Each also reports the unigram baseline: the cross-entropy of the eval
completion tokens under the (add-one smoothed) unigram distribution of the train completion
tokens, the loss a model that ignores context would reach.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import gin
import numpy as np

from rlhf_jax.train import stages
from rlhf_jax.train.stage import StageData
from rlhf_jax.train.synthetic import SyntheticSFTIterator, synthetic_eval_batches

HostBatch = dict[str, np.ndarray]


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
) -> StageData:
    """Synthetic SFT data (see `train.synthetic`): no files, instant, learnable."""
    evals = synthetic_eval_batches(batch_size, seq_len, vocab_size, eval_rows, seed=seed + 10_000)
    probe = SyntheticSFTIterator(batch_size, seq_len, vocab_size, seed)
    baseline = unigram_baseline(itertools.islice(probe, baseline_batches), evals, vocab_size)
    return StageData(
        train=SyntheticSFTIterator(batch_size, seq_len, vocab_size, seed),
        eval=evals,
        vocab_size=vocab_size,
        seq_len=seq_len,
        summary=baseline,
    )


@gin.configurable
def pipeline_sft_data(batch_size: int, seed: int = 0, baseline: bool = True) -> StageData:
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
    return StageData(
        train=train,
        eval=ev,
        vocab_size=tok.vocab_size,
        seq_len=max(train.buckets),
        tokenizer_path=tok.path,
        summary=summary,
    )
