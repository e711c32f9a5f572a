"""Atomic writes and strict JSON: what every file the project writes goes through.

- `strict(obj)`: a copy that any JSON parser reads: non-finite floats become null, and in a
  dict the reason goes beside them (`"eval/loss": null, "eval/loss/nonfinite": "nan"`).
- `dumps(obj)` / `write_json(path, obj)` / `write_jsonl(path, rows)`: strict JSON, written to a
  temporary sibling and renamed into place, so a reader sees the old file or the new one.
- `replace_dir(tmp, dest)`: puts a folder written at `tmp` in place of `dest` as a whole.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

NONFINITE_SUFFIX = "/nonfinite"


def _scalar(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)) and np.ndim(value) == 0:
        return value.item()
    if hasattr(value, "__array__") and np.ndim(value) == 0:  # jax scalars
        return np.asarray(value).item()
    return value


def _reason(x: float) -> str:
    return "nan" if math.isnan(x) else "inf" if x > 0 else "-inf"


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None (reasons beside them in dicts)."""
    obj = _scalar(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            v = _scalar(v)
            if isinstance(v, float) and not math.isfinite(v):
                out[k] = None
                out[f"{k}{NONFINITE_SUFFIX}"] = _reason(v)
            else:
                out[k] = strict(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict(obj.tolist())
    return obj


def restore_nonfinite(record: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `strict` on one flat record: `KEY: null, KEY/nonfinite: "nan"` back to
    `KEY: nan` (for readers that want the numbers)."""
    out = dict(record)
    for k, v in record.items():
        if k.endswith(NONFINITE_SUFFIX) and v in ("nan", "inf", "-inf"):
            base = k[: -len(NONFINITE_SUFFIX)]
            if out.get(base) is None:
                out[base] = float(v)
                del out[k]
    return out


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text (`allow_nan=False` after `strict`)."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` to `path` through a temporary sibling and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> Path:
    """Strict JSON (indented) to `path`, atomically."""
    return write_text(path, dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """One strict JSON object per line to `path`, atomically."""
    return write_text(path, "".join(dumps(r) + "\n" for r in rows))


def temp_sibling(dest: str | os.PathLike) -> Path:
    """A fresh, empty temporary folder next to `dest` (same file system, so renames are
    atomic), for `replace_dir`."""
    dest = Path(dest).absolute()
    tmp = dest.with_name(f".{dest.name}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Moves the complete folder `tmp` to `dest`, replacing the old one as a whole.

    A process killed part-way leaves `dest` either old or new (or, between the two renames,
    absent with the old one at `.NAME.old.PID`), never a mixture of the two.
    """
    tmp, dest = Path(tmp), Path(dest).absolute()
    if not dest.exists():
        os.rename(tmp, dest)
        return dest
    old = dest.with_name(f".{dest.name}.old.{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
