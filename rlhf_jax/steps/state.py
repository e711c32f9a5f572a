"""Train-state pytrees shared by every stage, and their sharded creation.

`TrainState` holds what a pure step reads and writes: the iteration counter, the trained models
by name (`ModelState`: parameters and optimiser state), a record of non-finite steps and an
`extra` dict for algorithm state such as an adaptive KL coefficient. Models that are only read
(the DPO reference, PPO's reward model) live in `Frozen`, a separate step argument: never
donated, never checkpointed. Each model's graphdef, optax transformation and learning-rate
schedule are static fields: they live in the treedef, so `jit` sees them as compile-time
constants and never traces them. Inside a loss, `state.models["policy"].module(params)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from rlhf_jax import partitioning


@struct.dataclass
class NonFiniteStats:
    """Which steps had a non-finite loss or gradient (their update was not applied).

    Kept in the state so the host can check it only now and then (no per-step sync) and still
    name the exact step, and so the count survives a resume.
    """

    skipped: jax.Array  # int32: number of steps whose update was skipped
    last_step: jax.Array  # int32: the latest such step (-1: none)
    last_kind: jax.Array  # int32 bitmask of the latest: 1 = loss, 2 = gradients

    @classmethod
    def zeros(cls) -> NonFiniteStats:
        return cls(
            skipped=jnp.zeros((), jnp.int32),
            last_step=jnp.full((), -1, jnp.int32),
            last_kind=jnp.zeros((), jnp.int32),
        )

    def record(self, step: jax.Array, loss_ok: jax.Array, grads_ok: jax.Array) -> NonFiniteStats:
        """The stats after `step`, given whether its loss and gradients were finite."""
        bad = ~(loss_ok & grads_ok)
        kind = jnp.where(loss_ok, 0, 1) + jnp.where(grads_ok, 0, 2)
        return NonFiniteStats(
            skipped=self.skipped + bad.astype(jnp.int32),
            last_step=jnp.where(bad, step.astype(jnp.int32), self.last_step),
            last_kind=jnp.where(bad, kind, self.last_kind).astype(jnp.int32),
        )


def describe_nonfinite_kind(kind: int) -> str:
    """Human words for a `NonFiniteStats.last_kind` bitmask."""
    parts = [name for bit, name in ((1, "loss"), (2, "gradients")) if kind & bit]
    return " and ".join(parts) or "nothing"


@struct.dataclass
class ModelState:
    """One trainable model: parameters, optimiser state; graphdef/tx/schedule static."""

    params: nnx.State
    opt_state: optax.OptState
    graphdef: nnx.GraphDef = struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)
    lr_schedule: optax.Schedule | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, *, graphdef: nnx.GraphDef, params: nnx.State, optimizer: Any) -> ModelState:
        """A fresh model; `optimizer` is a `train.optim.Optimizer` (tx + schedule)."""
        return cls(
            params=params,
            opt_state=optimizer.tx.init(params),
            graphdef=graphdef,
            tx=optimizer.tx,
            lr_schedule=optimizer.schedule,
        )

    def module(self, params: nnx.State | None = None) -> nnx.Module:
        """The NNX module for `params` (default: this model's), for use inside a loss."""
        return nnx.merge(self.graphdef, self.params if params is None else params)

    def apply_gradients(self, grads: Any, *, lr_scale: jax.Array, ok: jax.Array) -> ModelState:
        """One optax update scaled by the traced `lr_scale`, kept only where `ok` (a traced
        bool: False leaves parameters and optimiser state bitwise unchanged)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        updates = jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)
        params = optax.apply_updates(self.params, updates)

        def keep_if_ok(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        return self.replace(
            params=keep_if_ok(params, self.params),
            opt_state=keep_if_ok(opt_state, self.opt_state),
        )


def main_model_name(models: dict[str, Any]) -> str:
    """The model whose parameters a run directory publishes (`rundir.load_params`):
    "policy" when there is one, else the only model (a reward-model run's "reward")."""
    if "policy" in models:
        return "policy"
    if len(models) != 1:
        raise ValueError(f"no 'policy' among the models {sorted(models)}: which one is the main?")
    return next(iter(models))


@struct.dataclass
class TrainState:
    """Everything a step updates (and a checkpoint holds).

    Attributes:
      step: int32, iterations done (one optimiser step each for SFT, RM and DPO).
      models: the trained models by name ("policy"; "value" for PPO; "reward" for an RM run).
      nonfinite: the record of skipped updates.
      extra: algorithm state that is checkpointed (KL controller, reward normaliser, ...).
    """

    step: jax.Array
    models: dict[str, ModelState]
    nonfinite: NonFiniteStats
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(
        cls, models: dict[str, ModelState], extra: dict[str, Any] | None = None
    ) -> TrainState:
        """A fresh state at step 0."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            models=dict(models),
            nonfinite=NonFiniteStats.zeros(),
            extra=dict(extra or {}),
        )

    @property
    def main(self) -> str:
        return main_model_name(self.models)

    @property
    def policy(self) -> ModelState:
        """The main model (`main_model_name`)."""
        return self.models[self.main]

    def with_model(self, name: str, model: ModelState) -> TrainState:
        return self.replace(models={**self.models, name: model})


@struct.dataclass
class Frozen:
    """Models that are read but never trained (the reference policy, a reward model): held
    sharded beside the state, passed to steps as their own argument, never donated, never
    checkpointed (a resumed run reloads them from where they came from)."""

    params: dict[str, nnx.State] = dataclasses.field(default_factory=dict)
    graphdefs: dict[str, nnx.GraphDef] = struct.field(pytree_node=False, default_factory=dict)

    def module(self, name: str) -> nnx.Module:
        return nnx.merge(self.graphdefs[name], self.params[name])

    def __contains__(self, name: str) -> bool:
        return name in self.params


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s that carry their target sharding (an orbax restore target)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


@dataclasses.dataclass(frozen=True)
class StateFactory:
    """A state's abstract shape with target shardings, and how to materialise it fresh.

    The loop restores a checkpoint into `abstract` when one exists and calls `init()` otherwise,
    so a resumed run never pays for (or needs memory for) a throw-away initialisation.
    """

    abstract: Any
    init: Callable[[], Any]

    @property
    def shardings(self) -> Any:
        return jax.tree.map(lambda x: x.sharding, self.abstract)


def state_factory(
    create: Callable[[jax.Array], Any], key: jax.Array, mesh: Mesh, rules
) -> StateFactory:
    """Abstract state (via `jax.eval_shape`) plus a sharded initialiser for `create(key)`.

    Args:
      create: builds the whole state (parameters and optimiser state) from a key; parameters
        must carry logical axis names so their shardings follow the rules table.
      key: the init key.
      mesh: the device mesh.
      rules: logical-axis rules.
    """
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        abstract = jax.eval_shape(create, key)
        shardings = partitioning.state_shardings(abstract, mesh, rules)

    def init() -> Any:
        value, _ = partitioning.sharded_init(create, key, mesh, rules)
        return value

    return StateFactory(abstract=abstract_with_shardings(abstract, shardings), init=init)
