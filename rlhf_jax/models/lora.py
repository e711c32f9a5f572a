"""LoRA: low-rank adapters on chosen projections (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv:2106.09685, eq. 3: h = W x + (alpha / r) B A x).

A targeted weight W (any of `attn/wq|wk|wv|wo`, `mlp/wi|wg|wo`; chosen by regexes over the
parameter path, `ModelConfig.lora_targets`) gets two `LoRAParam`s beside it: `<w>_lora_a`
[*in_dims, r] (random) and `<w>_lora_b` [r, *out_dims] (zeros, so a fresh adapter leaves the
model unchanged). The forward adds `scale * (x . A) . B` to the projection's output, so no
merged weight is ever materialised while training.

This module owns the adapter parameters and what is done with them outside the forward:
telling adapters from base weights, switching adapters off (`without_adapters`, the frozen
reference of DPO/PPO without a second copy of the base), merging them into a plain model, and
writing them in PEFT's adapter format.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import re
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.errors import SettingsError
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.param_paths import by_path, param_path

# Parameter paths of adapter matrices (for `make_optimizer.trainable`).
ADAPTER_PATTERN = r"_lora_[ab]$"
# Our projection -> the module name in Hugging Face Llama-family models (PEFT's target names).
HF_MODULES = {
    "attn/wq": "self_attn.q_proj",
    "attn/wk": "self_attn.k_proj",
    "attn/wv": "self_attn.v_proj",
    "attn/wo": "self_attn.o_proj",
    "mlp/wi": "mlp.up_proj",
    "mlp/wg": "mlp.gate_proj",
    "mlp/wo": "mlp.down_proj",
}


class LoRAParam(nnx.Param):
    """An adapter matrix: a `Param` (so it is in `nnx.state(model, nnx.Param)`) of its own type."""


# The rng of the adapter dropout of the forward being traced, and a count of the adapters it
# has reached (each gets its own key). Set by a training step's loss (`with dropout(rng):`), so
# the key derives from the step's rng (a resumed run draws the same masks); unset in eval
# steps and sampling, where there is no dropout.
_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("lora_dropout", default=None)


@contextlib.contextmanager
def dropout(rng: jax.Array):
    """Adapter dropout inside this block of a traced training loss (no-op without adapters or
    with `lora_dropout = 0`)."""
    token = _DROPOUT.set([rng, 0])
    try:
        yield
    finally:
        _DROPOUT.reset(token)


@gin.configurable
def lora_settings(
    rank: int = 0,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] = ("attn/wq$", "attn/wv$"),
) -> dict[str, Any]:
    """The LoRA fields of `ModelConfig` from gin (gin/algorithms/lora.gin); rank 0 = off."""
    return dict(lora_rank=rank, lora_alpha=alpha, lora_dropout=dropout, lora_targets=tuple(targets))


def with_lora(cfg: ModelConfig, settings: dict[str, Any] | None = None) -> ModelConfig:
    """`cfg` with the gin-configured (or given) LoRA settings; unchanged when rank is 0.

    Raises:
      SettingsError: gin sets a rank but not `make_optimizer.trainable` (the base would train
        too, while checkpoints keep only the adapters).
    """
    from_gin = settings is None
    settings = lora_settings() if settings is None else settings
    if not settings.get("lora_rank"):
        return cfg
    if from_gin:
        try:
            trainable = gin.query_parameter("make_optimizer.trainable")
        except ValueError:
            trainable = None
        if not trainable:
            raise SettingsError(
                "LoRA needs make_optimizer.trainable = ['_lora_[ab]$'] so that only the adapters "
                "train (include gin/algorithms/lora.gin)"
            )
    return dataclasses.replace(cfg, **settings)


def check_unsupported(stage: str) -> None:
    """Refuses gin LoRA settings in a stage that does not implement LoRA (a user error: exit
    code 2 and this one message).

    Raises:
      SettingsError: gin sets a LoRA rank.
    """
    if lora_settings().get("lora_rank"):
        raise SettingsError(
            f"LoRA is not supported by {stage} (LoRA covers the SFT and DPO stages); "
            "drop gin/algorithms/lora.gin or set LORA_RANK = 0"
        )


def targeted(cfg: ModelConfig, path: str) -> bool:
    """Whether the projection at `path` (e.g. `blocks/0/attn/wq`) gets an adapter."""
    return bool(cfg.lora_rank) and any(re.search(p, path) for p in cfg.lora_targets)


def add_adapter(module, name: str, path: str, cfg: ModelConfig, rngs: nnx.Rngs, n_in: int) -> None:
    """Adds `<name>_lora_a/_b` beside weight `module.<name>` when `path` is targeted.

    A gets the weight's input axes' logical names (and is initialised like a fan-in scaled
    Gaussian), B its output axes' names (zeros).
    """
    if not targeted(cfg, path):
        return
    w = getattr(module, name)
    shape, names = w.get_value().shape, w.get_metadata().get("out_sharding")
    names = tuple(names) if names is not None else (None,) * len(shape)
    r, fan_in = cfg.lora_rank, math.prod(shape[:n_in])
    a = jax.random.normal(rngs.params(), (*shape[:n_in], r), cfg.pdtype) * fan_in**-0.5
    b = jnp.zeros((r, *shape[n_in:]), cfg.pdtype)
    setattr(module, f"{name}_lora_a", LoRAParam(a, out_sharding=(*names[:n_in], None)))
    setattr(module, f"{name}_lora_b", LoRAParam(b, out_sharding=(None, *names[n_in:])))


def apply(module, name: str, x: jax.Array, y: jax.Array, n_in: int, cfg: ModelConfig):
    """`y + scale * (x . A) . B` for an adapted weight, `y` otherwise (x's last `n_in` axes
    are the weight's input axes)."""
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return y
    dt = x.dtype
    active = _DROPOUT.get()
    if active is not None and cfg.lora_dropout > 0:  # dropout on the adapter's input (PEFT's)
        key = jax.random.fold_in(active[0], active[1])
        active[1] += 1
        keep = jax.random.bernoulli(key, 1.0 - cfg.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(dt)
    h = jnp.tensordot(x, a[...].astype(dt), axes=n_in)
    b = getattr(module, f"{name}_lora_b")[...].astype(dt)
    return y + (cfg.lora_scale * jnp.tensordot(h, b, axes=1)).astype(y.dtype)


def is_adapter(path: str) -> bool:
    return re.search(ADAPTER_PATTERN, path) is not None


def has_adapters(params: Any) -> bool:
    """Whether a parameter state holds adapter matrices."""
    return any(is_adapter(p) for p in by_path(params))


def adapters_only(params: Any) -> Any:
    """The adapter matrices of a parameter state (same tree, other leaves dropped)."""
    return nnx.split_state(params, LoRAParam, ...)[0]


def without_adapters(params: Any) -> Any:
    """The same parameters with every B set to zero: exactly the base model's function, and
    the base weights are the same arrays (no copy). The DPO/PPO reference of a LoRA policy."""

    def off(path, v):
        if isinstance(v, nnx.Variable) and param_path(path).endswith("_lora_b"):
            return v.replace(jnp.zeros_like(v.get_value()))
        return v

    return jax.tree_util.tree_map_with_path(
        off, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def with_fresh_adapters(
    params: Any, cfg: ModelConfig, cls: type, model_kwargs: dict, key: jax.Array, mesh, rules
) -> Any:
    """Base parameters (from a checkpoint without adapters) plus freshly initialised adapters,
    created straight into their shardings (the jitted init returns only the adapters, so XLA
    never materialises a second set of base weights)."""
    from rlhf_jax import partitioning

    if not cfg.lora_rank or has_adapters(params):
        return params

    def create(k):
        return adapters_only(nnx.state(cls(cfg, rngs=nnx.Rngs(k), **model_kwargs), nnx.Param))

    adapters, _ = partitioning.sharded_init(create, key, mesh, rules)
    return nnx.merge_state(params, adapters)
