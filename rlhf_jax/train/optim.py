"""The optimiser builder: optax transformation plus learning-rate schedule, configured by gin.

`make_optimizer(...)` returns an `Optimizer` (the optax `GradientTransformation` and the
schedule it follows). It owns:

- the update rule (AdamW, Adam, SGD), global-norm clipping and the learning-rate schedule
  (constant, warmup + cosine, warmup + linear);
- the weight-decay mask: by default only matrices decay; vectors (biases, norm scales) never do,
  and embedding tables only with `decay_embeddings=True`;
- the trainable-parameter mask: regexes over parameter paths such as `blocks/0/attn/wq`; frozen
  parameters get exactly zero updates through `optax.multi_transform` + `optax.set_to_zero`, and
  their optimiser state is empty.

Gradient accumulation is not here: it happens inside the step (`steps.common`), so that one
optimiser update sees the exact gradient of the whole batch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import optax

from rlhf_jax.errors import SettingsError
from rlhf_jax.models.param_paths import param_path

SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")
OPTIMIZERS = ("adamw", "adam", "sgd")
# Parameter paths that are embedding tables (their weight decay is opt-in).
EMBEDDING_PATTERN = r"(^|/)(embed|pos_embed)$"
# Bias vectors, whatever their rank (attention biases are [heads, head_dim]): never decayed.
BIAS_PATTERN = r"(^|/)(b[a-z]*|head_b)$"


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
    """An optax transformation and the learning-rate schedule it applies.

    Compared by identity: it is a static field of the train state, so one instance must be kept
    for the whole run (jit reuses its compiled step only while the static fields are equal).
    """

    tx: optax.GradientTransformation
    schedule: optax.Schedule


def path_mask(params: Any, predicate: Callable[[str, jax.Array], bool]) -> Any:
    """A pytree of bools shaped like `params`: `predicate(path_string, leaf)` per leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, x: predicate(param_path(p), x), params)


def decay_mask_fn(decay_embeddings: bool = False) -> Callable[[Any], Any]:
    """Mask function for optax's weight decay: weight matrices only (not biases, whatever
    their rank, nor norm scales), embeddings optional."""
    emb, bias = re.compile(EMBEDDING_PATTERN), re.compile(BIAS_PATTERN)

    def decays(path: str, x: jax.Array) -> bool:
        if x.ndim < 2 or bias.search(path):
            return False
        return decay_embeddings or not emb.search(path)

    return lambda params: path_mask(params, decays)


def trainable_fn(
    trainable: Sequence[str] | None, frozen: Sequence[str] | None
) -> Callable[[str], bool]:
    """`path -> bool`: trainable if it matches any `trainable` regex (all when None) and no
    `frozen` regex (`re.search` semantics)."""
    keep = [re.compile(p) for p in trainable or ()]
    drop = [re.compile(p) for p in frozen or ()]

    def is_trainable(path: str) -> bool:
        if keep and not any(r.search(path) for r in keep):
            return False
        return not any(r.search(path) for r in drop)

    return is_trainable


def make_schedule(
    kind: str, peak_lr: float, warmup_steps: int, total_steps: int | None, final_lr_ratio: float
) -> optax.Schedule:
    """The learning-rate schedule `step -> lr` (a traced step gives a traced lr)."""
    if kind not in SCHEDULES:
        raise SettingsError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    if kind == "constant":
        if warmup_steps:
            return optax.linear_schedule(0.0, peak_lr, warmup_steps)
        return optax.constant_schedule(peak_lr)
    if not total_steps:
        raise SettingsError(
            f"schedule {kind!r} needs total_steps (bind make_optimizer.total_steps)"
        )
    decay_steps = max(total_steps - warmup_steps, 1)
    end = peak_lr * final_lr_ratio
    if kind == "warmup_cosine":
        decay = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=final_lr_ratio)
    else:
        decay = optax.linear_schedule(peak_lr, end, decay_steps)
    if not warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, peak_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


@gin.configurable
def make_optimizer(
    name: str = "adamw",
    learning_rate: float = 3e-4,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_lr_ratio: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_embeddings: bool = False,
    momentum: float = 0.0,
    clip_norm: float | None = 1.0,
    trainable: Sequence[str] | None = None,
    frozen: Sequence[str] | None = None,
) -> Optimizer:
    """Builds the optimiser (gin: `make_optimizer.learning_rate = 1e-3`, ...).

    Args:
      name: "adamw", "adam" or "sgd" (`momentum` applies to sgd).
      learning_rate: peak learning rate.
      schedule: "constant", "warmup_cosine" or "warmup_linear" (the last two decay to
        `final_lr_ratio * learning_rate` at `total_steps`).
      warmup_steps: linear warm-up from 0 (all schedules).
      total_steps: length of the decay; stages pass their step count when this is None.
      weight_decay: decoupled weight decay (adamw); masked by `decay_mask_fn`.
      decay_embeddings: also decay the embedding tables.
      clip_norm: global-norm clipping of the trainable gradients (None: off).
      trainable: regexes of parameter paths to train (None: all).
      frozen: regexes of parameter paths to freeze (applied after `trainable`).

    Returns:
      An `Optimizer`.
    """
    if name not in OPTIMIZERS:
        raise SettingsError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    lr = make_schedule(schedule, learning_rate, warmup_steps, total_steps, final_lr_ratio)
    if name == "adamw":
        mask = decay_mask_fn(decay_embeddings)
        core = optax.adamw(lr, b1, b2, eps, weight_decay=weight_decay, mask=mask)
    elif name == "adam":
        core = optax.adam(lr, b1, b2, eps)
    else:
        core = optax.sgd(lr, momentum=momentum or None)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    tx = optax.chain(*parts, core)
    if trainable is not None or frozen:
        is_trainable = trainable_fn(trainable, frozen)

        def labels(params):
            return jax.tree_util.tree_map_with_path(
                lambda p, _: "train" if is_trainable(param_path(p)) else "frozen", params
            )

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return Optimizer(tx=tx, schedule=lr)
