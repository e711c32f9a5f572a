"""Preference pairs with their extra columns, as the reward-model stage reads them.

`reward_preference_data` (gin) loads preference pairs with the data pipeline and adds the float
columns the reward metrics use when the data has them: the gold judge's `chosen_score` /
`rejected_score` and the labeller's `label_prob` (or, from a `temperature` column,
sigmoid((chosen_score - rejected_score) / temperature)). The pipeline only carries `margin`, so
each row's position travels through its margin field and the extra columns are looked up
afterwards (robust to rows the pipeline drops).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import gin
import numpy as np

from rlhf_jax import settings
from rlhf_jax.data.batching import collate_preference
from rlhf_jax.data.errors import DataError
from rlhf_jax.data.examples import RowReader, TokenizedDataset
from rlhf_jax.data.pipeline import train_and_eval_iterators
from rlhf_jax.data.preference import build_preference_dataset
from rlhf_jax.data.sources import load_source
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.steps.reward import GOLD_FIELDS, LABEL_PROB_FIELD
from rlhf_jax.train import stages
from rlhf_jax.train.stage import StageData

log = logging.getLogger(__name__)

HostBatch = dict[str, np.ndarray]
_ROW_FIELD = "_reward_row"


def _float_column(ds: datasets.Dataset, name: str | None) -> np.ndarray | None:
    """A column as float64 (NaN for null or non-numeric), or None when absent."""
    if not name or name not in ds.column_names:
        return None
    out = np.full(len(ds), np.nan)
    for i, v in enumerate(ds[name]):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def _extra_columns(
    ds: datasets.Dataset, gold: Sequence[str], label_prob: str | None, temperature: str | None
) -> dict[str, np.ndarray]:
    """Per-row float columns for the batch: gold scores and the label probability."""
    out = {}
    scores = [_float_column(ds, c) for c in gold]
    if all(s is not None for s in scores):
        out.update(zip(GOLD_FIELDS, scores, strict=True))
    p = _float_column(ds, label_prob)
    temp = _float_column(ds, temperature)
    if p is None and temp is not None and GOLD_FIELDS[0] in out:
        with np.errstate(all="ignore"):
            z = (out["chosen_score"] - out["rejected_score"]) / temp
            p = 1.0 / (1.0 + np.exp(-z))
    if p is not None:
        out[LABEL_PROB_FIELD] = p
    return out


def _checked_margins(
    ds: datasets.Dataset, column: str, on_bad_row: str
) -> tuple[datasets.Dataset, np.ndarray | None]:
    """The margin column validated exactly as the DPO loader does (`RowReader.number`: a
    finite number or null; "abc", NaN, "2.0" are bad rows naming file, row and field).

    Returns:
      The split (without the bad rows under on_bad_row="skip") and its margins (None when
      the column is absent).
    """
    if column not in ds.column_names:
        return ds, None
    reader = RowReader(ds, [], optional=[column], on_bad_row=on_bad_row)
    keep, margins = [], []
    for i in reader:
        try:
            margins.append(reader.number(i, column))
            keep.append(i)
        except DataError as e:
            reader.bad(e)  # raises under "error"
    if len(keep) < len(ds):
        log.warning("%s: %d row(s) with a bad %r skipped", reader.name, len(ds) - len(keep), column)
        ds = ds.select(keep)
    return ds, np.asarray(margins, dtype=np.float64)


def _with_extras(
    built: TokenizedDataset,
    ds: datasets.Dataset,
    margin: np.ndarray | None,
    extras: Mapping[str, np.ndarray],
) -> TokenizedDataset:
    rows = []
    for row in built.rows:
        i = int(row["margin"])  # the row's position, carried through the margin field
        new = dict(row, margin=0.0 if margin is None or np.isnan(margin[i]) else margin[i])
        new.update({k: float(v[i]) for k, v in extras.items()})
        rows.append(new)
    return TokenizedDataset("preference", rows, built.stats, built.pad_id, built.name)


def collate_reward_pairs(
    rows: Sequence[dict | None], length: int, *, pad_id: int, extras: Sequence[str] = ()
) -> HostBatch:
    """Preference batch (`collate_preference`) plus float32 [B] `extras` (NaN on padding)."""
    out = collate_preference(rows, length, pad_id=pad_id)
    for name in extras:
        out[name] = np.asarray([np.nan if r is None else r[name] for r in rows], np.float32)
    return out


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
    temperature_column: str | None = "temperature",
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
    cols = dict(columns or {})
    margin_col = cols.pop("margin", "margin")
    fields = {f"{k}_field": v for k, v in cols.items()}
    splits = load_source(source, split_fraction=split_fraction, seed=seed, file_format=file_format)
    built: dict[str, TokenizedDataset] = {}
    extra_names: set[str] | None = None
    for name, ds in splits.items():
        ds, margin = _checked_margins(ds, margin_col, on_bad_row)
        ds = ds.add_column(_ROW_FIELD, np.arange(len(ds), dtype=np.int64))
        tokenized = build_preference_dataset(
            ds,
            tok,
            format=format,
            margin_field=_ROW_FIELD,
            max_len=max(buckets) if max_len is None else max_len,
            max_prompt_len=max_prompt_len,
            on_bad_row=on_bad_row,
            on_long_prompt=on_long_prompt,
            **fields,
        )
        extras = _extra_columns(ds, gold_columns, label_prob_column, temperature_column)
        names = set(extras)
        extra_names = names if extra_names is None else extra_names & names
        built[name] = _with_extras(tokenized, ds, margin, extras)
    extra_names = sorted(extra_names or ())
    collate = functools.partial(collate_reward_pairs, pad_id=tok.pad_id, extras=extra_names)
    train, ev = train_and_eval_iterators(
        built,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        buckets=buckets,
        seed=seed,
        collate_fn=collate,
    )
    summary = {f"data/{k}_pairs": len(v) for k, v in built.items()}
    summary.update(stages.truncation_summary({k: v.stats for k, v in built.items()}))
    summary["data/columns"] = ",".join(extra_names) or "none"
    return StageData(
        train=train,
        eval=ev,
        vocab_size=tok.vocab_size,
        seq_len=max(buckets),
        tokenizer_path=tok.path,
        summary=summary,
    )
