"""Tests for `losses.controllers`: the KL controller, running reward moments and the
running-mean baseline, each against a plain Python/NumPy version, with traced hyperparameters
and states that are pytrees (checkpointable, usable inside `jit`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import (
    KLControllerState,
    RunningMean,
    RunningMoments,
    normalize_with_moments,
    running_mean_update,
    update_kl_controller,
    update_moments,
)


def _np_adaptive(coef, kls, n, target, horizon):
    out = []
    for kl in kls:
        err = min(max(kl / target - 1.0, -0.2), 0.2)
        coef *= 1.0 + err * n / horizon
        out.append(coef)
    return out


def test_adaptive_kl_controller_matches_ziegler():
    kls = [0.5, 3.0, 8.0, 6.2, 5.9, 100.0, 0.0]
    target, horizon, n = 6.0, 10000.0, 256
    update = jax.jit(update_kl_controller, static_argnames="kind")
    state = KLControllerState.create(0.2)
    got = []
    for kl in kls:
        state = update(state, kl, n, kind="adaptive", target=target, horizon=horizon)
        got.append(float(state.coef))
    np.testing.assert_allclose(got, _np_adaptive(0.2, kls, n, target, horizon), rtol=1e-6)
    # Above target the coefficient grows, below it shrinks, and the error is clipped at 0.2.
    assert got[1] < got[0] and got[2] > got[1]
    np.testing.assert_allclose(got[5] / got[4], 1 + 0.2 * n / horizon, rtol=1e-6)


def test_fixed_kl_controller_and_unknown_kind():
    state = KLControllerState.create(0.05)
    out = update_kl_controller(state, 100.0, 64, kind="fixed", target=1.0, horizon=10.0)
    assert float(out.coef) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="KL controller"):
        update_kl_controller(state, 1.0, 64, kind="pid", target=1.0, horizon=10.0)


def test_hyperparameters_traced():
    traces = []

    @jax.jit
    def f(target, horizon, max_error, decay, eps):
        traces.append(1)
        kl = update_kl_controller(
            KLControllerState.create(0.1),
            2.0,
            32,
            kind="adaptive",
            target=target,
            horizon=horizon,
            max_error=max_error,
        )
        baseline = running_mean_update(
            running_mean_update(RunningMean.create(), jnp.ones(2), decay=decay),
            jnp.zeros(2),
            decay=decay,
        )
        moments = update_moments(RunningMoments.create(), jnp.array([0.0, 1.0, 5.0]))
        return kl.coef + baseline.value + normalize_with_moments(moments, 1.0, eps=eps)

    values = [
        (1.0, 100.0, 0.2, 0.9, 1e-8),
        (3.0, 100.0, 0.2, 0.9, 1e-8),
        (1.0, 50.0, 0.2, 0.9, 1e-8),
        (1.0, 100.0, 0.1, 0.9, 1e-8),
        (1.0, 100.0, 0.2, 0.5, 1e-8),
        (1.0, 100.0, 0.2, 0.9, 1.0),
    ]
    results = {float(f(*v)) for v in values}
    assert len(traces) == 1 and len(results) == len(values)


def test_running_moments_match_numpy_over_masked_batches():
    rng = np.random.default_rng(0)
    update = jax.jit(update_moments)
    state = RunningMoments.create()
    seen = []
    for size in (1, 7, 16, 3):
        x = rng.normal(loc=2.0, scale=3.0, size=size)
        mask = rng.random(size) < 0.7
        x_garbage = np.where(mask, x, np.nan)  # padding holds garbage
        state = update(state, jnp.asarray(x_garbage), jnp.asarray(mask))
        seen.extend(x[mask])
        np.testing.assert_allclose(state.count, len(seen))
        np.testing.assert_allclose(state.mean, np.mean(seen), rtol=1e-5)
        if len(seen) > 1:
            np.testing.assert_allclose(state.var, np.var(seen, ddof=1), rtol=1e-4)
    y = rng.normal(size=5)
    np.testing.assert_allclose(
        normalize_with_moments(state, jnp.asarray(y), eps=1e-3),
        (y - np.mean(seen)) / (np.std(seen, ddof=1) + 1e-3),
        rtol=1e-4,
    )
    np.testing.assert_allclose(
        normalize_with_moments(state, jnp.asarray(y), shift_mean=False),
        y / np.std(seen, ddof=1),
        rtol=1e-4,
    )


def test_running_moments_stay_accurate_with_a_large_offset():
    # Chan's merge keeps the variance of values far from 0 in float32, where the sum of
    # squares minus the squared sum would cancel to noise.
    rng = np.random.default_rng(1)
    state = RunningMoments.create()
    seen = []
    for _ in range(20):
        x = 1e4 + rng.normal(size=64)
        state = update_moments(state, jnp.asarray(x, jnp.float32))
        seen.extend(np.float32(x))
    np.testing.assert_allclose(state.std, np.std(seen, ddof=1), rtol=1e-2)


def test_running_moments_start_as_identity_and_ignore_empty_batches():
    state = RunningMoments.create()
    np.testing.assert_allclose(normalize_with_moments(state, jnp.array([1.5])), [1.5], rtol=1e-6)
    state = update_moments(state, jnp.array([1.0, 3.0]))
    same = update_moments(state, jnp.array([5.0, 7.0]), jnp.array([0, 0]))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(a, b)


def test_running_mean_baseline():
    state = RunningMean.create()
    decay = 0.9
    batches = [np.array([1.0, 3.0]), np.array([10.0, 0.0, 2.0]), np.array([-4.0])]
    expected = None
    step = jax.jit(running_mean_update)
    for x in batches:
        state = step(state, jnp.asarray(x), decay=decay)
        expected = x.mean() if expected is None else decay * expected + (1 - decay) * x.mean()
        np.testing.assert_allclose(state.value, expected, rtol=1e-6)
    masked = running_mean_update(state, jnp.array([100.0, 5.0]), decay=0.5, mask=jnp.array([0, 1]))
    np.testing.assert_allclose(masked.value, 0.5 * expected + 0.5 * 5.0, rtol=1e-6)
    empty = running_mean_update(state, jnp.array([100.0]), decay=0.5, mask=jnp.array([0]))
    np.testing.assert_allclose(empty.value, state.value)
    # A fresh state is not moved by an empty batch either.
    assert not bool(
        running_mean_update(
            RunningMean.create(), jnp.zeros(1), decay=0.5, mask=jnp.zeros(1)
        ).initialised
    )
