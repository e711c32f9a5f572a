"""SFT step: loss against a plain-NumPy reference, masking, chunked logits, and learning. (The
contract every algorithm keeps, accumulation, one trace, NaN skip, mesh independence, padding
rows, is tested once for all in tests/train/test_algorithm_contract.py.)"""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import partitioning as P
from rlhf_jax.models import model_config
from rlhf_jax.steps.algorithm import HParams, eval_step, train_step
from rlhf_jax.steps.sft import SFTConfig, sft_nll, summarize_eval
from rlhf_jax.steps.state import Frozen
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.stages import model_state_factory
from rlhf_jax.train.synthetic import SyntheticSFTIterator

V, T, B = 48, 16, 8
CFG = model_config("tiny", vocab_size=V, d_model=32, n_layers=1, d_ff=64, max_seq_len=T)


_CACHE: dict = {}


def _setup(mesh_shape=(1, 1, 1), n_devices=1, name="sgd", lr=1.0):
    """(mesh, rules, fresh state); states are cached per setup (tests never donate them)."""
    key = (mesh_shape, n_devices, name, lr)
    if key not in _CACHE:
        mesh = P.make_mesh(mesh_shape, jax.devices()[:n_devices])
        rules = P.logical_rules()
        # SGD without clipping by default: parameter changes are then the gradients themselves,
        # comparable across meshes and accumulation (Adam would amplify rounding noise of
        # near-zero gradients to +-lr).
        optimizer = make_optimizer(name=name, learning_rate=lr, schedule="constant", clip_norm=None)
        factory, _ = model_state_factory(CFG, optimizer, mesh, rules, seed=0)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            _CACHE[key] = (mesh, rules, factory.init())
    return _CACHE[key]


def _batch(seed=0, rows=B):
    it = SyntheticSFTIterator(rows, T, V, seed=seed)
    return next(it)


@functools.cache
def _logits(graphdef):
    return jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["input_ids"], b["attention_mask"]))


def _reference_nll(state, batch):
    """Full-logits log-softmax in NumPy (fp64) over loss_mask targets."""
    logits = np.asarray(_logits(state.policy.graphdef)(state.policy.params, batch), np.float64)
    logits = logits[:, :-1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    tgt = batch["input_ids"][:, 1:]
    picked = np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    mask = batch["loss_mask"][:, 1:].astype(np.float64)
    if "valid" in batch:
        mask = mask * batch["valid"][:, None]
    return -(picked * mask).sum(), mask.sum()


def test_nll_matches_numpy_and_masks_prompt_and_padding():
    mesh, rules, state = _setup()
    batch = _batch()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        nll_fn = jax.jit(sft_nll, static_argnums=(0, 3))
        nll, aux = nll_fn(state.policy.graphdef, state.policy.params, batch, 5)
    ref, count = _reference_nll(state, batch)
    np.testing.assert_allclose(float(nll), ref, rtol=1e-5)
    assert float(aux["tokens"]) == count == batch["loss_mask"][:, 1:].sum()
    # Changing prompt or padding tokens (not targets) must not change the loss... except through
    # context; changing a padding token after EOS changes nothing at all.
    pad_batch = {k: v.copy() for k, v in batch.items()}
    row = int(np.argmin(batch["attention_mask"].sum(1)))
    last = int(batch["attention_mask"][row].sum())
    if last < T:
        pad_batch["input_ids"][row, last:] = 7
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            nll2, _ = nll_fn(state.policy.graphdef, state.policy.params, pad_batch, 5)
        assert float(nll2) == pytest.approx(float(nll), rel=1e-6)


def test_eval_step_respects_valid_rows():
    mesh, rules, state = _setup()
    batch = _batch()
    batch["valid"] = np.array([1, 1, 1, 0, 1, 0, 1, 1], np.int32)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        eval_fn = jax.jit(functools.partial(eval_step, cfg=SFTConfig(1, 4)))
        sums = eval_fn(state, Frozen(), batch, jax.random.key(0), HParams.create())
    ref, count = _reference_nll(state, batch)
    np.testing.assert_allclose(float(sums["nll_sum"]), ref, rtol=1e-5)
    assert float(sums["tokens"]) == count
    assert 0 <= float(sums["correct"]) <= count
    out = summarize_eval(jax.device_get(sums))
    assert out["loss"] == pytest.approx(ref / count, rel=1e-5)


@functools.cache
def _jitted_step(accum: int, chunk: int):
    return jax.jit(functools.partial(train_step, cfg=SFTConfig(accum, chunk)))


def _step(state, batch, mesh, rules, hp=None, accum=1, chunk=8):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        gbatch = P.make_global_batch(batch, mesh)
        return _jitted_step(accum, chunk)(
            state, Frozen(), gbatch, jax.random.key(0), hp or HParams.create()
        )


def _all_shapes(jaxpr, out):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            out.add(tuple(getattr(v.aval, "shape", ())))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _all_shapes(sub, out)
    return out


def test_full_vocab_logits_never_materialised():
    mesh, rules, state = _setup()
    batch = _batch()
    fn = functools.partial(train_step, cfg=SFTConfig(1, 4))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        jaxpr = jax.make_jaxpr(fn)(state, Frozen(), batch, jax.random.key(0), HParams.create())
    shapes = _all_shapes(jaxpr.jaxpr, set())
    assert (B, 4, V) in shapes  # one chunk of logits
    assert not any(len(s) >= 2 and s[-1] == V and T - 1 in s for s in shapes), shapes


def test_loss_decreases_on_learnable_data():
    mesh, rules, state = _setup(name="adamw", lr=1e-2)
    it = SyntheticSFTIterator(B, T, V, seed=1)
    losses = []
    for _ in range(30):
        state, m = _step(state, next(it), mesh, rules)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    assert int(state.step) == 30 and jnp.isfinite(m["grad_norm"])
