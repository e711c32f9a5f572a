"""`rlhf-jax info`: build the configured model on the configured mesh and describe it."""

from __future__ import annotations

import gin
import jax
import numpy as np
from flax import nnx

from rlhf_jax import partitioning
from rlhf_jax.models import ModelConfig, Transformer, model_config


def create_params(cfg: ModelConfig, mesh, rules, seed: int = 0):
    """(graphdef, params, shardings) of a Transformer initialised directly into its shardings."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    def create(key):
        return nnx.state(Transformer(cfg, rngs=nnx.Rngs(key)), nnx.Param)

    params, shardings = partitioning.sharded_init(create, jax.random.key(seed), mesh, rules)
    return graphdef, params, shardings


def describe(params, cfg: ModelConfig, mesh, seq_len: int | None = None) -> str:
    """A human-readable table: totals, FLOPs/token, and each parameter's shape and spec."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = int(sum(np.prod(x.shape) for _, x in leaves))
    t = seq_len or cfg.max_seq_len
    lines = [
        f"model: {cfg.family}-style, d_model={cfg.d_model}, layers={cfg.n_layers}, "
        f"heads={cfg.n_heads} (kv {cfg.num_kv_heads}), d_ff={cfg.d_ff}, vocab={cfg.vocab_size}",
        f"mesh: {dict(mesh.shape)} on {mesh.devices.size} {jax.default_backend()} device(s)",
        f"parameters: {total:,} ({total / 1e6:.2f} M)",
        f"training FLOPs per token (seq_len={t}): {cfg.flops_per_token(t):.4g}",
        "parameter shardings:",
    ]
    for path, x in leaves:
        keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        name = "/".join(k for k in keys if k not in (".value", "value"))
        spec = x.sharding.spec if hasattr(x.sharding, "spec") else x.sharding
        lines.append(f"  {name:<40} {str(tuple(x.shape)):<20} {spec}")
    return "\n".join(lines)


@gin.configurable
def info(seq_len: int | None = None, seed: int = 0) -> str:
    """Builds `model_config()` on `make_mesh()` and prints `describe(...)`; returns the text."""
    cfg = model_config()
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_rules()
    _, params, _ = create_params(cfg, mesh, rules, seed)
    text = describe(params, cfg, mesh, seq_len)
    print(text)
    return text
