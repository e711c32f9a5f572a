"""Sharding tests on 8 fake CPU devices: equal numbers across meshes, specs follow the rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from rlhf_jax import partitioning as P
from rlhf_jax.info import create_params
from rlhf_jax.models import Transformer, model_config


def _loss_and_grads(preset, mesh_shape, **overrides):
    cfg = model_config(preset, **overrides)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = P.make_mesh(mesh_shape, devices)
    rules = P.logical_rules()
    graphdef, params, shardings = create_params(cfg, mesh, rules, seed=0)
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(3, cfg.vocab_size, (8, 16)).astype(np.int32),
        "attention_mask": np.ones((8, 16), np.int32),
    }
    batch["attention_mask"][:3, 12:] = 0
    gbatch = P.make_global_batch(batch, mesh)

    def loss_fn(p, b):
        logits = nnx.merge(graphdef, p)(b["input_ids"], b["attention_mask"])
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5] * b["attention_mask"]), logits

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, gbatch)
    return loss, logits, grads, params


@pytest.mark.parametrize(
    "preset,overrides", [("tiny", {}), ("llama-tiny", {}), ("tiny", {"fused_qkv": True})]
)
def test_same_logits_and_grads_on_1_device_and_2x2x2(preset, overrides):
    l1, logits1, g1, _ = _loss_and_grads(preset, (1, 1, 1), **overrides)
    l8, logits8, g8, p8 = _loss_and_grads(preset, (2, 2, 2), **overrides)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    np.testing.assert_allclose(logits1, logits8, atol=2e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
    # The 8-device run really was sharded.
    specs = {x.sharding.spec for x in jax.tree.leaves(p8)}
    assert any("tensor" in str(s) for s in specs) and any("fsdp" in str(s) for s in specs)


def test_every_parameter_spec_follows_rules_table():
    cfg = model_config("llama-tiny")
    mesh = P.make_mesh((2, 2, 2))
    rules = P.logical_rules(overrides=[("mlp", "fsdp"), ("embed", None)])
    _, params, _ = create_params(cfg, mesh, rules)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    names = jax.tree.leaves(
        jax.tree.map(
            lambda v: v.get_metadata()["out_sharding"],
            nnx.state(abstract, nnx.Param),
            is_leaf=lambda v: isinstance(v, nnx.Variable),
        ),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    leaves = jax.tree.leaves(params)
    assert len(names) == len(leaves)
    table = dict(rules)
    for logical, x in zip(names, leaves, strict=True):
        expected = P.fit_spec(P.spec_for(logical, rules), x.shape, mesh)
        assert x.sharding.spec == expected, (logical, x.shape)
        for name, axis in zip(logical, x.sharding.spec, strict=False):
            assert axis in (table[name], None)
    # The override took effect: MLP weights are sharded over fsdp.
    assert P.spec_for(("embed", "mlp"), rules) == PartitionSpec(None, "fsdp")


def test_indivisible_dimension_is_replicated():
    mesh = P.make_mesh((2, 2, 2))
    spec = P.fit_spec(PartitionSpec("tensor", "fsdp"), (50257, 768), mesh)
    assert spec == PartitionSpec(None, "fsdp")


def test_global_batch_not_divisible_names_both_numbers():
    mesh = P.make_mesh((2, 2, 2))
    with pytest.raises(ValueError, match=r"global batch size 6 .* data×fsdp = 2×2 = 4"):
        P.make_global_batch({"x": np.zeros((6, 3), np.int32)}, mesh)


def test_make_mesh_shapes():
    assert dict(P.make_mesh((-1, 2, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="needs 4 devices"):
        P.make_mesh((2, 2, 1), jax.devices()[:2])
    with pytest.raises(ValueError, match="at most one"):
        P.make_mesh((-1, -1, 1))


def test_activation_constraint_is_active_on_cpu():
    mesh = P.make_mesh((2, 2, 2))
    rules = P.logical_rules()
    x = jnp.zeros((8, 4, 16))

    def f(x):
        return P.with_logical_constraint(x * 2, ("batch", "length", "act_heads"))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        text = jax.jit(f).lower(x).as_text()
        y = jax.jit(f)(x)
    assert "sharding_constraint" in text or "@Sharding" in text
    assert y.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")


def test_train_state_with_frozen_parameters_is_placed():
    """A trainable mask leaves optax MaskedNodes in the optimiser state; placement skips them."""
    from rlhf_jax.train.optim import make_optimizer
    from rlhf_jax.train.stages import model_state_factory

    opt = make_optimizer(trainable=[r"^blocks/1/"], total_steps=10)
    mesh = P.make_mesh((2, 2, 2))
    factory, _ = model_state_factory(model_config("tiny"), opt, mesh, P.logical_rules())
    state = factory.init()
    assert state.policy.params["embed"][...].sharding.spec == PartitionSpec("tensor", "fsdp")
    n_opt = len(jax.tree.leaves(state.policy.opt_state))
    n_params = len(jax.tree.leaves(state.policy.params))
    # Adam moments only for the trainable block (plus counters), not for every parameter.
    assert n_opt < 2 * n_params
