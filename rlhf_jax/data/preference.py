"""Preference-pair formats, tokenised into `preference` rows (chosen and rejected sequences that
share one prompt, plus an optional margin).

Formats (column names are arguments):

* "explicit": `prompt_field`, `chosen_field`, `rejected_field` strings; the completions are
  tokenised after the prompt, so a separating space belongs at the start of each completion.
* "implicit_prompt": `chosen_field` and `rejected_field` are whole transcripts sharing their
  beginning, as in Anthropic HH-RLHF ("\\n\\nHuman: ... \\n\\nAssistant: ..."). The prompt is
  their common prefix cut back to just after the last `assistant_marker` ("\\n\\nAssistant:")
  inside it; the rest of each transcript is its completion.
* "conversational": `chosen_field`/`rejected_field` are lists of {role, content} messages,
  rendered with the tokenizer's chat template (or chat.DEFAULT_CHAT_TEMPLATE). If the
  `prompt_field` column exists it holds the prompt messages and chosen/rejected hold only the
  completion messages; otherwise the prompt is the messages the two conversations share, cut
  back to before an assistant turn.
* "auto": "conversational" if the chosen column holds lists, else "explicit" if the prompt
  column exists, else "implicit_prompt" (the choice is logged).

Per-pair numbers travel with the pair, validated the same way (a finite number or a numeric
string; anything else is a bad row named by file, row and field):

* `margin_field` (default "margin") is read when the column exists (null = 0), exposed as the
  batch's `margin`;
* `extra_fields` names further float columns that must exist (e.g. the gold judge's scores
  for the reward model's metrics); each arrives in the batch under its name, null = NaN.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
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
from rlhf_jax.errors import SettingsError

log = logging.getLogger(__name__)

PreferenceFormat = Literal["explicit", "implicit_prompt", "conversational", "auto"]
PREFERENCE_FORMATS = ("explicit", "implicit_prompt", "conversational", "auto")
HH_ASSISTANT = "\n\nAssistant:"
# Batch fields of a preference row that an extra field may not replace.
RESERVED_FIELDS = frozenset(
    {"margin", "valid"}
    | {
        f"{side}_{k}"
        for side in ("chosen", "rejected")
        for k in ("input_ids", "attention_mask", "loss_mask", "completion_start")
    }
)


def split_transcripts(
    chosen: str, rejected: str, marker: str = HH_ASSISTANT, where: str = ""
) -> tuple[str, str, str]:
    """Splits two transcripts sharing a prefix into (prompt, chosen_completion,
    rejected_completion) at the last `marker` inside their common prefix.

    Raises:
      DataError: the common prefix holds no marker, or a completion is empty.
    """
    n = len(os.path.commonprefix([chosen, rejected]))
    at = chosen.rfind(marker, 0, n)
    if at < 0:
        raise DataError(f"{where}: chosen and rejected share no prefix ending in {marker!r}")
    cut = at + len(marker)
    prompt, c, r = chosen[:cut], chosen[cut:], rejected[cut:]
    for name, text in (("chosen", c), ("rejected", r)):
        if not text.strip():
            raise DataError(f"{where}: {name} completion after the shared prompt is empty")
    return prompt, c, r


def _extra_columns(extra_fields: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """`extra_fields` as {batch name: column name} (a sequence names both alike).

    Raises:
      SettingsError: a name that is a preference batch field of its own (e.g. "margin").
    """
    if isinstance(extra_fields, str):
        extra_fields = (extra_fields,)
    out = dict(extra_fields) if isinstance(extra_fields, Mapping) else {f: f for f in extra_fields}
    clash = sorted(RESERVED_FIELDS.intersection(out))
    if clash:
        raise SettingsError(f"extra field {clash[0]!r} is a preference batch field already")
    return out


def _detect(dataset: datasets.Dataset, prompt_field: str, chosen_field: str) -> str:
    feature = dataset.features.get(chosen_field)
    if isinstance(feature, list) or type(feature).__name__ in ("List", "LargeList", "Sequence"):
        return "conversational"
    return "explicit" if prompt_field in dataset.column_names else "implicit_prompt"


def build_preference_dataset(
    dataset: datasets.Dataset,
    tokenizer: Tokenizer,
    *,
    format: PreferenceFormat = "explicit",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    margin_field: str | None = "margin",
    extra_fields: Sequence[str] | Mapping[str, str] = (),
    assistant_marker: str = HH_ASSISTANT,
    max_len: int = 512,
    max_prompt_len: int | None = None,
    on_bad_row: OnBadRow = "error",
    on_long_prompt: OnLongPrompt = "truncate",
) -> TokenizedDataset:
    """Tokenises one split of preference pairs.

    Args:
      dataset: one split from `load_source`.
      tokenizer: the tokenizer.
      format: "explicit", "implicit_prompt", "conversational" or "auto" (module docstring).
      prompt_field, chosen_field, rejected_field, margin_field: column names (margin optional:
        None or an absent column gives margin 0).
      extra_fields: required per-pair float columns carried into each row and batch: column
        names, or a mapping {batch name: column name} (null = NaN).
      assistant_marker: where "implicit_prompt" cuts the shared prefix.
      max_len: longest sequence per side, BOS and EOS included.
      max_prompt_len: longest prompt part, BOS included (default max_len // 2).
      on_bad_row: "error" or "skip".
      on_long_prompt: "truncate" (keep the end of the prompt) or "drop".

    Returns:
      A `TokenizedDataset` of kind "preference".

    Raises:
      DataError: a bad row (in "error" mode), a missing column, or no usable rows.
      SettingsError: an unknown format, or an extra field named like a batch field.
    """
    if format not in PREFERENCE_FORMATS:
        raise SettingsError(
            f"unknown preference format {format!r}; choose one of {PREFERENCE_FORMATS}"
        )
    if format == "auto":
        format = _detect(dataset, prompt_field, chosen_field)
        log.info("preference format detected: %s", format)
    extras = _extra_columns(extra_fields)
    trunc = Truncator(tokenizer.bos_id, tokenizer.eos_id, max_len, max_prompt_len, on_long_prompt)
    fields = [chosen_field, rejected_field]
    has_prompt_col = prompt_field in dataset.column_names
    if format == "explicit" or (format == "conversational" and has_prompt_col):
        fields = [prompt_field, *fields]
    fields += list(extras.values())
    optional = [margin_field] if margin_field else []
    reader = RowReader(dataset, fields, optional=optional, on_bad_row=on_bad_row)

    keep, prompts, chosens, rejecteds, numbers = [], [], [], [], []
    for i in reader:
        try:
            if format == "explicit":
                p = reader.text(i, prompt_field)
                c = reader.text(i, chosen_field)
                r = reader.text(i, rejected_field)
            elif format == "implicit_prompt":
                c_full = reader.text(i, chosen_field)
                r_full = reader.text(i, rejected_field)
                p, c, r = split_transcripts(c_full, r_full, assistant_marker, reader.where(i))
            else:
                p, c, r = _conversational(
                    reader,
                    i,
                    tokenizer,
                    prompt_field if has_prompt_col else None,
                    chosen_field,
                    rejected_field,
                )
            nums = {"margin": reader.number(i, margin_field) if margin_field else 0.0}
            nums.update({k: reader.number(i, c, missing=math.nan) for k, c in extras.items()})
        except DataError as e:
            reader.bad(e)
            continue
        keep.append(i)
        prompts.append(p)
        chosens.append(c)
        rejecteds.append(r)
        numbers.append(nums)

    p_ids = tokenizer.encode_batch(prompts)
    c_ids = tokenizer.encode_batch(chosens)
    r_ids = tokenizer.encode_batch(rejecteds)
    rows = []
    for j, i in enumerate(keep):
        p = trunc.prompt(p_ids[j], reader.stats)
        if p is None:
            continue
        c = trunc.sequence(p, c_ids[j], reader.stats)
        r = trunc.sequence(p, r_ids[j], reader.stats)
        if c is None or r is None:
            field = chosen_field if c is None else rejected_field
            reader.bad(DataError(f"{reader.where(i, field)}: completion has no tokens"))
            continue
        rows.append(
            {
                "chosen_input_ids": c[0],
                "chosen_completion_start": c[1],
                "rejected_input_ids": r[0],
                "rejected_completion_start": r[1],
                **numbers[j],
            }
        )
    stats = reader.finish(len(rows))
    return TokenizedDataset(
        "preference", rows, stats, tokenizer.pad_id, reader.name, extra_fields=tuple(extras)
    )


def _conversational(
    reader: RowReader,
    i: int,
    tokenizer: Tokenizer,
    prompt_field: str | None,
    chosen_field: str,
    rejected_field: str,
) -> tuple[str, str, str]:
    chosen = chat.check_messages(reader.raw(i, chosen_field), reader.where(i, chosen_field))
    rejected = chat.check_messages(reader.raw(i, rejected_field), reader.where(i, rejected_field))
    if prompt_field is not None:
        prompt = chat.check_messages(reader.raw(i, prompt_field), reader.where(i, prompt_field))
    else:
        prompt, chosen, rejected = chat.shared_prompt(chosen, rejected, reader.where(i))
    out = []
    for field, completion in ((chosen_field, chosen), (rejected_field, rejected)):
        p_text, c_text = chat.split_rendered(
            prompt,
            completion,
            tokenizer.chat_template,
            eos_token=tokenizer.eos_token,
            where=reader.where(i, field),
        )
        if not c_text.strip():
            raise DataError(f"{reader.where(i, field)}: the rendered completion is empty")
        out.append(c_text)
    return p_text, out[0], out[1]
