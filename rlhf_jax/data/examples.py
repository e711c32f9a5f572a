"""Tokenised examples, shared by every format: field validation, the truncation policy, and the
`TokenizedDataset` container that batch iterators draw rows from.

Row layout (each row a dict; ids are int32 numpy arrays, unpadded):

* sft:        {"input_ids": [bos] prompt completion [eos], "completion_start": int}
* preference: {"chosen_input_ids", "chosen_completion_start", "rejected_input_ids",
               "rejected_completion_start", "margin": float, and one float per extra field}
* prompt:     {"prompt_ids": [bos] prompt, "prompt_text": str}

`completion_start` is the position of the first completion token: the loss mask is 1 from there
to the end of the row (which includes the final EOS). It is always >= 1, because position 0 is
never a prediction target.

Truncation policy. `max_len` bounds a whole sequence (BOS and EOS included); `max_prompt_len`
bounds the prompt part *including BOS*. A longer prompt keeps its END (the text nearest the
completion) under `on_long_prompt="truncate"`, or is dropped and counted under "drop". A
completion that does not fit keeps its START and then has no EOS (the text did not end there).
Because `max_prompt_len < max_len`, at least one completion token always survives, so no row
has an empty completion or an all-zero loss mask; a completion that tokenises to nothing is a
bad row.

Bad rows (a missing, empty or non-string field) raise `DataError` naming the source, the row's
index in its file and the field, or with `on_bad_row="skip"` are dropped, counted in
`stats["bad_rows"]` and logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import datasets
import numpy as np

from rlhf_jax.data import batching
from rlhf_jax.data.errors import DataError
from rlhf_jax.data.sources import HIDDEN_COLUMNS, ROW_INDEX, TYPE_ERRORS, source_name
from rlhf_jax.errors import SettingsError

log = logging.getLogger(__name__)

OnBadRow = Literal["error", "skip"]
OnLongPrompt = Literal["truncate", "drop"]
Kind = Literal["sft", "preference", "prompt"]


class TokenizedDataset(Sequence):
    """Tokenised rows of one kind plus their lengths and the counts of what was dropped.

    Attributes:
      kind: "sft", "preference" or "prompt" (which collate function applies).
      rows: the row dicts (layout in the module docstring).
      lengths: [N] int32, each row's longest sequence (what bucketing looks at).
      stats: counts: rows (read), kept, bad_rows, long_prompt_truncated, long_prompt_dropped,
        completion_truncated.
      pad_id: the tokenizer's pad id, used by `collate`.
      name: the source name.
      extra_fields: preference rows only: the names of the per-row float columns the rows
        carry besides `margin` (`preference.build_preference_dataset`), collated as [B] float32.
    """

    def __init__(
        self,
        kind: Kind,
        rows: list[dict],
        stats: dict[str, int],
        pad_id: int,
        name="",
        extra_fields: Sequence[str] = (),
    ):
        self.kind = kind
        self.rows = rows
        self.stats = stats
        self.pad_id = pad_id
        self.name = name
        self.extra_fields = tuple(extra_fields)
        if kind == "sft":
            lengths = [len(r["input_ids"]) for r in rows]
        elif kind == "preference":
            lengths = [max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows]
        else:
            lengths = [len(r["prompt_ids"]) for r in rows]
        self.lengths = np.asarray(lengths, dtype=np.int32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def collate(self, rows: Sequence[dict | None], length: int) -> dict[str, np.ndarray]:
        """Pads `rows` (None = an all-padding row) to `length`; see batching.py for layouts."""
        if self.kind == "preference":
            return batching.collate_preference(
                rows, length, pad_id=self.pad_id, extras=self.extra_fields
            )
        fn = {"sft": batching.collate_sft, "prompt": batching.collate_prompts}[self.kind]
        return fn(rows, length, pad_id=self.pad_id)

    def with_rows(self, rows: list[dict], extra_fields: Sequence[str] | None = None):
        """A copy holding `rows` (same kind, stats, pad id and name; extra fields unless given)."""
        extras = self.extra_fields if extra_fields is None else extra_fields
        return TokenizedDataset(self.kind, rows, self.stats, self.pad_id, self.name, extras)

    def __repr__(self) -> str:
        return f"TokenizedDataset(kind={self.kind!r}, rows={len(self)}, stats={self.stats})"


def new_stats() -> dict[str, int]:
    return dict.fromkeys(
        (
            "rows",
            "kept",
            "bad_rows",
            "long_prompt_truncated",
            "long_prompt_dropped",
            "completion_truncated",
        ),
        0,
    )


class RowReader:
    """Iterates a split's rows column-wise and validates fields, counting or raising on bad rows.

    Args:
      ds: the split (as returned by `load_source`).
      fields: the columns the format needs; a column absent from the split is a configuration
        error and raises at once (whatever `on_bad_row` says).
      optional: columns read when present.
      on_bad_row: "error" raises the first bad row's DataError, "skip" drops and counts it.
    """

    def __init__(
        self,
        ds: datasets.Dataset,
        fields: Sequence[str],
        optional: Sequence[str] = (),
        on_bad_row: OnBadRow = "error",
    ):
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.name = source_name(ds)
        self.on_bad_row = on_bad_row
        cols = [c for c in ds.column_names if c not in HIDDEN_COLUMNS]
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise DataError(f"{self.name}: no column {missing[0]!r}; columns are {cols}")
        read = [*fields, *(f for f in optional if f in ds.column_names)]
        read += [c for c in HIDDEN_COLUMNS if c in ds.column_names]
        self.columns = ds.select_columns(list(dict.fromkeys(read))).to_dict()
        self.n = len(ds)
        self.row_index = self.columns.get(ROW_INDEX) or list(range(self.n))
        self.type_errors = self.columns.get(TYPE_ERRORS) or [None] * self.n
        self.stats = new_stats()
        self.stats["rows"] = self.n
        self._first_error: str | None = None

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def where(self, i: int, field: str | None = None) -> str:
        """The "source: row r: field 'f'" prefix of an error message."""
        s = f"{self.name}: row {self.row_index[i]}"
        return s if field is None else f"{s}: field {field!r}"

    def raw(self, i: int, field: str) -> Any:
        """The field's value, raising if a JSON source had a value of the wrong type there."""
        if self.type_errors[i] is not None:
            bad = json.loads(self.type_errors[i])
            if field in bad:
                got, column_kind = bad[field]
                if column_kind == "str":
                    raise DataError(f"{self.where(i, field)} must be a string, got {got}")
                raise DataError(
                    f"{self.where(i, field)} is a {got} where the column holds {column_kind} values"
                )
        return self.columns[field][i]

    def text(self, i: int, field: str) -> str:
        """A non-empty string field (whitespace-only counts as empty)."""
        v = self.raw(i, field)
        if v is None:
            raise DataError(f"{self.where(i, field)} is missing")
        if not isinstance(v, str):
            raise DataError(f"{self.where(i, field)} must be a string, got {type(v).__name__}")
        if not v.strip():
            raise DataError(f"{self.where(i, field)} is empty")
        return v

    def number(self, i: int, field: str, missing: float = 0.0) -> float:
        """An optional numeric field: a finite number (numeric strings accepted), or `missing`
        for an absent column or a null."""
        if field not in self.columns:
            return missing
        v = self.raw(i, field)
        if v is None:
            return missing
        try:
            if isinstance(v, bool):
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise DataError(f"{self.where(i, field)} must be a number, got {v!r}") from None
        if not np.isfinite(x):
            raise DataError(f"{self.where(i, field)} must be finite, got {v!r}")
        return x

    def bad(self, err: DataError) -> None:
        """Handles one bad row: raises in "error" mode, counts it in "skip" mode."""
        if self.on_bad_row == "error":
            raise err
        self.stats["bad_rows"] += 1
        if self._first_error is None:
            self._first_error = str(err)

    def finish(self, kept: int) -> dict[str, int]:
        """Logs what was dropped and returns the stats; raises if nothing is left."""
        self.stats["kept"] = kept
        s = self.stats
        if s["bad_rows"]:
            log.warning(
                "%s: skipped %d bad row(s) of %d (first: %s)",
                self.name,
                s["bad_rows"],
                s["rows"],
                self._first_error,
            )
        if s["long_prompt_dropped"] or s["long_prompt_truncated"]:
            log.info(
                "%s: %d long prompt(s) truncated, %d dropped",
                self.name,
                s["long_prompt_truncated"],
                s["long_prompt_dropped"],
            )
        if self.n and not kept:
            raise DataError(f"{self.name}: no usable rows left of {self.n} (stats: {s})")
        return s


class Truncator:
    """The truncation policy (see the module docstring) for one tokenizer and set of limits.

    Args:
      bos_id: BOS id or None (no BOS).
      eos_id: EOS id.
      max_len: longest sequence, BOS and EOS included.
      max_prompt_len: longest prompt part, BOS included; default max_len // 2. Must leave room
        for one completion token (< max_len) unless `prompt_only`.
      on_long_prompt: "truncate" (keep the end) or "drop".
      prompt_only: for prompt datasets, where only max_prompt_len applies.
    """

    def __init__(
        self,
        bos_id: int | None,
        eos_id: int,
        max_len: int,
        max_prompt_len: int | None = None,
        on_long_prompt: OnLongPrompt = "truncate",
        prompt_only: bool = False,
    ):
        if on_long_prompt not in ("truncate", "drop"):
            raise SettingsError(
                f"on_long_prompt must be 'truncate' or 'drop', got {on_long_prompt!r}"
            )
        self.bos = [] if bos_id is None else [bos_id]
        self.eos_id = eos_id
        self.max_len = max_len
        self.max_prompt_len = max_len // 2 if max_prompt_len is None else max_prompt_len
        self.on_long_prompt = on_long_prompt
        if self.max_prompt_len < len(self.bos) + 1:
            raise SettingsError(f"max_prompt_len={self.max_prompt_len} leaves no room for a prompt")
        if not prompt_only and self.max_prompt_len >= max_len:
            raise SettingsError(
                f"max_prompt_len={self.max_prompt_len} must be < max_len={max_len} so that at "
                "least one completion token fits"
            )

    def prompt(self, ids: list[int], stats: dict[str, int]) -> list[int] | None:
        """[bos] + prompt, truncated from the left or None (dropped) when too long."""
        room = self.max_prompt_len - len(self.bos)
        if len(ids) > room:
            if self.on_long_prompt == "drop":
                stats["long_prompt_dropped"] += 1
                return None
            stats["long_prompt_truncated"] += 1
            ids = ids[len(ids) - room :]
        return self.bos + list(ids)

    def sequence(
        self, prompt: list[int], completion: list[int], stats: dict[str, int]
    ) -> tuple[np.ndarray, int] | None:
        """([bos] prompt completion [eos] as int32, completion_start), or None if the completion
        is empty. `prompt` already includes BOS (from `prompt`, or just the BOS for plain text).
        """
        if not completion:
            return None
        start = len(prompt)
        if start == 0:  # no BOS and no prompt: the first token cannot be a target.
            if len(completion) < 2:
                return None
            start = 1
        budget = self.max_len - len(prompt)
        if len(completion) + 1 <= budget:
            ids = [*prompt, *completion, self.eos_id]
        else:
            stats["completion_truncated"] += 1
            ids = [*prompt, *completion[:budget]]
        return np.asarray(ids, dtype=np.int32), start
