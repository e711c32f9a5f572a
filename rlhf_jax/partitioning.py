"""Sharding: the (data, fsdp, tensor) mesh, the logical-axis rules table, activation constraints,
sharded initialisation, global batches, and multi-host start-up.

Every parameter carries logical axis names (`out_sharding=` metadata on `nnx.Param`). One rules
table maps logical names to mesh axes; gin can replace it. Activations are constrained through
`with_logical_constraint`, which is active whenever a mesh is set (also on CPU, so the 8-fake-device
tests exercise it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from flax.nnx import spmd as nnx_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rlhf_jax.errors import SettingsError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or None = replicated). Parameters: vocab, embed, heads, kv_heads,
# head_dim, mlp, norm, pos. Activations: batch, length, act_embed, act_heads, act_kv_heads,
# act_mlp, act_vocab.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("pos", None),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


@gin.configurable
def logical_rules(overrides: Sequence[tuple[str, Any]] = ()) -> tuple[tuple[str, Any], ...]:
    """The rules table: `DEFAULT_RULES` with `overrides` (pairs) replacing matching names."""
    table = dict(DEFAULT_RULES)
    for name, axis in overrides:
        table[name] = tuple(axis) if isinstance(axis, list) else axis
    return tuple(table.items())


@gin.configurable
def make_mesh(
    shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; one entry of `shape` may be -1 ("the rest")."""
    devices = list(jax.devices() if devices is None else devices)
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    ):
        raise SettingsError(
            f"make_mesh.shape={shape!r} must be 3 integers (data, fsdp, tensor), e.g. (-1, 1, 1)"
        )
    shape = list(shape)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise SettingsError(
            f"make_mesh.shape={tuple(shape)}: each axis is a positive size, and at most one is -1"
        )
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise SettingsError(f"{len(devices)} devices cannot fill mesh {tuple(shape)}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise SettingsError(
            f"mesh {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)} "
            "(set make_mesh.shape / MESH_SHAPE to fit them)"
        )
    dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def spec_for(logical: Sequence[str | None], rules) -> PartitionSpec:
    """PartitionSpec for logical axis names under `rules` (unknown names are replicated)."""
    table = dict(rules)
    out, used = [], set()
    for name in logical:
        axis = table.get(name) if name is not None else None
        axes = axis if isinstance(axis, tuple) else (axis,)
        # A mesh axis may appear once per spec; later duplicates are replicated.
        axes = tuple(a for a in axes if a is not None and a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def with_logical_constraint(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names, active whenever a mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    rules = core_spmd.get_logical_axis_rules() or DEFAULT_RULES
    return jax.lax.with_sharding_constraint(x, spec_for(logical, rules))


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replicates the dimensions that the mesh axes do not divide (e.g. GPT-2's 50257 vocab)."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        out.append(axes if shape[i] % size == 0 else None)
    return PartitionSpec(*out)


def state_shardings(abstract_state: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for an abstract pytree whose `nnx.Variable`s carry `out_sharding` names.

    Dimensions that the assigned mesh axes do not divide are replicated instead; plain arrays
    (optimizer counts, ...) are replicated; Variables that hold no array (optax's `MaskedNode`
    for frozen parameters) are left as they are.
    """

    def one(x):
        if isinstance(x, nnx.Variable):
            value = x.get_value()
            if not hasattr(value, "shape"):
                return x
            with nnx.logical_axis_rules(rules):
                spec = nnx_spmd.get_var_pspec(x)
            return x.replace(NamedSharding(mesh, fit_spec(spec, value.shape, mesh)))
        if hasattr(x, "shape"):
            return NamedSharding(mesh, PartitionSpec())
        return x

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_init(
    create: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh, rules
) -> tuple[Any, Any]:
    """Initialises `create(key)` directly into its target shardings (no full host copy).

    Returns `(value, shardings)`. `create` must return a pytree (e.g. an `nnx.State`).
    """
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
        abstract = jax.eval_shape(create, key)
        shardings = state_shardings(abstract, mesh, rules)
        value = jax.jit(create, out_shardings=shardings)(key)
    return value, shardings


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows over (data, fsdp); other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        raise SettingsError(
            f"global batch size {global_batch} is not divisible by data×fsdp = "
            f"{mesh.shape['data']}×{mesh.shape['fsdp']} = {n}"
        )


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles global `jax.Array`s from each process's slice of the rows.

    Every process passes only its own rows (global batch / process count); arrays with a
    leading row axis are sharded over (data, fsdp). Non-array entries are dropped.
    """
    out = {}
    for name, arr in local_batch.items():
        if not isinstance(arr, np.ndarray) or arr.dtype == object:
            continue
        global_rows = arr.shape[0] * jax.process_count()
        check_batch_divisible(global_rows, mesh)
        sharding = batch_sharding(mesh, arr.ndim)
        out[name] = jax.make_array_from_process_local_data(
            sharding, arr, (global_rows, *arr.shape[1:])
        )
    return out


def to_host(x: Any) -> np.ndarray:
    """A global array as one full NumPy array on every process (an all-gather across
    processes when it is sharded over devices this process cannot address)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def on_process_0(fn: Callable[[], Any], what: str) -> Any:
    """Runs `fn` on process 0 only (e.g. writing files every process has the data for).

    Every process returns only after process 0 has finished, and every process raises if `fn`
    raised there (process 0 with the original error), so no process is left waiting at a later
    collective. A single-process job just calls `fn`. Returns `fn()` on process 0, else None.
    """
    result, error = None, None
    if jax.process_index() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other processes have heard
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(failed) and error is None:
            raise RuntimeError(f"process 0 failed while {what}; see its log")
    if error is not None:
        raise error
    return result


@gin.configurable
def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str = "gloo",
) -> bool:
    """Starts multi-host JAX when asked to; returns True when distributed mode is on.

    Values come from arguments (gin/flags) or the environment: `RLHF_JAX_COORDINATOR`,
    `RLHF_JAX_NUM_PROCESSES`, `RLHF_JAX_PROCESS_ID` (or the cluster environments that
    `jax.distributed.initialize()` detects itself, e.g. SLURM, when `num_processes` is unset).
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("RLHF_JAX_COORDINATOR")
    if num_processes is None and env.get("RLHF_JAX_NUM_PROCESSES"):
        num_processes = int(env["RLHF_JAX_NUM_PROCESSES"])
    if process_id is None and env.get("RLHF_JAX_PROCESS_ID"):
        process_id = int(env["RLHF_JAX_PROCESS_ID"])
    if coordinator_address is None and num_processes is None:
        if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            jax.distributed.initialize()
            return True
        return False
    # Harmless off CPU; must be set before any backend is touched.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
