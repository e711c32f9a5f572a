"""Tests for the Bradley-Terry reward loss and the calibration error, against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import bradley_terry_loss, expected_calibration_error


def _np_log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def _np_bt(rc, rr, margin, eps, center):
    d = rc - rr - margin
    return -(1 - eps) * _np_log_sigmoid(d) - eps * _np_log_sigmoid(-d) + center * (rc + rr) ** 2


@pytest.mark.parametrize(
    "eps,center,use_margin", [(0.0, 0.0, False), (0.1, 0.0, True), (0.2, 0.01, True)]
)
def test_bradley_terry_matches_numpy(eps, center, use_margin):
    rng = np.random.default_rng(0)
    rc, rr = rng.normal(size=16) * 2, rng.normal(size=16) * 2
    margin = rng.random(16) if use_margin else np.zeros(16)
    loss, metrics = bradley_terry_loss(
        rc,
        rr,
        margin_B=margin if use_margin else None,
        label_smoothing=eps,
        center_coef=center,
    )
    expected = _np_bt(rc, rr, margin, eps, center)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    both = np.concatenate([rc, rr])
    np.testing.assert_allclose(metrics["loss"], expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(rc > rr))
    np.testing.assert_allclose(metrics["margin"], np.mean(rc - rr), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], rc.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/rejected"], rr.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/mean"], both.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/std"], both.std(), rtol=1e-5)


def test_bradley_terry_traced_hparams_compile_once():
    traces = []

    @jax.jit
    def f(rc, rr, eps, center):
        traces.append(1)
        return bradley_terry_loss(rc, rr, label_smoothing=eps, center_coef=center)[0].mean()

    rc, rr = jnp.array([1.0, -0.5]), jnp.array([0.0, 0.5])
    values = [float(f(rc, rr, jnp.float32(e), jnp.float32(c))) for e, c in [(0, 0), (0.1, 0.5)]]
    assert len(traces) == 1
    assert values[0] != values[1]


def test_bradley_terry_gradient_direction():
    g_c, g_r = jax.grad(lambda c, r: bradley_terry_loss(c, r)[0].sum(), argnums=(0, 1))(
        jnp.array([0.3]), jnp.array([0.1])
    )
    assert g_c[0] < 0 < g_r[0]


def _np_ece(p, y, k):
    bins = np.minimum((p * k).astype(int), k - 1)
    total = 0.0
    for b in range(k):
        sel = bins == b
        if sel.any():
            total += sel.mean() * abs(y[sel].mean() - p[sel].mean())
    return total


@pytest.mark.parametrize("k", [5, 10, 15])
def test_expected_calibration_error(k):
    rng = np.random.default_rng(k)
    p = rng.random(500)
    p[:3] = [0.0, 1.0, 0.5]
    y = (rng.random(500) < p**1.5).astype(np.float64)  # miscalibrated on purpose
    np.testing.assert_allclose(
        expected_calibration_error(p, y, num_bins=k), _np_ece(p, y, k), rtol=1e-5, atol=1e-6
    )
    jitted = jax.jit(expected_calibration_error, static_argnames="num_bins")
    np.testing.assert_allclose(jitted(p, y, num_bins=k), _np_ece(p, y, k), rtol=1e-5, atol=1e-6)


def test_ece_perfect_and_worst():
    assert float(expected_calibration_error(np.ones(8), np.ones(8))) == 0.0
    np.testing.assert_allclose(expected_calibration_error(np.ones(8), np.zeros(8)), 1.0)
