"""Shared by the test folders (tests/ is on sys.path through tests/conftest.py): a file lock for
fixtures that xdist workers build once and share, and the folder they share it in."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock shared by the xdist workers (one builds, the others wait and reuse)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def xdist_shared_dir(tmp_path_factory, name: str) -> Path:
    """`name` under the session's base temp folder, the same for all xdist workers."""
    root = tmp_path_factory.getbasetemp()
    if root.name.startswith("popen-gw"):
        root = root.parent
    return root / name
