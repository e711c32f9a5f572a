"""Tests for the k1/k2/k3 KL estimators: formulas, unbiasedness by Monte Carlo, positivity."""

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ops import kl_penalty, sequence_kl


def _np_estimators(logp, ref_logp):
    log_r = ref_logp - logp
    return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r}


def test_formulas_match_numpy():
    rng = np.random.default_rng(0)
    logp = rng.normal(size=(3, 5)) - 2
    ref = logp + rng.normal(size=(3, 5)) * 0.5
    expected = _np_estimators(logp, ref)
    for kind, value in expected.items():
        np.testing.assert_allclose(kl_penalty(logp, ref, kind), value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_k3_unbiased_monte_carlo(seed):
    rng = np.random.default_rng(seed)
    q = rng.dirichlet(np.ones(6))  # policy
    p = rng.dirichlet(np.ones(6))  # reference
    exact = float(np.sum(q * (np.log(q) - np.log(p))))
    n = 400_000
    x = rng.choice(6, size=n, p=q)
    logp, ref = np.log(q)[x], np.log(p)[x]
    for kind in ("k1", "k3"):
        samples = np.asarray(kl_penalty(logp, ref, kind), np.float64)
        stderr = samples.std() / np.sqrt(n)
        assert abs(samples.mean() - exact) < 5 * stderr + 1e-4, (kind, samples.mean(), exact)


def test_k2_k3_nonnegative():
    rng = np.random.default_rng(3)
    logp = rng.normal(size=1000) * 3
    ref = rng.normal(size=1000) * 3
    assert np.all(np.asarray(kl_penalty(logp, ref, "k3")) >= 0)
    assert np.all(np.asarray(kl_penalty(logp, ref, "k2")) >= 0)
    # All three vanish when the distributions agree.
    for kind in ("k1", "k2", "k3"):
        np.testing.assert_allclose(kl_penalty(logp, logp, kind), 0.0, atol=1e-7)


def test_sequence_kl_masks_and_sums():
    logp = jnp.array([[-1.0, -2.0, -3.0]])
    ref = jnp.array([[-1.5, -1.0, 100.0]])  # garbage in the padded slot
    mask = jnp.array([[1, 1, 0]])
    np.testing.assert_allclose(sequence_kl(logp, ref, mask, "k1"), [0.5 - 1.0])
    k3 = np.exp(-0.5) - 1 + 0.5 + np.exp(1.0) - 1 - 1.0
    np.testing.assert_allclose(sequence_kl(logp, ref, mask, "k3"), [k3], rtol=1e-6)


def test_unknown_kind():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(jnp.zeros(2), jnp.zeros(2), "k4")
