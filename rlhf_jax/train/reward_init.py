"""How a reward model starts: its trunk from an SFT policy, and a frozen trunk.

- `policy_to_reward_params` maps a policy's `Transformer` params into the `trunk/` of a
  `ScalarModel` (the LM head, if any, is dropped; the scalar heads keep their fresh init), and
  `reward_state_factory` initialises a reward model that way from an SFT run directory;
- `freeze_trunk_updates` gives the trunk no update and no optimiser state.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax.models import ModelConfig, ScalarModel
from rlhf_jax.rundir import load_params
from rlhf_jax.steps.state import ModelState, StateFactory, TrainState
from rlhf_jax.train import stages
from rlhf_jax.train.optim import Optimizer, param_path

log = logging.getLogger(__name__)

TRUNK_PATTERN = r"^trunk/"


def policy_to_reward_params(reward_params: nnx.State, policy_params: nnx.State) -> nnx.State:
    """A reward model's params with its trunk taken from a policy's `Transformer` params.

    Every trunk parameter must exist in the policy with the same shape (it is cast to the
    reward model's dtype); the policy's `lm_head` is dropped; the heads are kept as given.

    Raises:
      ValueError: the trunk and the policy do not match (names or shapes).
    """
    rm, policy = nnx.to_pure_dict(reward_params), nnx.to_pure_dict(policy_params)
    trunk = rm["trunk"]
    missing = sorted(set(trunk) - set(policy))
    unused = sorted(set(policy) - set(trunk) - {"lm_head"})
    if missing or unused:
        raise ValueError(
            f"policy params do not fit the reward trunk: missing {missing}, unexpected {unused}"
        )
    policy_trunk = {k: policy[k] for k in trunk}
    if jax.tree.structure(policy_trunk) != jax.tree.structure(trunk):
        raise ValueError("policy params and reward trunk differ in structure (layers?)")

    def take(path, new, old):
        if new.shape != old.shape:
            raise ValueError(
                f"trunk/{jax.tree_util.keystr(path)}: policy shape {new.shape} "
                f"!= reward model shape {old.shape}"
            )
        return new.astype(old.dtype)

    rm["trunk"] = jax.tree_util.tree_map_with_path(take, policy_trunk, trunk)
    out = jax.tree.map(lambda x: x, reward_params)
    nnx.replace_by_pure_dict(out, rm)
    return out


def reward_state_factory(
    cfg: ModelConfig,
    optimizer: Any,
    mesh: Mesh,
    rules,
    *,
    seed: int = 0,
    num_heads: int = 1,
    init_from: str | None = None,
) -> tuple[StateFactory, nnx.GraphDef]:
    """Abstract + sharded-init `TrainState` of a `ScalarModel`, its trunk optionally taken from
    the policy of the run (or checkpoint) directory `init_from`."""
    kwargs = {"num_heads": num_heads}
    factory, graphdef = stages.model_state_factory(
        cfg, optimizer, mesh, rules, seed=seed, model_class="ScalarModel", model_kwargs=kwargs,
        name="reward",
    )  # fmt: skip
    if init_from is None:
        return factory, graphdef

    def create(key: jax.Array, policy_params: nnx.State) -> TrainState:
        fresh = nnx.state(ScalarModel(cfg, rngs=nnx.Rngs(key), **kwargs), nnx.Param)
        params = policy_to_reward_params(fresh, policy_params)
        model = ModelState.create(graphdef=graphdef, params=params, optimizer=optimizer)
        return TrainState.create({"reward": model})

    def init() -> TrainState:
        policy = load_params(init_from, mesh=mesh, rules=rules)
        log.info("reward trunk from the policy in %s (step %d)", policy.run_dir, policy.step)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            jitted = jax.jit(create, out_shardings=factory.shardings)
            return jitted(jax.random.key(seed), policy.params)

    return dataclasses.replace(factory, init=init), graphdef


def freeze_trunk_updates(optimizer: Optimizer) -> Optimizer:
    """The optimiser with exactly zero updates and no optimiser state for every `trunk/`
    parameter (`optax.multi_transform` + `set_to_zero`, as `make_optimizer(frozen=...)` does),
    so the trunk stays bitwise unchanged, weight decay included. The step's `freeze_trunk`
    also stops the gradient at the trunk, which saves the trunk's backward pass.
    """

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if re.search(TRUNK_PATTERN, param_path(p)) else "train", params
        )

    tx = optax.multi_transform({"train": optimizer.tx, "frozen": optax.set_to_zero()}, labels)
    return Optimizer(tx=tx, schedule=optimizer.schedule)
