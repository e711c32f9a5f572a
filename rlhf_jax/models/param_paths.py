"""Parameter paths: the `blocks/0/attn/wq` names that optimiser masks, LoRA and the Hugging
Face mapping use to address the leaves of a model's `nnx.State`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx


def param_path(path: Sequence[Any]) -> str:
    """`blocks/0/attn/wq` for a pytree key path into an `nnx.State` (the `.value` leaf dropped)."""
    names = []
    for k in path:
        name = getattr(k, "key", getattr(k, "idx", getattr(k, "name", None)))
        if name is None:
            name = str(k)
        names.append(str(name))
    if names and names[-1] == "value":
        names.pop()
    return "/".join(names)


def by_path(state: Any) -> dict[str, nnx.Variable]:
    """The variables of an `nnx.State` by parameter path (`blocks/0/attn/wq` -> variable)."""
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {param_path(p): v for p, v in leaves}
