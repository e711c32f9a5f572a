"""The optimiser builder: schedules, clipping, weight-decay mask, trainable mask, gin."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax import commands
from rlhf_jax.models import Transformer, model_config
from rlhf_jax.train.optim import make_optimizer, make_schedule, param_path

CFG = model_config("tiny", vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8)


@pytest.fixture(scope="module")
def params():
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), abstract)


def _paths(tree):
    return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _update(opt, params, grads):
    """The first update (jitted: one compile instead of one per eager op)."""
    fn = jax.jit(lambda g, p: opt.tx.update(g, opt.tx.init(p), p)[0])
    return _paths(fn(grads, params))


def test_schedules():
    const = make_schedule("constant", 1.0, 0, None, 0.1)
    assert float(const(0)) == float(const(1000)) == 1.0
    warm = make_schedule("constant", 1.0, 10, None, 0.1)
    assert float(warm(0)) == 0.0 and float(warm(5)) == pytest.approx(0.5) and float(warm(20)) == 1
    cos = make_schedule("warmup_cosine", 2.0, 10, 110, 0.1)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(2.0)
    assert float(cos(60)) == pytest.approx(0.2 + 1.8 * 0.5, rel=1e-5)  # half-way down
    assert float(cos(110)) == pytest.approx(0.2, rel=1e-5)
    lin = make_schedule("warmup_linear", 1.0, 0, 100, 0.0)
    assert float(lin(0)) == 1.0 and float(lin(50)) == pytest.approx(0.5) and float(lin(100)) == 0
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule("warmup_cosine", 1.0, 0, None, 0.1)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("step", 1.0, 0, 10, 0.1)


def test_clipping_bounds_the_update(params):
    opt = make_optimizer(name="sgd", learning_rate=1.0, schedule="constant", clip_norm=0.5)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 100.0), params)
    updates = _update(opt, params, grads)
    norm = np.sqrt(sum(float((u**2).sum()) for u in updates.values()))
    assert norm == pytest.approx(0.5, rel=1e-4)


def test_weight_decay_mask(params):
    zero = jax.tree.map(jnp.zeros_like, params)
    for decay_embeddings in (False, True):
        opt = make_optimizer(
            learning_rate=1.0,
            schedule="constant",
            weight_decay=0.5,
            decay_embeddings=decay_embeddings,
            clip_norm=None,
        )
        updates = _update(opt, params, zero)  # with zero gradients only decay moves params
        values = _paths(params)
        for path, u in updates.items():
            is_bias = path.rsplit("/", 1)[-1] in ("bq", "bk", "bv", "bo", "bi", "bqkv")
            decays = (
                values[path].ndim >= 2
                and not is_bias
                and (decay_embeddings or path not in ("embed", "pos_embed"))
            )
            if decays:
                np.testing.assert_allclose(u, -0.5 * values[path], rtol=1e-6, err_msg=path)
            else:
                assert not np.any(u), path  # biases, norm scales, (embeddings)
    assert {"embed", "pos_embed", "blocks/0/attn/wq", "blocks/0/ln1/scale"} <= set(updates)
    # Attention biases are [heads, head_dim]: rank 2, still not decayed.
    assert values["blocks/0/attn/bq"].ndim == 2 and not np.any(updates["blocks/0/attn/bq"])


def test_trainable_mask_freezes_the_rest(params):
    opt = make_optimizer(
        name="adam",
        learning_rate=1e-2,
        schedule="constant",
        trainable=[r"^blocks/1/"],
        frozen=[r"/bi$"],
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates = _update(opt, params, grads)
    for path, u in updates.items():
        if path.startswith("blocks/1/") and not path.endswith("/bi"):
            assert np.all(u != 0), path
        else:
            assert not np.any(u), path
    # Frozen parameters carry no Adam moments.
    state = jax.eval_shape(opt.tx.init, params)
    n_moment = sum(x.size for x in jax.tree.leaves(state))
    n_trainable = sum(u.size for p, u in updates.items() if np.any(u))
    assert n_moment < 3 * n_trainable


def test_names_and_gin():
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(name="rmsprop")
    assert isinstance(make_optimizer(name="sgd", momentum=0.9).tx, optax.GradientTransformation)
    commands.import_configurables()
    gin.parse_config("make_optimizer.learning_rate = 0.5\nmake_optimizer.schedule = 'constant'")
    assert float(make_optimizer().schedule(3)) == 0.5
