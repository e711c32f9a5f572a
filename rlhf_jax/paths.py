"""Where the project keeps files that belong to no run directory.

Shared caches (the DPO reference log-probs, ...) live under one cache folder:
`$RLHF_JAX_CACHE` when set, else `~/.cache/rlhf_jax`. Nothing else is written outside the
folders a command is given.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RLHF_JAX_CACHE"


def cache_root() -> Path:
    """The shared cache folder (`$RLHF_JAX_CACHE`, default `~/.cache/rlhf_jax`)."""
    value = os.environ.get(CACHE_ENV)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "rlhf_jax"


def cache_dir(name: str) -> Path:
    """One cache's folder under `cache_root()` (not created here)."""
    return cache_root() / name
