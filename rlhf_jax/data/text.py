"""SFT formats: plain text, prompt+completion, and conversations, tokenised into `sft` rows.

Formats (column names are arguments):

* "text": one column (`text_field`); the whole text after BOS is the completion.
* "prompt_completion": `prompt_field` and `completion_field`; the loss covers the completion
  and the final EOS. The two strings are tokenised separately and concatenated, so put any
  separating space at the start of the completion (as HH-style data does).
* "messages": a list of {role, content} in `messages_field`, rendered with the tokenizer's chat
  template (or chat.DEFAULT_CHAT_TEMPLATE); the loss covers the last assistant turn only.
"""

from __future__ import annotations

from typing import Literal

import datasets

from rlhf_jax.data import chat
from rlhf_jax.data.errors import DataError
from rlhf_jax.data.examples import (
    OnBadRow,
    OnLongPrompt,
    RowReader,
    TokenizedDataset,
    Truncator,
)
from rlhf_jax.data.tokenizer import Tokenizer

SFTFormat = Literal["text", "prompt_completion", "messages"]
SFT_FORMATS = ("text", "prompt_completion", "messages")


def build_sft_dataset(
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    *,
    format: SFTFormat = "text",
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
    max_len: int = 512,
    max_prompt_len: int | None = None,
    on_bad_row: OnBadRow = "error",
    on_long_prompt: OnLongPrompt = "truncate",
) -> TokenizedDataset:
    """Tokenises one split for SFT.

    Args:
      dataset: one split from `load_source`.
      tokenizer: the tokenizer.
      format: "text", "prompt_completion" or "messages" (see the module docstring).
      text_field, prompt_field, completion_field, messages_field: column names.
      max_len: longest sequence, BOS and EOS included.
      max_prompt_len: longest prompt part, BOS included (default max_len // 2).
      on_bad_row: "error" or "skip" (drop and count bad rows).
      on_long_prompt: "truncate" (keep the end of the prompt) or "drop".

    Returns:
      A `TokenizedDataset` of kind "sft"; `stats` counts what was skipped or truncated.

    Raises:
      DataError: a bad row (in "error" mode), a missing column, or no usable rows.
    """
    if format not in SFT_FORMATS:
        raise ValueError(f"unknown SFT format {format!r}; choose one of {SFT_FORMATS}")
    trunc = Truncator(tokenizer.bos_id, tokenizer.eos_id, max_len, max_prompt_len, on_long_prompt)
    fields = {
        "text": [text_field],
        "prompt_completion": [prompt_field, completion_field],
        "messages": [messages_field],
    }[format]
    reader = RowReader(dataset, fields, on_bad_row=on_bad_row)
    keep, prompts, completions = [], [], []
    for i in reader:
        try:
            if format == "text":
                prompt, completion = None, reader.text(i, text_field)
            elif format == "prompt_completion":
                prompt = reader.text(i, prompt_field)
                completion = reader.text(i, completion_field)
            else:
                where = reader.where(i, messages_field)
                msgs = chat.check_messages(reader.raw(i, messages_field), where)
                head, tail = chat.last_turn_split(msgs, where)
                prompt, completion = chat.split_rendered(
                    head,
                    tail,
                    tokenizer.chat_template,
                    eos_token=tokenizer.eos_token,
                    where=where,
                )
        except DataError as e:
            reader.bad(e)
            continue
        keep.append(i)
        prompts.append(prompt)
        completions.append(completion)

    completion_ids = tokenizer.encode_batch(completions)
    has_prompt = format != "text"
    prompt_ids = tokenizer.encode_batch(prompts) if has_prompt else None
    rows = []
    for j, i in enumerate(keep):
        if has_prompt:
            p = trunc.prompt(prompt_ids[j], reader.stats)
            if p is None:
                continue
        else:
            p = list(trunc.bos)
        seq = trunc.sequence(p, completion_ids[j], reader.stats)
        if seq is None:
            field = completion_field if format == "prompt_completion" else fields[0]
            reader.bad(DataError(f"{reader.where(i, field)}: completion has no tokens"))
            continue
        ids, start = seq
        rows.append({"input_ids": ids, "completion_start": start})
    stats = reader.finish(len(rows))
    return TokenizedDataset("sft", rows, stats, tokenizer.pad_id, reader.name)
