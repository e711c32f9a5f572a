"""Tests for the DPO-family `preference_loss`: each type against an independent NumPy version.

The NumPy references below are written from the papers' formulas (in float64, with their own
helpers), not by calling into the package.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import PREFERENCE_LOSS_TYPES, REFERENCE_FREE_TYPES, preference_loss

HP = dict(beta=0.3, label_smoothing=0.1, gamma=0.4, tau=0.2, orpo_lambda=0.25, bco_delta=0.05)


def _logsig(z):
    return -np.logaddexp(0.0, -z)


def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def _cdpo(z, eps):
    return -(1 - eps) * _logsig(z) - eps * _logsig(-z)


def _np_loss(t, pc, pr, rc, rr, lc, lr, hp):
    b, eps = hp["beta"], hp["label_smoothing"]
    c, r = pc - rc, pr - rr
    if t == "sigmoid":
        return _cdpo(b * (c - r), eps)
    if t == "robust":
        return ((1 - eps) * -_logsig(b * (c - r)) - eps * -_logsig(-b * (c - r))) / (1 - 2 * eps)
    if t == "hinge":
        return np.maximum(0.0, 1 - b * (c - r))
    if t == "ipo":
        return (c / lc - r / lr - 1 / (2 * b)) ** 2
    if t == "exo_pair":
        # KL between the 2-way softmax of beta * (c, r) and the target (1 - eps, eps).
        q = np.stack([_sig(b * (c - r)), _sig(b * (r - c))])
        target = np.array([1 - eps, eps])[:, None]
        return np.sum(q * (np.log(q) - np.log(target)), axis=0)
    if t == "nca_pair":
        return -_logsig(b * c) - 0.5 * _logsig(-b * c) - 0.5 * _logsig(-b * r)
    if t == "bco_pair":
        delta = hp["bco_delta"]
        return -_logsig(b * c - delta) - _logsig(delta - b * r)
    if t == "sppo_hard":
        return (c - 1 / (2 * b)) ** 2 + (r + 1 / (2 * b)) ** 2
    if t == "aot":
        return _cdpo(b * (np.sort(pc - pr) - np.sort(rc - rr)), eps)
    if t == "aot_unpaired":
        return _cdpo(b * (np.sort(c) - np.sort(r)), eps)
    if t == "apo_zero":
        return 1 - _sig(b * c) + _sig(b * r)
    if t == "apo_down":
        return _sig(b * c) + 1 - _sig(b * (c - r))
    if t == "discopop":
        z = b * (c - r)
        w = _sig(z / hp["tau"])
        return (1 - w) * np.log1p(np.exp(-z)) + w * np.exp(-z)
    if t == "sigmoid_norm":
        return _cdpo(b * (c / lc - r / lr), eps)
    if t == "simpo":
        return _cdpo(b * pc / lc - b * pr / lr - hp["gamma"], eps)
    if t == "orpo":
        p_c, p_r = np.exp(pc / lc), np.exp(pr / lr)
        log_odds_ratio = np.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
        return -pc / lc - hp["orpo_lambda"] * _logsig(log_odds_ratio)
    raise AssertionError(t)


def _inputs(seed, B=16):
    rng = np.random.default_rng(seed)
    lc = rng.integers(3, 40, size=B).astype(np.float64)
    lr = rng.integers(3, 40, size=B).astype(np.float64)
    pc = -lc * rng.uniform(0.2, 2.0, size=B)
    pr = -lr * rng.uniform(0.2, 2.0, size=B)
    rc = pc + rng.normal(size=B) * 3
    rr = pr + rng.normal(size=B) * 3
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
def test_each_type_matches_numpy(loss_type, seed):
    pc, pr, rc, rr, lc, lr = _inputs(seed)
    ref_free = loss_type in REFERENCE_FREE_TYPES
    loss, metrics = preference_loss(
        pc,
        pr,
        None if ref_free else rc,
        None if ref_free else rr,
        loss_type=loss_type,
        chosen_lengths_B=lc,
        rejected_lengths_B=lr,
        **HP,
    )
    expected = _np_loss(loss_type, pc, pr, rc, rr, lc, lr, HP)
    assert loss.shape == pc.shape and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(metrics["loss"], expected.mean(), rtol=2e-5, atol=2e-5)

    b = HP["beta"]
    if ref_free:
        rew_c, rew_r = b * pc / lc, b * pr / lr
        assert "kl/implicit" not in metrics
    else:
        rew_c, rew_r = b * (pc - rc), b * (pr - rr)
        kl = np.mean(np.concatenate([pc - rc, pr - rr]))
        np.testing.assert_allclose(metrics["kl/implicit"], kl, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"], rew_c.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["rewards/rejected"], rew_r.mean(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        metrics["rewards/margins"], (rew_c - rew_r).mean(), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(metrics["rewards/accuracies"], np.mean(rew_c > rew_r))
    np.testing.assert_allclose(metrics["logps/chosen"], pc.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["logps/rejected"], pr.mean(), rtol=1e-5)
    for value in metrics.values():
        assert value.shape == ()


def test_exo_zero_smoothing_uses_default_eps():
    pc, pr, rc, rr, lc, lr = _inputs(3)
    loss, _ = preference_loss(pc, pr, rc, rr, loss_type="exo_pair", beta=0.3)
    hp = dict(HP, beta=0.3, label_smoothing=1e-3)
    np.testing.assert_allclose(
        loss, _np_loss("exo_pair", pc, pr, rc, rr, lc, lr, hp), rtol=2e-5, atol=2e-5
    )


def test_robust_eps_overrides_label_smoothing():
    pc, pr, rc, rr, lc, lr = _inputs(4)
    loss, _ = preference_loss(
        pc, pr, rc, rr, loss_type="robust", beta=0.3, label_smoothing=0.0, robust_eps=0.2
    )
    hp = dict(HP, beta=0.3, label_smoothing=0.2)
    np.testing.assert_allclose(
        loss, _np_loss("robust", pc, pr, rc, rr, lc, lr, hp), rtol=2e-5, atol=2e-5
    )


def test_weighted_sum_of_types():
    pc, pr, rc, rr, lc, lr = _inputs(5)
    loss, metrics = preference_loss(
        pc, pr, rc, rr, loss_type=("sigmoid", "bco_pair"), loss_weights=(0.8, 0.2), **HP
    )
    sig = _np_loss("sigmoid", pc, pr, rc, rr, lc, lr, HP)
    bco = _np_loss("bco_pair", pc, pr, rc, rr, lc, lr, HP)
    np.testing.assert_allclose(loss, 0.8 * sig + 0.2 * bco, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(metrics["loss/sigmoid"], sig.mean(), rtol=2e-5)
    np.testing.assert_allclose(metrics["loss/bco_pair"], bco.mean(), rtol=2e-5)
    # Without weights, components are summed with weight 1.
    unweighted, _ = preference_loss(pc, pr, rc, rr, loss_type=("sigmoid", "bco_pair"), **HP)
    np.testing.assert_allclose(unweighted, sig + bco, rtol=2e-5, atol=2e-5)


def test_mixed_reference_free_and_reference_types():
    pc, pr, rc, rr, lc, lr = _inputs(6)
    loss, metrics = preference_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=("sigmoid", "simpo"),
        chosen_lengths_B=lc,
        rejected_lengths_B=lr,
        **HP,
    )
    expected = sum(_np_loss(t, pc, pr, rc, rr, lc, lr, HP) for t in ("sigmoid", "simpo"))
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=2e-5)
    # A reference is in play, so rewards are the DPO log-ratio rewards.
    np.testing.assert_allclose(
        metrics["rewards/chosen"], np.mean(HP["beta"] * (pc - rc)), rtol=1e-5
    )


def test_rpo_alpha_adds_chosen_nll():
    pc, pr, rc, rr, lc, lr = _inputs(7)
    loss, metrics = preference_loss(
        pc, pr, rc, rr, chosen_lengths_B=lc, rejected_lengths_B=lr, rpo_alpha=0.5, **HP
    )
    expected = _np_loss("sigmoid", pc, pr, rc, rr, lc, lr, HP) + 0.5 * (-pc / lc)
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(metrics["rpo/nll"], np.mean(-pc / lc), rtol=1e-5)


def test_hparams_are_traced_compile_once():
    pc, pr, rc, rr, lc, lr = _inputs(8)
    traces = []

    @jax.jit
    def f(beta, ls, gamma, tau, lam, weights):
        traces.append(1)
        loss, _ = preference_loss(
            pc,
            pr,
            rc,
            rr,
            loss_type=("sigmoid", "exo_pair", "simpo", "discopop", "orpo"),
            loss_weights=weights,
            beta=beta,
            label_smoothing=ls,
            gamma=gamma,
            tau=tau,
            orpo_lambda=lam,
            chosen_lengths_B=lc,
            rejected_lengths_B=lr,
            rpo_alpha=lam,
        )
        return loss.mean()

    weights = jnp.array([0.5, 0.1, 0.2, 0.1, 0.1])
    results = [
        float(f(jnp.float32(b), jnp.float32(0.05), 0.3, 0.1, 0.2, weights))
        for b in (0.05, 0.1, 0.5)
    ]
    assert len(traces) == 1
    assert len(set(results)) == 3
    f(jnp.float32(0.1), jnp.float32(0.0), 0.3, 0.1, 0.2, weights * 2)
    assert len(traces) == 1


def test_vmap_over_beta():
    pc, pr, rc, rr, lc, lr = _inputs(9)
    betas = jnp.array([0.05, 0.1, 0.5])
    losses = jax.vmap(lambda b: preference_loss(pc, pr, rc, rr, beta=b)[0].mean())(betas)
    for b, value in zip(betas, losses, strict=True):
        hp = dict(HP, beta=float(b), label_smoothing=0.0)
        expected = _np_loss("sigmoid", pc, pr, rc, rr, lc, lr, hp).mean()
        np.testing.assert_allclose(value, expected, rtol=2e-5)


def test_dpo_gradient_signs():
    pc, pr, rc, rr, _, _ = _inputs(10)

    def mean_loss(c, r):
        return preference_loss(c, r, rc, rr, loss_type="sigmoid", beta=0.1)[0].mean()

    g_c, g_r = jax.grad(mean_loss, argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
    assert np.all(np.asarray(g_c) < 0)  # raising chosen log-probs lowers the loss
    assert np.all(np.asarray(g_r) > 0)


@pytest.mark.parametrize("loss_type", PREFERENCE_LOSS_TYPES)
def test_gradients_finite(loss_type):
    pc, pr, rc, rr, lc, lr = _inputs(11)

    def mean_loss(c, r):
        refs = (None, None) if loss_type in REFERENCE_FREE_TYPES else (rc, rr)
        loss, _ = preference_loss(
            c, r, *refs, loss_type=loss_type, chosen_lengths_B=lc, rejected_lengths_B=lr, **HP
        )
        return loss.mean()

    grads = jax.grad(mean_loss, argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_orpo_stable_when_avg_logp_is_zero():
    loss, _ = preference_loss(
        jnp.zeros(2),
        jnp.array([-3.0, -4.0]),
        loss_type="orpo",
        chosen_lengths_B=jnp.array([3.0, 4.0]),
        rejected_lengths_B=jnp.array([3.0, 4.0]),
    )
    assert np.all(np.isfinite(loss))


@pytest.mark.parametrize(
    "loss_type", [t for t in PREFERENCE_LOSS_TYPES if t not in ("simpo", "orpo")]
)
def test_missing_reference_raises(loss_type):
    pc, pr, *_ = _inputs(12)
    with pytest.raises(ValueError, match="reference log-probs"):
        preference_loss(
            pc, pr, None, None, loss_type=loss_type, chosen_lengths_B=pc, rejected_lengths_B=pr
        )


def test_argument_errors():
    pc, pr, rc, rr, lc, lr = _inputs(13)
    with pytest.raises(ValueError, match="reference log-probs"):
        preference_loss(pc, pr, None, None, loss_type=("simpo", "sigmoid"))
    with pytest.raises(ValueError, match="or neither"):
        preference_loss(pc, pr, rc, None)
    for t in ("ipo", "sigmoid_norm", "simpo", "orpo"):
        with pytest.raises(ValueError, match="completion length"):
            preference_loss(pc, pr, rc, rr, loss_type=t)
    with pytest.raises(ValueError, match="completion length"):
        preference_loss(pc, pr, rc, rr, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="Unknown preference loss"):
        preference_loss(pc, pr, rc, rr, loss_type="dpo")
    with pytest.raises(ValueError, match="loss_weights"):
        preference_loss(pc, pr, rc, rr, loss_type=("sigmoid", "ipo"), loss_weights=(1.0,))
