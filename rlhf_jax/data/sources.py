"""Loading raw datasets: local JSONL/JSON, Parquet and CSV files, `save_to_disk` directories,
in-memory `datasets` objects and (online only) hub dataset names, into a DatasetDict with
"train" and, when available or requested, "eval".

Local files are read without the `datasets` cache (plain `json`, `pyarrow.csv`,
`pyarrow.parquet`), so loading is fast, leaves nothing in ~/.cache, and row indices in error
messages are the indices in the file. Every split carries two bookkeeping fields that the
tokenising builders use for error messages:

* `info.description` holds the source name (the file path) — see `source_name`;
* a `_row_index` column holds each row's index in its file (it survives splitting/shuffling).

JSON values whose type differs from the rest of their column (a number among strings, say)
cannot be stored in an Arrow column; they are stored as null and recorded in a `_type_errors`
column ('{"field": ["int", "str"]}': the value's type and the column's) so the builders can
report "field 'x' must be a string, got int" instead of "missing".
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from rlhf_jax.data.errors import DataError

log = logging.getLogger(__name__)

ROW_INDEX = "_row_index"
TYPE_ERRORS = "_type_errors"
HIDDEN_COLUMNS = (ROW_INDEX, TYPE_ERRORS)
EVAL_SPLIT_NAMES = ("eval", "test", "validation", "valid", "dev")
FILE_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

Source = str | Path | Mapping[str, Any] | datasets.Dataset | datasets.DatasetDict | list


def source_name(ds: datasets.Dataset) -> str:
    """The name of the file or dataset a split was read from (for error messages)."""
    return ds.info.description or ds.info.dataset_name or "<in-memory dataset>"


def _with_name(ds: datasets.Dataset, name: str) -> datasets.Dataset:
    ds.info.description = name
    return ds


def _value_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


def _rows_to_dataset(rows: list[dict], name: str) -> datasets.Dataset:
    """Builds an Arrow dataset from JSON rows, isolating values of a minority type per column."""
    kinds: dict[str, dict[str, int]] = {}
    for row in rows:
        for k, v in row.items():
            if v is not None:
                c = kinds.setdefault(k, {})
                c[_value_kind(v)] = c.get(_value_kind(v), 0) + 1
    type_errors: list[dict[str, str] | None] = [None] * len(rows)
    for col, counts in kinds.items():
        if len(counts) < 2:
            continue
        # The most common kind wins (strings on a tie: most fields are text).
        keep = max(sorted(counts), key=lambda k: (counts[k], k == "str"))
        for i, row in enumerate(rows):
            v = row.get(col)
            if v is not None and _value_kind(v) != keep:
                row[col] = None
                type_errors[i] = {**(type_errors[i] or {}), col: [type(v).__name__, keep]}
    columns = sorted({k for row in rows for k in row}) if rows else []
    data = {c: [row.get(c) for row in rows] for c in columns}
    data[ROW_INDEX] = list(range(len(rows)))
    if any(t is not None for t in type_errors):
        data[TYPE_ERRORS] = [None if t is None else json.dumps(t) for t in type_errors]
    try:
        ds = datasets.Dataset.from_dict(data)
    except Exception as e:  # pyarrow raises several unrelated types for unconvertible values.
        raise DataError(f"{name}: cannot convert rows to a table: {e}") from None
    return _with_name(ds, name)


def _read_json_rows(path: Path, fmt: str) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    rows: list = []
    if fmt == "json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in e.msg:
                raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
            fmt = "jsonl"  # a .json file holding JSON lines
        else:
            if isinstance(obj, dict):
                lists = [v for v in obj.values() if isinstance(v, list)]
                if "data" in obj and isinstance(obj["data"], list):
                    obj = obj["data"]
                elif len(lists) == 1:
                    obj = lists[0]
                else:
                    raise DataError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
            if not isinstance(obj, list):
                raise DataError(f"{path}: expected a JSON list of rows")
            rows = obj
    if fmt == "jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON on line {lineno}: {e.msg}") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i} is a {type(row).__name__}, expected a JSON object")
    return rows


def read_file(path: str | Path, file_format: str | None = None) -> datasets.Dataset:
    """Reads one local JSONL/JSON/Parquet/CSV file into an in-memory Dataset.

    Args:
      path: the file.
      file_format: "jsonl", "json", "parquet" or "csv"; inferred from the suffix when None.

    Returns:
      The rows, plus the `_row_index` (and, if needed, `_type_errors`) bookkeeping columns.

    Raises:
      DataError: the file is missing, unreadable or of an unknown format.
    """
    p = Path(path).expanduser()
    fmt = file_format or FILE_FORMATS.get(p.suffix.lower())
    if fmt not in set(FILE_FORMATS.values()):
        raise DataError(
            f"{p}: unknown file format {fmt or p.suffix!r}; use one of "
            f"{sorted(set(FILE_FORMATS.values()))} (file_format=...)"
        )
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        if fmt in ("json", "jsonl"):
            return _rows_to_dataset(_read_json_rows(p, fmt), str(p))
        if fmt == "csv":
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(str(p))
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(str(p))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {p}: {e}") from None
    except Exception as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read {p} as {fmt}: {e}") from None
    ds = datasets.Dataset(table)
    ds = ds.add_column(ROW_INDEX, np.arange(len(ds), dtype=np.int64))
    return _with_name(ds, str(p))


def _named_splits(dd: Mapping[str, datasets.Dataset], name: str) -> dict[str, datasets.Dataset]:
    """Maps a source's split names onto "train" and "eval"."""
    out = {}
    if "train" in dd:
        out["train"] = dd["train"]
    elif len(dd) == 1:
        out["train"] = next(iter(dd.values()))
    else:
        raise DataError(f"{name}: no 'train' split among {list(dd)}")
    for s in EVAL_SPLIT_NAMES:
        if s in dd:
            out["eval"] = dd[s]
            break
    for split, ds in out.items():
        if not ds.info.description:
            _with_name(ds, f"{name}[{split}]")
    return out


def _load_directory(p: Path, file_format: str | None) -> dict[str, datasets.Dataset]:
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        loaded = datasets.load_from_disk(str(p))
        if isinstance(loaded, datasets.Dataset):
            return {"train": _with_name(loaded, str(p))}
        return _named_splits({k: _with_name(v, f"{p}[{k}]") for k, v in loaded.items()}, str(p))
    # A folder of files named after their splits: train.jsonl, test.jsonl, ...
    files = {}
    for f in sorted(p.iterdir()):
        if f.is_file() and (file_format or FILE_FORMATS.get(f.suffix.lower())):
            files.setdefault(f.stem, f)
    if not files:
        raise DataError(f"{p}: neither a save_to_disk directory nor a folder of data files")
    wanted = {k: v for k, v in files.items() if k == "train" or k in EVAL_SPLIT_NAMES}
    if wanted and "train" not in wanted:
        # Never train on an eval split: a folder that lost its train file is incomplete.
        raise DataError(
            f"{p}: has {', '.join(f.name for f in wanted.values())} but no train file; "
            "the folder is incomplete"
        )
    if not wanted and len(files) == 1:
        wanted = files
    splits = _named_splits({k: read_file(f, file_format) for k, f in wanted.items()}, str(p))
    if (p / MANIFEST).is_file():
        check_manifest(
            p, {f.name: len(splits[k if k == "train" else "eval"]) for k, f in wanted.items()}
        )
    return splits


MANIFEST = "preferences.json"


def check_manifest(folder: Path, found: Mapping[str, int]) -> None:
    """Refuses a folder whose manifest (preferences.json, written by make-preferences) does not
    match its data files: a file missing or extra, or a different row count.

    Args:
      folder: the folder.
      found: the data files read, by file name, with their row counts.

    Raises:
      DataError: naming the folder and the mismatch.
    """
    try:
        meta = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{folder / MANIFEST} is unreadable: {e}") from None
    expected = meta.get("files") if isinstance(meta, dict) else None
    if expected is None and isinstance(meta, dict) and "train_pairs" in meta:
        # Manifests written before `files` existed: the pair counts per split.
        expected = {"train.parquet": meta["train_pairs"]}
        if meta.get("eval_pairs"):
            expected["eval.parquet"] = meta["eval_pairs"]
    if not isinstance(expected, dict):
        raise DataError(f"{folder / MANIFEST} lists no files")
    if dict(found) != expected:
        raise DataError(
            f"{folder}: its files {dict(sorted(found.items()))} (name: rows) do not match "
            f"{MANIFEST} {dict(sorted(expected.items()))}; the folder is incomplete or was "
            "changed: make it again"
        )


def _load_splits(source: Source, file_format: str | None) -> dict[str, datasets.Dataset]:
    if isinstance(source, datasets.DatasetDict):
        return _named_splits(dict(source), "<in-memory DatasetDict>")
    if isinstance(source, datasets.Dataset):
        return {"train": source}
    if isinstance(source, list):
        return {"train": _rows_to_dataset([dict(r) for r in source], "<in-memory rows>")}
    if isinstance(source, Mapping):
        return _named_splits(
            {k: _load_splits(v, file_format)["train"] for k, v in source.items()}, "<mapping>"
        )
    p = Path(source).expanduser()
    if p.is_dir():
        return _load_directory(p, file_format)
    if p.is_file():
        return {"train": read_file(p, file_format)}
    s = str(source)
    if p.suffix.lower() in FILE_FORMATS or "/" in s and not _HUB_NAME.match(s):
        raise DataError(f"data source not found: {s}")
    if not _HUB_NAME.match(s):
        raise DataError(f"data source not found and not a hub dataset name: {s}")
    # Hub dataset (needs network; never used by the tests).
    log.info("loading hub dataset %s", s)
    loaded = datasets.load_dataset(s)
    if isinstance(loaded, datasets.Dataset):
        return {"train": _with_name(loaded, s)}
    return _named_splits({k: _with_name(v, f"{s}[{k}]") for k, v in loaded.items()}, s)


def load_source(
    source: Source,
    *,
    split_fraction: float | None = None,
    seed: int = 0,
    file_format: str | None = None,
) -> datasets.DatasetDict:
    """Loads a dataset source into a DatasetDict with "train" and (when available) "eval".

    Args:
      source: a JSONL/JSON/Parquet/CSV file; a `save_to_disk` directory (Dataset or
        DatasetDict); a folder of files named by split (train.jsonl, test.jsonl, ...); a mapping
        {"train": src, "eval": src}; a `datasets.Dataset`/`DatasetDict`; a list of row dicts;
        or a hub dataset name (needs network). Split names test/validation/valid/dev count as
        "eval".
      split_fraction: if the source has no eval split, hold out this fraction of the train
        rows (at least one row) as "eval", chosen by a permutation seeded with `seed`. Ignored
        (with a log line) when the source has its own eval split.
      seed: seed of the split.
      file_format: force "jsonl", "json", "parquet" or "csv" instead of using file suffixes.

    Returns:
      DatasetDict with "train" and, if the source has one or split_fraction is set, "eval".

    Raises:
      DataError: missing or unreadable source, or a bad split_fraction.
    """
    splits = _load_splits(source, file_format)
    if split_fraction is not None:
        if not 0.0 < split_fraction < 1.0:
            raise DataError(f"split_fraction must be in (0, 1), got {split_fraction}")
        if "eval" in splits:
            log.info(
                "source %s has an eval split; split_fraction ignored", source_name(splits["train"])
            )
        else:
            train = splits["train"]
            n = len(train)
            n_eval = max(1, int(round(split_fraction * n)))
            if n_eval >= n:
                raise DataError(
                    f"{source_name(train)}: split_fraction={split_fraction} of {n} rows leaves "
                    "no training rows"
                )
            perm = np.random.default_rng(seed).permutation(n)
            name = source_name(train)
            splits["eval"] = _with_name(train.select(np.sort(perm[:n_eval])), name)
            splits["train"] = _with_name(train.select(np.sort(perm[n_eval:])), name)
    return datasets.DatasetDict(splits)
