"""Imports every module that registers gin configurables and exposes the CLI's commands.

gin can only resolve `@name` references to configurables that were imported; this module is
the one list of them, so that every gin file parses whichever command runs.
"""

from __future__ import annotations

from collections.abc import Callable

import gin

from rlhf_jax import cli, commands, partitioning  # noqa: F401
from rlhf_jax.commands import generate_command, make_preferences_command  # noqa: F401
from rlhf_jax.info import info  # noqa: F401
from rlhf_jax.models import config  # noqa: F401
from rlhf_jax.quickstart import quickstart  # noqa: F401
from rlhf_jax.train import (  # noqa: F401
    dpo,  # noqa: F401
    hf_import,
    loop,
    optim,
    reward,
    sft,
)
from rlhf_jax.train.hf_import import export_command  # noqa: F401


# Defined here rather than in cli.py: under `python -m rlhf_jax.cli` that module is __main__ as
# well as rlhf_jax.cli, and gin would see two configurables named `train`.
@gin.configurable("train")
def train_entry(stage: Callable[[], object] = gin.REQUIRED):
    """Runs the configured stage (`train.stage = @sft_stage` and so on)."""
    return stage()
