"""Preference pairs for the stages that train on them (the reward model, the DPO family).

Both stages read pairs through the one loader, `data.pipeline.build_preference_splits` (margin
and named per-pair float columns carried through, validated alike), and share what follows it:
`pair_stage_data` turns the loader's iterators into the stage's `StageData`, and `PairRecipe`
counts a pair batch's tokens and FLOPs.

`reward_preference_data` (gin) is the reward model's data: that loader asked, as extra fields,
for the gold judge's `chosen_score` / `rejected_score` and the labeller's `label_prob` when
every split has them (or, from a `temperature` column, sigmoid((chosen_score - rejected_score)
/ temperature)), which the reward metrics use.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import datasets
import gin
import numpy as np

from rlhf_jax import settings
from rlhf_jax.data.examples import TokenizedDataset
from rlhf_jax.data.pipeline import build_preference_splits, train_and_eval_iterators
from rlhf_jax.data.sources import load_source
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.models import ModelConfig
from rlhf_jax.steps.reward import GOLD_FIELDS, LABEL_PROB_FIELD
from rlhf_jax.train import stages
from rlhf_jax.train.stage import Recipe, StageData, pair_flops, pair_tokens

HostBatch = dict[str, np.ndarray]
TEMPERATURE_FIELD = "temperature"


class PairRecipe(Recipe):
    """A `Recipe` whose batches are preference pairs: tokens and FLOPs count both sides."""

    def count_tokens(self, batch: HostBatch) -> float:
        return pair_tokens(batch)

    def flops_per_batch(self, cfg: ModelConfig, batch: HostBatch) -> float:
        return pair_flops(cfg, batch)


def pair_stage_data(
    train: Iterator[HostBatch],
    eval: Iterable[HostBatch] | None,
    tokenizer: Tokenizer,
    seq_len: int,
    summary: Mapping[str, Any] | None = None,
) -> StageData:
    """`StageData` of the pair loader's iterators; its summary is `summary` and the splits'
    truncation counts."""
    stats = {"train": getattr(train, "stats", None), "eval": getattr(eval, "stats", None)}
    summary = {**(summary or {}), **stages.truncation_summary(stats)}
    return StageData(train, eval, tokenizer.vocab_size, seq_len, tokenizer.path, summary)


def _gold_fields(
    splits: Mapping[str, datasets.Dataset],
    gold: Sequence[str],
    label_prob: str | None,
    temperature: str | None,
) -> dict[str, str]:
    """The reward metrics' extra fields every split has, {batch name: column}, sorted."""

    def everywhere(column: str | None) -> bool:
        return bool(column) and all(column in ds.column_names for ds in splits.values())

    out = {}
    if len(gold) == len(GOLD_FIELDS) and all(everywhere(c) for c in gold):
        out.update(zip(GOLD_FIELDS, gold, strict=True))
    if everywhere(label_prob):
        out[LABEL_PROB_FIELD] = label_prob
    elif out and everywhere(temperature):
        out[TEMPERATURE_FIELD] = temperature  # becomes label_prob (`_label_prob_from_temperature`)
    return dict(sorted(out.items()))


def _label_prob_from_temperature(pairs: TokenizedDataset) -> TokenizedDataset:
    """The pairs with `label_prob` = sigmoid((chosen_score - rejected_score) / temperature), the
    Bradley-Terry labeller's probability, in place of their `temperature` field."""
    c, r, temp = (np.asarray([row[k] for row in pairs.rows], np.float64)
                  for k in (*GOLD_FIELDS, TEMPERATURE_FIELD))  # fmt: skip
    with np.errstate(all="ignore"):
        z = (c - r) / temp
        p = 1.0 / (1.0 + np.exp(-z))
    rows = [
        {**{k: v for k, v in row.items() if k != TEMPERATURE_FIELD}, LABEL_PROB_FIELD: float(x)}
        for row, x in zip(pairs.rows, p, strict=True)
    ]
    fields = sorted({*pairs.extra_fields, LABEL_PROB_FIELD} - {TEMPERATURE_FIELD})
    return pairs.with_rows(rows, fields)


@gin.configurable
def reward_preference_data(
    batch_size: int,
    seed: int = 0,
    tokenizer: str | Tokenizer | None = None,
    *,
    source: Any = gin.REQUIRED,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    gold_columns: Sequence[str] = GOLD_FIELDS,
    label_prob_column: str | None = LABEL_PROB_FIELD,
    temperature_column: str | None = TEMPERATURE_FIELD,
    buckets: Sequence[int] = (64, 128, 256),
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    split_fraction: float | None = 0.05,
    eval_batch_size: int | None = None,
    file_format: str | None = None,
    on_bad_row: str = "error",
    on_long_prompt: str = "truncate",
) -> StageData:
    """Preference pairs for reward-model training, with the gold columns when present.

    Args:
      batch_size: global batch size.
      seed: shuffling and split seed.
      tokenizer: tokenizer.json path or `Tokenizer` (the stage passes the SFT run's).
      source: anything `data.sources.load_source` reads (Parquet/JSONL file, directory, ...).
      format: preference format ("explicit", "implicit_prompt", "conversational", "auto").
      columns: column names by role (prompt, chosen, rejected, margin).
      gold_columns: the gold judge's score columns (chosen, rejected).
      label_prob_column: the labeller's P(chosen preferred) column.
      temperature_column: Bradley-Terry labelling temperature column, used for the label
        probability when `label_prob_column` is absent.
      buckets, max_len, max_prompt_len, file_format, on_bad_row, on_long_prompt: as in
        `data.pipeline.make_preference_iterator`.
      split_fraction: eval share when the source has no eval split (None: no eval).
      eval_batch_size: global eval batch size (default batch_size).
    """
    settings.lengths(
        buckets, max_len, max_prompt_len, on_long_prompt, prefix="reward_preference_data."
    )
    if tokenizer is None:
        raise ValueError("reward_preference_data needs a tokenizer (or an SFT run to take it from)")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
    splits = load_source(source, split_fraction=split_fraction, seed=seed, file_format=file_format)
    extras = _gold_fields(splits, gold_columns, label_prob_column, temperature_column)
    built = build_preference_splits(
        splits, tok, max_len=max(buckets) if max_len is None else max_len, format=format,
        columns={**(columns or {}), **extras}, extra_fields=tuple(extras),
        max_prompt_len=max_prompt_len, on_bad_row=on_bad_row, on_long_prompt=on_long_prompt,
    )  # fmt: skip
    if TEMPERATURE_FIELD in extras:
        built = {name: _label_prob_from_temperature(pairs) for name, pairs in built.items()}
    train, ev = train_and_eval_iterators(
        built, batch_size=batch_size, eval_batch_size=eval_batch_size, buckets=buckets, seed=seed
    )
    data = pair_stage_data(train, ev, tok, max(buckets), {f"data/{k}_pairs": len(v)
                                                         for k, v in built.items()})  # fmt: skip
    data.summary["data/columns"] = ",".join(built["train"].extra_fields) or "none"
    return data
