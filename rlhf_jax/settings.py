"""Validation of settings (gin bindings and command-line flags) at the start of a command.

Each check raises `errors.SettingsError` naming the setting (as the user wrote it, e.g.
`LoopConfig.train_steps`) and what it must be, before any expensive work (data loading,
compiling) and before anything is written. Small functions, so that stages and commands can
share them.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlhf_jax.errors import SettingsError


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1 (counts and sizes)."""
    if not _is_int(value) or value < 1:
        raise SettingsError(f"{name}={value!r} must be a positive integer")
    return int(value)


def nonneg_int(name: str, value: Any) -> int:
    """`value` as an int >= 0 (0 usually means "off")."""
    if not _is_int(value) or value < 0:
        raise SettingsError(f"{name}={value!r} must be an integer >= 0")
    return int(value)


def optional_positive_int(name: str, value: Any) -> int | None:
    """None, or an int >= 1."""
    return None if value is None else positive_int(name, value)


def integer(name: str, value: Any) -> int:
    """Any int (seeds, step indices where -1 means "off")."""
    if not _is_int(value):
        raise SettingsError(f"{name}={value!r} must be an integer")
    return int(value)


def boolean(name: str, value: Any) -> bool:
    """True or False (gin's `True`/`False`, not a string such as 'no')."""
    if not isinstance(value, bool):
        raise SettingsError(f"{name}={value!r} must be True or False")
    return value


def finite(name: str, value: Any) -> float:
    """A finite real number."""
    if not _is_number(value) or not math.isfinite(value):
        raise SettingsError(f"{name}={value!r} must be a finite number")
    return float(value)


def nonneg_float(name: str, value: Any) -> float:
    """A finite number >= 0 (temperatures, coefficients)."""
    if finite(name, value) < 0:
        raise SettingsError(f"{name}={value!r} must be >= 0")
    return float(value)


def positive_float(name: str, value: Any) -> float:
    """A finite number > 0."""
    if finite(name, value) <= 0:
        raise SettingsError(f"{name}={value!r} must be > 0")
    return float(value)


def in_range(
    name: str, value: Any, low: float, high: float, *, low_open=False, high_open=False
) -> float:
    """A finite number in [low, high] (ends open when asked), e.g. probabilities."""
    x = finite(name, value)
    if x < low or x > high or (low_open and x == low) or (high_open and x == high):
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise SettingsError(f"{name}={value!r} must be in {lo}{low}, {high}{hi}")
    return x


def choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise SettingsError(f"{name}={value!r} must be one of {choices}")
    return value


def path_string(name: str, value: Any) -> str:
    """A non-empty path given as a string (or os.PathLike)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{name}={value!r} must be a path (a non-empty string)")
    return value


def existing_path(name: str, value: Any) -> Path:
    """A path that exists (file or folder)."""
    p = Path(path_string(name, value)).expanduser()
    if not p.exists():
        raise SettingsError(f"{name}={str(value)!r}: no such file or folder")
    return p


def writable_dir(name: str, value: Any) -> Path:
    """A folder that exists and is writable, or can be created (its nearest existing parent is
    a writable folder). Nothing is created."""
    p = Path(path_string(name, value)).expanduser().absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise SettingsError(f"{name}={str(value)!r}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise SettingsError(f"{name}={str(value)!r}: {probe} is not writable")
    return p


# Files that mark a folder as something other than a run directory: a training run must not
# write its checkpoints and logs among them (nor a later command mistake the mix for either).
FOREIGN_MARKERS = {
    "preferences.json": "a preferences folder (make-preferences)",
    "train.parquet": "a dataset folder",
    "eval.parquet": "a dataset folder",
    "sweep.json": "a sweep directory",
    "report.json": "a quickstart output folder",
    "tokenizer.json": "a task or Hugging Face model folder",
    "config.json": "a Hugging Face model folder",
    "model.safetensors": "a Hugging Face model folder",
    "model.safetensors.index.json": "a Hugging Face model folder",
}


def run_dir(name: str, value: Any) -> Path:
    """A run directory: writable (or creatable), and not a folder that holds something else
    (preferences, a sweep, a Hugging Face model, ...). Nothing is created."""
    p = writable_dir(name, value)
    if p.is_dir():
        for marker, what in FOREIGN_MARKERS.items():
            if (p / marker).exists():
                raise SettingsError(
                    f"{name}={str(value)!r} is {what} ({marker}), not a run directory: "
                    "choose a new or empty folder"
                )
    return p


# What a run directory holds of its own: an output file given by the user may sit in a run
# directory (e.g. generations beside the policy), but never overwrite one of these.
RUN_ARTIFACTS = frozenset({
    "model.json", "config.gin", "metrics.jsonl", "summary.json", "samples.jsonl", "point.json",
    "bindings.gin", "sweep.log", "reward_norm.json", "gold_eval.json", "source.json",
    "checkpoints", "checkpoints.bad", "tb", ".lock",
})  # fmt: skip


def _run_artifact(p: Path) -> tuple[Path, str] | None:
    """(run directory, artifact) when `p` is, or is inside, a file of a run directory."""
    for parent in p.parents:
        if (parent / "model.json").is_file():
            first = p.relative_to(parent).parts[0]
            return (parent, first) if first in RUN_ARTIFACTS else None
    return None


def writable_file(name: str, value: Any) -> Path:
    """A file path that can be written: not a folder, its folder writable or creatable, and not
    a file a run directory keeps (its metrics, summary, checkpoints, ...)."""
    p = Path(path_string(name, value)).expanduser().absolute()
    if p.is_dir():
        raise SettingsError(f"{name}={str(value)!r} is a folder; it must be a file path")
    hit = _run_artifact(p)
    if hit is not None:
        raise SettingsError(
            f"{name}={str(value)!r} would overwrite {hit[1]} of the run directory {hit[0]}; "
            "choose another file name"
        )
    writable_dir(name, p.parent)
    if p.exists() and not os.access(p, os.W_OK):
        raise SettingsError(f"{name}={str(value)!r} is not writable")
    return p


def lengths(
    buckets: Any,
    max_len: Any = None,
    max_prompt_len: Any = None,
    on_long_prompt: Any = "truncate",
    *,
    prefix: str = "",
) -> None:
    """The length settings of a tokenised dataset, checked before any data is read.

    Args:
      buckets: the padded lengths: a non-empty, strictly increasing sequence of positive ints.
      max_len: None (the largest bucket) or a positive int no larger than the largest bucket.
      max_prompt_len: None or a positive int below the effective max_len.
      on_long_prompt: "truncate" or "drop".
      prefix: prepended to the setting names in messages (e.g. "reward_preference_data.").
    """
    name = f"{prefix}buckets"
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, (list, tuple)) or not buckets:
        raise SettingsError(
            f"{name}={buckets!r} must be a non-empty tuple of padded lengths, e.g. (64, 128)"
        )
    if not all(_is_int(b) and b >= 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise SettingsError(
            f"{name}={tuple(buckets)!r} must be strictly increasing positive integers"
        )
    optional_positive_int(f"{prefix}max_len", max_len)
    if max_len is not None and max_len > buckets[-1]:
        raise SettingsError(
            f"{prefix}max_len={max_len} exceeds the largest bucket {buckets[-1]} ({name})"
        )
    optional_positive_int(f"{prefix}max_prompt_len", max_prompt_len)
    top = buckets[-1] if max_len is None else max_len
    if max_prompt_len is not None and max_prompt_len >= top:
        raise SettingsError(
            f"{prefix}max_prompt_len={max_prompt_len} must be < max_len={top} so that at least "
            "one completion token fits"
        )
    choice(f"{prefix}on_long_prompt", on_long_prompt, ("truncate", "drop"))


_HOST_PORT = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:(\d{1,5})$")


def distributed(
    coordinator_address: str | None, num_processes: Any, process_id: Any
) -> tuple[str | None, int | None, int | None]:
    """The multi-host settings (flags or RLHF_JAX_* variables), checked for shape and range.

    Returns:
      (coordinator_address, num_processes, process_id), with the environment's values filled
      in and parsed.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("RLHF_JAX_COORDINATOR") or None
    parsed = []
    for value, var in (
        (num_processes, "RLHF_JAX_NUM_PROCESSES"),
        (process_id, "RLHF_JAX_PROCESS_ID"),
    ):
        if value is None and env.get(var):
            try:
                value = int(env[var])
            except ValueError:
                raise SettingsError(f"{var}={env[var]!r} must be an integer") from None
        parsed.append(value)
    num_processes, process_id = parsed
    if coordinator_address is None and num_processes is None and process_id is None:
        return None, None, None
    if coordinator_address is not None:
        m = _HOST_PORT.match(coordinator_address)
        if not m or not 0 < int(m.group(1)) < 65536:
            raise SettingsError(
                f"coordinator_address={coordinator_address!r} must be HOST:PORT (port 1-65535)"
            )
    if coordinator_address is None or num_processes is None or process_id is None:
        raise SettingsError(
            "multi-host runs need all of --coordinator_address, --num_processes and "
            "--process_id (or the RLHF_JAX_* variables)"
        )
    positive_int("num_processes", num_processes)
    if not _is_int(process_id) or not 0 <= process_id < num_processes:
        raise SettingsError(
            f"process_id={process_id!r} must be an integer in [0, num_processes={num_processes})"
        )
    return coordinator_address, int(num_processes), int(process_id)
