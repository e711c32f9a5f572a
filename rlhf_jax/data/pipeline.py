"""One-call data pipelines for the training stages: source -> tokenised rows -> batch iterators.

Each `make_*_iterator` is gin-configurable under an explicit name and returns
`(train_iter, eval_iter, tokenizer)`; `eval_iter` is None when the source has no eval split and
no `split_fraction` was given. They run on the host only (numpy out); build the global
device arrays from the batches in the train loop.

    gin name         function                   batches
    sft_data         make_sft_iterator          SFT (input_ids, attention_mask, loss_mask, valid)
    preference_data  make_preference_iterator   chosen_*/rejected_*, margin, extras, valid
    prompt_data      make_prompt_iterator       prompt_ids, prompt_mask, prompt_text, valid

Preference pairs are read by one loader, `build_preference_splits`, whatever stage trains on
them: `make_preference_iterator` (DPO) and the reward model's `train.pairs.reward_preference_data`
both call it, asking for the per-pair float columns they need as `extra_fields`.

`task=` takes a built-in task object (e.g. `@reviews_task()` in gin), which supplies the source
and tokenizer when they are not given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import gin

from rlhf_jax import settings
from rlhf_jax.data.batching import BatchIterator, CollateFn
from rlhf_jax.data.examples import TokenizedDataset
from rlhf_jax.data.preference import HH_ASSISTANT, build_preference_dataset
from rlhf_jax.data.prompts import build_prompt_dataset
from rlhf_jax.data.sources import Source, load_source
from rlhf_jax.data.text import build_sft_dataset
from rlhf_jax.data.tokenizer import Tokenizer

Iterators = tuple[BatchIterator, BatchIterator | None, Tokenizer]

_COLUMNS = {
    "sft": ("text", "prompt", "completion", "messages"),
    "preference": ("prompt", "chosen", "rejected", "margin"),
    "prompt": ("prompt", "messages"),
}


def _field_kwargs(
    kind: str, columns: Mapping[str, str] | None, extra_roles: Sequence[str] = ()
) -> dict[str, str]:
    roles = (*_COLUMNS[kind], *extra_roles)
    out = {}
    for k, v in (columns or {}).items():
        if k not in roles:
            raise ValueError(f"unknown {kind} column role {k!r}; choose from {roles}")
        out[f"{k}_field"] = v
    return out


def _resolve(
    kind: str, source: Source | None, tokenizer: str | Path | Tokenizer | None, task: Any
) -> tuple[Source, Tokenizer]:
    if task is not None:
        if source is None:
            source = getattr(task, f"{kind}_source", None)
        if tokenizer is None:
            tokenizer = task.tokenizer_path
    if source is None:
        raise ValueError(f"no {kind} data source: set source= (or a task that provides one)")
    if tokenizer is None:
        raise ValueError("no tokenizer: set tokenizer= to a tokenizer.json or its directory")
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(tokenizer)
    return source, tokenizer


def _processes(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax  # only for the process layout; the pipeline itself is numpy.

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    return index, count


def train_and_eval_iterators(
    built: Mapping[str, TokenizedDataset],
    *,
    batch_size: int,
    eval_batch_size: int | None,
    buckets: Sequence[int],
    seed: int,
    collate_fn: CollateFn | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[BatchIterator, BatchIterator | None]:
    """The shuffled train iterator of `built["train"]` and, when there is an eval split, the
    in-order eval iterator of `built["eval"]` (process layout: from jax unless given)."""
    pi, pc = _processes(process_index, process_count)
    train = BatchIterator(
        built["train"],
        batch_size,
        buckets,
        seed,
        collate_fn=collate_fn,
        process_index=pi,
        process_count=pc,
    )
    ev = None
    if "eval" in built:
        ev = BatchIterator.for_eval(
            built["eval"],
            eval_batch_size or batch_size,
            buckets,
            collate_fn=collate_fn,
            process_index=pi,
            process_count=pc,
        )
    return train, ev


def _check_len(max_len: int | None, buckets: Sequence[int]) -> int:
    settings.lengths(buckets, max_len)
    return max(buckets) if max_len is None else max_len


@gin.configurable("sft_data")
def make_sft_iterator(
    source: Source | None = None,
    tokenizer: str | Path | Tokenizer | None = None,
    *,
    task: Any = None,
    format: str = "text",
    columns: Mapping[str, str] | None = None,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    buckets: Sequence[int] = (64, 128, 256),
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    split_fraction: float | None = None,
    seed: int = 0,
    file_format: str | None = None,
    on_bad_row: str = "error",
    on_long_prompt: str = "truncate",
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterators:
    """SFT train/eval iterators.

    Args:
      source: anything `load_source` takes (file, directory, {"train":..,"eval":..}, ...).
      tokenizer: a tokenizer.json path, its directory, or a `Tokenizer`.
      task: a built-in task supplying `sft_source` and `tokenizer_path` when not given.
      format: "text", "prompt_completion" or "messages" (see text.py).
      columns: column names by role, e.g. {"prompt": "question", "completion": "answer"};
        roles: text, prompt, completion, messages.
      batch_size: global train batch size (divisible by process_count).
      eval_batch_size: global eval batch size (default batch_size).
      buckets: allowed padded lengths T.
      max_len: longest sequence, BOS and EOS included (default max(buckets)).
      max_prompt_len: longest prompt part, BOS included (default max_len // 2).
      split_fraction: hold out this fraction as eval when the source has no eval split.
      seed: seed of shuffling and of the split.
      file_format: force the file format ("jsonl", "json", "parquet", "csv").
      on_bad_row: "error" or "skip".
      on_long_prompt: "truncate" or "drop".
      process_index, process_count: this host's slice (default: from jax).

    Returns:
      (train_iter, eval_iter or None, tokenizer).
    """
    src, tok = _resolve("sft", source, tokenizer, task)
    max_len = _check_len(max_len, buckets)
    splits = load_source(src, split_fraction=split_fraction, seed=seed, file_format=file_format)
    kw = _field_kwargs("sft", columns)
    built = {
        name: build_sft_dataset(
            ds,
            tok,
            format=format,
            max_len=max_len,
            max_prompt_len=max_prompt_len,
            on_bad_row=on_bad_row,
            on_long_prompt=on_long_prompt,
            **kw,
        )
        for name, ds in splits.items()
    }
    train, ev = train_and_eval_iterators(
        built,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        buckets=buckets,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return train, ev, tok


def build_preference_splits(
    splits: Mapping[str, datasets.Dataset],
    tokenizer: Tokenizer,
    *,
    max_len: int,
    format: str = "explicit",
    columns: Mapping[str, str] | None = None,
    extra_fields: Sequence[str] = (),
    assistant_marker: str = HH_ASSISTANT,
    max_prompt_len: int | None = None,
    on_bad_row: str = "error",
    on_long_prompt: str = "truncate",
) -> dict[str, TokenizedDataset]:
    """Tokenises every split of preference pairs alike (`preference.build_preference_dataset`).

    Args:
      splits: the splits from `load_source`.
      tokenizer: the tokenizer.
      max_len: longest sequence per side, BOS and EOS included.
      format: "explicit", "implicit_prompt", "conversational" or "auto" (see preference.py).
      columns: column names by role: prompt, chosen, rejected, margin, and any extra field.
      extra_fields: per-pair float columns every split must have, carried into each batch
        under these names (renamed columns through `columns`; null = NaN).
      assistant_marker, max_prompt_len, on_bad_row, on_long_prompt: as in
        `build_preference_dataset`.

    Returns:
      {split name: TokenizedDataset of kind "preference"}.
    """
    kw = _field_kwargs("preference", columns, extra_fields)
    extras = {f: kw.pop(f"{f}_field", f) for f in extra_fields}
    return {
        name: build_preference_dataset(
            ds,
            tokenizer,
            format=format,
            extra_fields=extras,
            assistant_marker=assistant_marker,
            max_len=max_len,
            max_prompt_len=max_prompt_len,
            on_bad_row=on_bad_row,
            on_long_prompt=on_long_prompt,
            **kw,
        )
        for name, ds in splits.items()
    }


@gin.configurable("preference_data")
def make_preference_iterator(
    source: Source | None = None,
    tokenizer: str | Path | Tokenizer | None = None,
    *,
    task: Any = None,
    format: str = "explicit",
    columns: Mapping[str, str] | None = None,
    extra_fields: Sequence[str] = (),
    assistant_marker: str = HH_ASSISTANT,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    buckets: Sequence[int] = (64, 128, 256),
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    split_fraction: float | None = None,
    seed: int = 0,
    file_format: str | None = None,
    on_bad_row: str = "error",
    on_long_prompt: str = "truncate",
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterators:
    """Preference-pair train/eval iterators.

    Args:
      format: "explicit", "implicit_prompt", "conversational" or "auto" (see preference.py).
      columns: column names by role: prompt, chosen, rejected, margin, and any extra field.
      extra_fields: per-pair float columns to carry into the batches (see
        `build_preference_splits`).
      assistant_marker: where "implicit_prompt" cuts the shared prefix.
      Others: as in `make_sft_iterator` (max_len applies to each side; both sides of a batch
        share one bucket T).

    Returns:
      (train_iter, eval_iter or None, tokenizer).
    """
    src, tok = _resolve("preference", source, tokenizer, task)
    max_len = _check_len(max_len, buckets)
    splits = load_source(src, split_fraction=split_fraction, seed=seed, file_format=file_format)
    built = build_preference_splits(
        splits,
        tok,
        max_len=max_len,
        format=format,
        columns=columns,
        extra_fields=extra_fields,
        assistant_marker=assistant_marker,
        max_prompt_len=max_prompt_len,
        on_bad_row=on_bad_row,
        on_long_prompt=on_long_prompt,
    )
    train, ev = train_and_eval_iterators(
        built,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        buckets=buckets,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return train, ev, tok


@gin.configurable("prompt_data")
def make_prompt_iterator(
    source: Source | None = None,
    tokenizer: str | Path | Tokenizer | None = None,
    *,
    task: Any = None,
    format: str = "text",
    columns: Mapping[str, str] | None = None,
    batch_size: int = 32,
    eval_batch_size: int | None = None,
    buckets: Sequence[int] = (16, 32, 64),
    max_prompt_len: int | None = None,
    split_fraction: float | None = None,
    seed: int = 0,
    file_format: str | None = None,
    on_bad_row: str = "error",
    on_long_prompt: str = "truncate",
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterators:
    """Prompt-only train/eval iterators (left-padded, for generation).

    Args:
      format: "text" or "messages" (see prompts.py).
      columns: column names by role: prompt, messages.
      buckets: allowed padded prompt lengths P.
      max_prompt_len: longest `[bos] prompt` (default max(buckets)).
      Others: as in `make_sft_iterator`.

    Returns:
      (train_iter, eval_iter or None, tokenizer).
    """
    src, tok = _resolve("prompt", source, tokenizer, task)
    max_prompt_len = _check_len(max_prompt_len, buckets)
    splits = load_source(src, split_fraction=split_fraction, seed=seed, file_format=file_format)
    kw = _field_kwargs("prompt", columns)
    built = {
        name: build_prompt_dataset(
            ds,
            tok,
            format=format,
            max_prompt_len=max_prompt_len,
            on_bad_row=on_bad_row,
            on_long_prompt=on_long_prompt,
            **kw,
        )
        for name, ds in splits.items()
    }
    train, ev = train_and_eval_iterators(
        built,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        buckets=buckets,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return train, ev, tok
