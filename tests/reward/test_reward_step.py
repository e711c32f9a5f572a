"""Reward-model step: the objective against a NumPy reference (bootstrap weights, margin, label
smoothing, centering), learning on a repeated batch, bootstrap weights (deterministic per pair,
different per head, Poisson(1); a traced seed: a population over seeds compiles once), a frozen
trunk that stays bitwise unchanged and keeps no optimiser state, and the eval step's gold
metrics. (Accumulation, one trace, NaN skip, mesh independence and padding rows:
tests/train/test_algorithm_contract.py.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rm_helpers import make_pair_batch, tiny_config

from rlhf_jax import partitioning as P
from rlhf_jax.steps.algorithm import HParams, eval_step, train_step
from rlhf_jax.steps.reward import (
    RewardConfig,
    RewardHParams,
    bootstrap_counts,
    pair_hash,
    pair_rewards,
    pair_statistics,
    pair_weights,
    summarize_eval,
)
from rlhf_jax.steps.state import Frozen
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.reward_init import freeze_trunk_updates, reward_state_factory

K = 3
CFG = tiny_config()
# Jitted once per shape: eager op-by-op dispatch would compile every small op separately.
_weights = jax.jit(pair_weights, static_argnums=1)
_hash = jax.jit(pair_hash)
_stats = jax.jit(pair_statistics, static_argnums=4)


def _setup(mesh_shape=(1, 1, 1), n_devices=1, lr=0.1, freeze=False, **opt):
    mesh = P.make_mesh(mesh_shape, jax.devices()[:n_devices])
    rules = P.logical_rules()
    # SGD: Adam's normalisation would turn rounding noise in near-zero gradients into
    # full-size steps, so only a linear update rule compares across partitionings.
    opt = {"name": "sgd", **opt}
    optimizer = make_optimizer(learning_rate=lr, schedule="constant", **opt)
    if freeze:
        optimizer = freeze_trunk_updates(optimizer)
    factory, graphdef = reward_state_factory(CFG, optimizer, mesh, rules, num_heads=K)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = factory.init()
    return mesh, rules, state, factory


def _jit(fn, mesh, rules, counter=None):
    def counted(*args):
        if counter is not None:
            counter.append(1)
        return fn(*args)

    jitted = jax.jit(counted)

    def call(state, batch, rng, hp):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return jitted(
                state, Frozen(), P.make_global_batch(batch, mesh), rng, HParams.create(hp)
            )

    return call


@pytest.fixture(scope="module")
def one_device():
    """A K-head state on one device, its jitted step (with a trace counter) and a jitted
    `forward(params, batch) -> (r_c, r_r)`."""
    mesh, rules, state, _ = _setup()
    traces: list[int] = []
    step = _jit(functools.partial(train_step, cfg=RewardConfig(num_heads=K)), mesh, rules, traces)
    graphdef = state.policy.graphdef
    jitted = jax.jit(lambda params, batch: pair_rewards(nnx.merge(graphdef, params), batch))

    def forward(params, batch):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return tuple(np.asarray(x, np.float64) for x in jitted(params, batch))

    return mesh, rules, state, step, traces, forward


def _np_log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def test_objective_matches_numpy_reference(one_device):
    _, _, state, step, _, forward = one_device
    batch = make_pair_batch(0)
    hp = RewardHParams.create(label_smoothing=0.1, center_coef=0.05, margin_scale=0.5)
    _, metrics = step(state, batch, jax.random.key(0), hp)
    r_c, r_r = forward(state.policy.params, batch)
    w = np.asarray(_weights(batch, RewardConfig(num_heads=K), 0), np.float64)
    d = r_c - r_r - 0.5 * batch["margin"][:, None]
    loss = -0.9 * _np_log_sigmoid(d) - 0.1 * _np_log_sigmoid(-d) + 0.05 * (r_c + r_r) ** 2
    expected = np.mean((loss * w).sum(0) / w.sum(0))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    acc = np.mean(r_c.mean(1) > r_r.mean(1))
    assert float(metrics["accuracy"]) == pytest.approx(acc)
    gold = np.sign(batch["chosen_score"] - batch["rejected_score"])
    agree = np.mean(np.sign(r_c.mean(1) - r_r.mean(1)) == gold)
    assert float(metrics["gold/agreement"]) == pytest.approx(agree)
    p = batch["label_prob"]
    assert float(metrics["gold/ceiling"]) == pytest.approx(np.mean(np.maximum(p, 1 - p)))


def test_loss_decreases_on_repeated_batch(one_device):
    _, _, state, step, traces, _ = one_device
    batch, rng, hp = make_pair_batch(1), jax.random.key(0), RewardHParams.create()
    losses = []
    for _ in range(12):
        state, metrics = step(state, batch, rng, hp)
        losses.append(float(metrics["bt_loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    assert float(metrics["accuracy"]) >= 0.75
    assert np.isfinite(float(metrics["calibration/ece"]))


def test_bootstrap_seed_is_traced(one_device):
    """A population over bootstrap seeds: one trace, different resamples (so losses)."""
    _, _, state, step, traces, _ = one_device
    batch, rng = make_pair_batch(6), jax.random.key(0)
    before = len(traces)
    losses = {float(step(state, batch, rng, RewardHParams.create(bootstrap_seed=s))[1]["loss"])
              for s in (0, 1, 2)}  # fmt: skip
    assert len(traces) - before <= 1 and len(traces) == 1
    assert len(losses) == 3
    w0, w1 = (np.asarray(_weights(batch, RewardConfig(num_heads=K), s)) for s in (0, 1))
    assert not np.array_equal(w0, w1)


def test_bootstrap_weights_deterministic_per_pair_and_differ_across_heads():
    a, b = make_pair_batch(2, rows=8), make_pair_batch(3, rows=8)
    cfg = RewardConfig(num_heads=4)
    w_a = np.asarray(_weights(a, cfg))
    # The same pairs in another order, in another batch, padded to a longer bucket.
    mixed = {}
    for k in a:
        x = np.concatenate([b[k][:4], a[k][::-1]])
        if x.ndim == 2:
            x = np.pad(x, ((0, 0), (0, 9)))
        mixed[k] = x
    w_mixed = np.asarray(_weights(mixed, cfg))
    np.testing.assert_array_equal(w_mixed[4:], w_a[::-1])
    assert not np.array_equal(w_a[:, 0], w_a[:, 1])  # heads see different resamples
    # A different pair (one token changed) and a different seed give different weights.
    other = {k: v.copy() for k, v in a.items()}
    other["rejected_input_ids"][:, 1] += 1
    assert not np.array_equal(np.asarray(_hash(other)), np.asarray(_hash(a)))
    reseeded = np.asarray(_weights(a, cfg, 1))
    assert not np.array_equal(reseeded, w_a)
    # One head, or bootstrap off: plain weights.
    assert np.all(np.asarray(_weights(a, RewardConfig(num_heads=1))) == 1.0)
    assert np.all(np.asarray(_weights(a, RewardConfig(num_heads=4, bootstrap=False))) == 1)


def test_bootstrap_counts_are_poisson_one():
    hashes = jnp.arange(20000, dtype=jnp.uint32) * jnp.uint32(2654435761)
    counts = np.asarray(bootstrap_counts(hashes, 4, seed=0))
    assert counts.shape == (20000, 4)
    assert abs(counts.mean() - 1.0) < 0.02 and abs(counts.var() - 1.0) < 0.04
    assert abs(np.mean(counts == 0) - np.exp(-1)) < 0.01
    np.testing.assert_array_equal(counts, np.asarray(bootstrap_counts(hashes, 4, seed=0)))
    # Heads are independent resamples: counts barely correlate across heads.
    assert abs(np.corrcoef(counts[:, 0], counts[:, 1])[0, 1]) < 0.03


def test_frozen_trunk_stays_bitwise_unchanged_and_keeps_no_optimizer_state(tmp_path):
    mesh, rules, state, factory = _setup(freeze=True, name="adamw", lr=1e-2, weight_decay=0.1)
    before = jax.tree.map(np.asarray, state.policy.params)
    cfg = RewardConfig(num_heads=K, freeze_trunk=True)
    step = _jit(functools.partial(train_step, cfg=cfg), mesh, rules)
    for i in range(3):
        state, metrics = step(state, make_pair_batch(i), jax.random.key(0), RewardHParams.create())
    after = jax.tree.map(np.asarray, state.policy.params)
    jax.tree.map(np.testing.assert_array_equal, before["trunk"], after["trunk"])
    assert not np.array_equal(before["head_w"][...], after["head_w"][...])
    assert float(metrics["grad_norm"]) > 0
    # Through a checkpoint round trip: the optimiser state holds arrays for the heads only.
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    hp = HParams.create(RewardHParams.create())
    assert ckpt.save(3, state, hparams=hp, rng=jax.random.key(0), meta={})
    restored = ckpt.restore(factory.abstract, hp, jax.random.key(0), mesh)
    ckpt.close()
    opt_arrays = [x for x in jax.tree.leaves(restored.state.policy.opt_state) if x.ndim > 0]
    heads = sum(x.size for x in jax.tree.leaves(state.policy.params["head_w"]))
    assert 0 < sum(x.size for x in opt_arrays) <= 2 * heads + 2 * K  # adam's mu, nu: heads only
    jax.tree.map(np.testing.assert_array_equal, after, jax.device_get(restored.state.policy.params))


def test_eval_step_ignores_padding_rows_and_reports_gold(one_device):
    mesh, rules, state, _, _, forward = one_device
    cfg = RewardConfig(num_heads=K)
    batch = make_pair_batch(5)
    batch["valid"][6:] = 0
    garbage = {k: v.copy() for k, v in batch.items()}
    garbage["chosen_input_ids"][6:] = 5
    garbage["chosen_score"][6:] = np.nan
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        ev = jax.jit(functools.partial(eval_step, cfg=cfg))
        hp = HParams.create(RewardHParams.create())
        s1, s2 = (jax.device_get(ev(state, Frozen(), b, jax.random.key(0), hp))
                  for b in (batch, garbage))  # fmt: skip
    r_c, r_r = forward(state.policy.params, batch)
    # Compare leaf by leaf: pytest 9 refuses approx() on nested dicts.
    flat1, tree1 = jax.tree.flatten(s1)
    flat2, tree2 = jax.tree.flatten(s2)
    assert tree1 == tree2
    for a, b in zip(flat1, flat2, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    m = summarize_eval(s1)
    assert m["pairs"] == 6
    diff = (r_c.mean(1) - r_r.mean(1))[:6]
    assert m["accuracy"] == pytest.approx(np.mean(diff > 0))
    gold = (batch["chosen_score"] - batch["rejected_score"])[:6]
    assert m["gold/agreement"] == pytest.approx(np.mean(np.sign(diff) == np.sign(gold)))
    assert m["gold/label_agreement"] == pytest.approx(np.mean(gold > 0))
    both = np.concatenate([r_c[:6], r_r[:6]])
    np.testing.assert_allclose(
        [m[f"rewards/head{k}_mean"] for k in range(K)], both.mean(0), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        [m[f"rewards/head{k}_std"] for k in range(K)], both.std(0), rtol=1e-4, atol=1e-6
    )
    loss = -_np_log_sigmoid(r_c - r_r)[:6].mean()
    assert m["loss"] == pytest.approx(loss, rel=1e-5)


def test_calibration_is_symmetrised():
    """Perfectly calibrated probabilities give ECE ~ 0 once both orientations are binned."""
    rng = np.random.default_rng(0)
    n = 20000
    diff = rng.normal(size=n) * 2
    wins = rng.random(n) < 1 / (1 + np.exp(-diff))  # labels drawn from the model itself
    r_c = np.where(wins, diff, -diff)[:, None].astype(np.float32)  # chosen = the label's winner
    batch = {"valid": np.ones(n, np.int32)}
    sums = _stats(jnp.asarray(r_c), jnp.zeros_like(r_c), jnp.zeros_like(r_c), batch, 10)
    assert summarize_eval(jax.device_get(sums))["calibration/ece"] < 0.02
    overconfident = _stats(jnp.asarray(3 * r_c), jnp.zeros_like(r_c), 0 * r_c, batch, 10)
    assert summarize_eval(jax.device_get(overconfident))["calibration/ece"] > 0.05
