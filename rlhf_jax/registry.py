"""The CLI's commands by name: `rlhf-jax COMMAND` parses its gin files with
`commands.parse_gin`, then calls the function of the same name here. Nothing below the CLI
imports this module.
"""

from __future__ import annotations

from rlhf_jax.commands import generate_command, make_preferences_command, train_command
from rlhf_jax.info import info
from rlhf_jax.quickstart import quickstart
from rlhf_jax.train.hf_import import export_command

__all__ = [
    "export_command",
    "generate_command",
    "info",
    "make_preferences_command",
    "quickstart",
    "train_command",
]
