"""Imports every module that registers gin configurables and exposes the CLI's commands.

gin can only resolve `@name` references to configurables that were imported; this module is
the one list of them, so that every gin file parses whichever command runs.
"""

from __future__ import annotations

from rlhf_jax import cli, partitioning  # noqa: F401
from rlhf_jax.info import info  # noqa: F401
from rlhf_jax.models import config  # noqa: F401
