"""Prompt-only datasets for RL (PPO/RLOO/GRPO rollouts) and for sampling at evaluation.

Formats (column names are arguments):

* "text": one prompt string per row in `prompt_field`.
* "messages": a list of {role, content} in `messages_field`, rendered with the tokenizer's chat
  template (or chat.DEFAULT_CHAT_TEMPLATE) and its generation prompt, so the model continues
  as the assistant.

Rows are `[bos] prompt` (at most `max_prompt_len` tokens, BOS included; a longer prompt keeps
its end or is dropped). `prompt_text` keeps the raw prompt string (the rendered one for
"messages"), untruncated. `read_prompts` reads the prompt strings alone (for sampling).
"""

from __future__ import annotations

import os
from typing import Literal

import datasets
import numpy as np

from rlhf_jax.data import chat
from rlhf_jax.data.errors import DataError
from rlhf_jax.data.examples import (
    OnBadRow,
    OnLongPrompt,
    RowReader,
    TokenizedDataset,
    Truncator,
)
from rlhf_jax.data.sources import load_source
from rlhf_jax.data.tokenizer import Tokenizer

PromptFormat = Literal["text", "messages"]
PROMPT_FORMATS = ("text", "messages")


def build_prompt_dataset(
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    *,
    format: PromptFormat = "text",
    prompt_field: str = "prompt",
    messages_field: str = "messages",
    max_prompt_len: int = 64,
    on_bad_row: OnBadRow = "error",
    on_long_prompt: OnLongPrompt = "truncate",
) -> TokenizedDataset:
    """Tokenises one split of prompts.

    Args:
      dataset: one split from `load_source`.
      tokenizer: the tokenizer.
      format: "text" or "messages".
      prompt_field, messages_field: column names.
      max_prompt_len: longest `[bos] prompt`, BOS included.
      on_bad_row: "error" or "skip".
      on_long_prompt: "truncate" (keep the end) or "drop".

    Returns:
      A `TokenizedDataset` of kind "prompt".

    Raises:
      DataError: a bad row (in "error" mode), a missing column, or no usable rows.
    """
    if format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {format!r}; choose one of {PROMPT_FORMATS}")
    trunc = Truncator(
        tokenizer.bos_id,
        tokenizer.eos_id,
        max_len=max_prompt_len,
        max_prompt_len=max_prompt_len,
        on_long_prompt=on_long_prompt,
        prompt_only=True,
    )
    field = prompt_field if format == "text" else messages_field
    reader = RowReader(dataset, [field], on_bad_row=on_bad_row)
    keep, texts = [], []
    for i in reader:
        try:
            if format == "text":
                text = reader.text(i, field)
            else:
                msgs = chat.check_messages(reader.raw(i, field), reader.where(i, field))
                text = chat.render(
                    msgs,
                    tokenizer.chat_template,
                    add_generation_prompt=True,
                    eos_token=tokenizer.eos_token,
                    where=reader.where(i, field),
                )
        except DataError as e:
            reader.bad(e)
            continue
        keep.append(i)
        texts.append(text)
    rows = []
    for j, ids in enumerate(tokenizer.encode_batch(texts)):
        if not ids:
            reader.bad(DataError(f"{reader.where(keep[j], field)}: prompt has no tokens"))
            continue
        p = trunc.prompt(ids, reader.stats)
        if p is None:
            continue
        rows.append({"prompt_ids": np.asarray(p, dtype=np.int32), "prompt_text": texts[j]})
    stats = reader.finish(len(rows))
    return TokenizedDataset("prompt", rows, stats, tokenizer.pad_id, reader.name)


def read_prompts(
    source: str | os.PathLike,
    split: str | None = None,
    column: str = "prompt",
    limit: int | None = None,
) -> list[str]:
    """Prompt strings from a file, folder or saved dataset (any `load_source` format).

    Args:
      source: the prompts.
      split: "train" or "eval"; None takes "eval" when the source has one, else "train".
      column: the prompt column.
      limit: keep the first `limit` prompts (None: all).

    Raises:
      DataError: the source is missing or unreadable, lacks the split or the column, or has a
        missing, non-string or empty prompt (the message names the file and row).
    """
    splits = load_source(str(source))
    if split is None:
        split = "eval" if "eval" in splits else "train"
    if split not in splits:
        raise DataError(f"{source} has no {split!r} split (it has {sorted(splits)})")
    ds = splits[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    reader = RowReader(ds, [column])
    prompts = [reader.text(i, column) for i in reader]
    if not prompts:
        raise DataError(f"{source} has no prompts")
    return prompts
