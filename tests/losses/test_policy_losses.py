"""Tests for `losses.policy`: the clipped / GSPO / CISPO policy losses, the value loss, loss
aggregation, entropy and explained variance against plain NumPy versions written from the
papers, plus the gradients that define the methods (CISPO's stop-gradient, the zero-gradient
regions of the clip and the dual clip, GSPO-token against the sequence objective)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSS_TYPES,
    RATIO_LEVELS,
    aggregate_loss,
    check_policy_choices,
    explained_variance,
    kl_loss_per_token,
    masked_entropy,
    policy_loss,
    value_loss,
)

B, T = 6, 5
HP = dict(eps_low=0.15, eps_high=0.28)


def _batch(seed, garbage=np.nan):
    """Log-probs of a rollout under the sampling (old) and current policies, advantages, mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0], lengths[-1] = T, 0
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    old = -rng.uniform(0.1, 3.0, size=(B, T))
    new = old + rng.normal(scale=0.4, size=(B, T))  # ratios well inside and outside the clip
    adv = rng.normal(size=(B, T))
    for x in (old, new, adv):
        x[mask == 0] = garbage
    return new, old, adv, mask


def _np_ratio(new, old, m, level):
    lr = np.where(m > 0, new - old, 0.0)
    if level == "sequence":
        n = np.maximum(m.sum(-1, keepdims=True), 1)
        lr = np.broadcast_to((lr * m).sum(-1, keepdims=True) / n, lr.shape)
    return np.exp(lr)


def _np_policy(new, old, adv, m, loss_type, level, el, eh, c=None):
    r = _np_ratio(new, old, m, level)
    a = np.where(m > 0, adv, 0.0)
    lo, hi = 1 - el, 1 + eh
    if loss_type == "cispo":
        loss = -np.clip(r, lo, hi) * a * np.where(m > 0, new, 0.0)
        clipped = (r < lo) | (r > hi)
        dual = None
    else:
        unclipped, clipped_obj = -a * r, -a * np.clip(r, lo, hi)
        loss = np.maximum(unclipped, clipped_obj)
        clipped = clipped_obj > unclipped
        dual = None
        if c is not None:
            dual = (a < 0) & (loss > -a * c)
            loss = np.where(dual, -a * c, loss)
    tr = np.exp(np.where(m > 0, new - old, 0.0))
    sums = {
        "ppo/clipfrac": (clipped * m).sum(),
        "ppo/approx_kl": ((tr - 1 - np.log(tr)) * m).sum(),
        "ppo/ratio": (r * m).sum(),
        "tokens": m.sum(),
    }
    if dual is not None:
        sums["ppo/dual_clipfrac"] = (dual * m).sum()
    return loss * m, sums


def _j(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


@pytest.mark.parametrize(
    "loss_type,level,dual",
    [(t, lv, None) for t in POLICY_LOSS_TYPES for lv in RATIO_LEVELS]
    + [("ppo", "token", 2.0), ("ppo", "sequence", 1.5)],
)
def test_policy_loss_matches_numpy(loss_type, level, dual):
    new, old, adv, m = _batch(0)
    loss, sums = policy_loss(
        *_j(new, old, adv, m), loss_type=loss_type, ratio_level=level, dual_clip_c=dual, **HP
    )
    ref_loss, ref_sums = _np_policy(new, old, adv, m, loss_type, level, **_hp(), c=dual)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert set(sums) == set(ref_sums)
    for key, value in ref_sums.items():
        np.testing.assert_allclose(sums[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    # The data reaches both sides of the clip, so the fractions are not trivially 0 or 1.
    assert 0 < float(sums["ppo/clipfrac"]) < float(sums["tokens"])


def _hp():
    return dict(el=HP["eps_low"], eh=HP["eps_high"])


def _grad_logps(loss_type, level, new, old, adv, m, **kw):
    def total(lp):
        loss, _ = policy_loss(lp, *_j(old, adv, m), loss_type=loss_type, ratio_level=level, **kw)
        return jnp.sum(loss)

    return np.asarray(jax.grad(total)(jnp.asarray(new, jnp.float32)))


def test_ppo_gradient_is_zero_where_the_clip_is_active():
    new, old, adv, m = _batch(1, garbage=0.0)
    g = _grad_logps("ppo", "token", new, old, adv, m, **HP)
    r = np.exp(new - old)
    lo, hi = 1 - HP["eps_low"], 1 + HP["eps_high"]
    clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
    # d(-A r)/d log pi = -A r where the unclipped term is active; 0 where the clip is.
    np.testing.assert_allclose(g, np.where(clipped, 0.0, -adv * r) * m, rtol=1e-5, atol=1e-6)
    assert clipped[m > 0].any() and (~clipped[m > 0]).any()


def test_dual_clip_caps_negative_advantages_with_zero_gradient():
    old = np.zeros((1, 4))
    new = np.log(np.array([[0.5, 1.1, 4.0, 10.0]]))  # ratios 0.5, 1.1, 4, 10
    adv = np.full((1, 4), -1.0)
    m = np.ones((1, 4))
    loss, sums = policy_loss(*_j(new, old, adv, m), dual_clip_c=3.0, **HP)
    # -A * max(r, clip(r)) = r for r above 1 - eps_low, capped at c = 3 for r > 3.
    np.testing.assert_allclose(loss, [[1 - HP["eps_low"], 1.1, 3.0, 3.0]], rtol=1e-6)
    assert float(sums["ppo/dual_clipfrac"]) == 2
    g = _grad_logps("ppo", "token", new, old, adv, m, dual_clip_c=3.0, **HP)
    np.testing.assert_allclose(g, [[0.0, 1.1, 0.0, 0.0]], rtol=1e-6, atol=1e-7)
    # Without the dual clip the large ratios keep their (unbounded) gradient -A r = r.
    g_plain = _grad_logps("ppo", "token", new, old, adv, m, **HP)
    np.testing.assert_allclose(g_plain, [[0.0, 1.1, 4.0, 10.0]], rtol=1e-5)


def test_cispo_stop_gradient_keeps_every_token():
    new, old, adv, m = _batch(2, garbage=0.0)
    g = _grad_logps("cispo", "token", new, old, adv, m, **HP)
    # sg(clip(r)) is a constant weight: d/d log pi of -w A log pi = -w A, on every token,
    # including those whose ratio is outside the band (PPO gives them zero gradient).
    w = np.clip(np.exp(new - old), 1 - HP["eps_low"], 1 + HP["eps_high"])
    np.testing.assert_allclose(g, -w * adv * m, rtol=1e-5, atol=1e-6)
    assert np.all(g[m > 0] != 0)


def test_gspo_token_form_equals_the_sequence_objective():
    # GSPO (Zheng et al. 2025, Eq. 5): per sequence -min(s A, clip(s) A), s = exp(mean log r),
    # averaged over sequences. Our GSPO-token form with one advantage per row and
    # seq_mean_token_mean aggregation must give the same value and gradient.
    new, old, adv, m = _batch(3, garbage=0.0)
    m = m[:-1]  # drop the empty row: the sequence formula divides by its length
    new, old = new[:-1], old[:-1]
    adv_B = adv[:-1, 0]
    lo, hi = 1 - HP["eps_low"], 1 + HP["eps_high"]

    def ours(lp):
        adv_BT = jnp.asarray(adv_B[:, None] * m, jnp.float32)
        loss, _ = policy_loss(lp, *_j(old), adv_BT, m, ratio_level="sequence", **HP)
        s, d = aggregate_loss(loss, m, mode="seq_mean_token_mean")
        return s / d

    def sequence_objective(lp):
        lr = jnp.sum((lp - old) * m, -1) / jnp.sum(m, -1)
        s = jnp.exp(lr)
        a = jnp.asarray(adv_B, jnp.float32)
        return jnp.mean(jnp.maximum(-a * s, -a * jnp.clip(s, lo, hi)))

    lp = jnp.asarray(new, jnp.float32)
    np.testing.assert_allclose(ours(lp), sequence_objective(lp), rtol=1e-5)
    np.testing.assert_allclose(
        jax.grad(ours)(lp), jax.grad(sequence_objective)(lp) * m, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_numpy(clip):
    rng = np.random.default_rng(4)
    _, _, _, m = _batch(4)
    v, old, ret = (rng.normal(size=(B, T)) for _ in range(3))
    loss, sums = value_loss(*_j(v, old, ret, m), clip_range=clip)
    err = (v - ret) ** 2
    if clip is None:
        ref = 0.5 * err
    else:
        err_c = (old + np.clip(v - old, -clip, clip) - ret) ** 2
        ref = 0.5 * np.maximum(err, err_c)
        np.testing.assert_allclose(sums["value/clipfrac"], ((err_c > err) * m).sum())
        assert 0 < float(sums["value/clipfrac"]) < m.sum()
    np.testing.assert_allclose(loss, ref * m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sums["value/error"], (err * m).sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["tokens"], m.sum())


def test_value_clip_gradient():
    # PPO2 value clipping around V_old = 0 with c = 0.2, target R = 1. V = 0.9 moved past the
    # band towards the target: the clipped error (V at the band's edge) is the larger, active
    # term and the gradient is 0. V = -0.5 moved away: the unclipped error is larger and the
    # gradient is V - R.
    v, old, ret, m = [[0.9, -0.5]], [[0.0, 0.0]], [[1.0, 1.0]], [[1.0, 1.0]]
    grad = jax.grad(lambda x: jnp.sum(value_loss(x, *_j(old, ret, m), clip_range=0.2)[0]))
    np.testing.assert_allclose(grad(jnp.asarray(v, jnp.float32)), [[0.0, -1.5]], rtol=1e-6)


def _np_aggregate(loss, m, mode, max_len):
    loss = np.where(m > 0, loss, 0.0)
    tokens = m.sum(-1)
    rows = (tokens > 0).sum()
    if mode == "token_mean":
        return loss.sum() / tokens.sum()
    if mode == "seq_mean_token_sum":
        return loss.sum(-1)[tokens > 0].mean()
    if mode == "seq_mean_token_mean":
        return (loss.sum(-1)[tokens > 0] / tokens[tokens > 0]).mean()
    return loss.sum() / (rows * max_len)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregation_matches_numpy_and_accumulates_exactly(mode):
    new, _, _, m = _batch(5)
    max_len = 16.0
    s, d = aggregate_loss(jnp.asarray(new), jnp.asarray(m), mode=mode, max_len=max_len)
    np.testing.assert_allclose(s / d, _np_aggregate(new, m, mode, max_len), rtol=1e-5)
    # Micro-batches: summed sums over summed denominators equal the whole batch.
    parts = [
        aggregate_loss(
            jnp.asarray(new[i : i + 2]), jnp.asarray(m[i : i + 2]), mode=mode, max_len=max_len
        )
        for i in range(0, B, 2)
    ]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    np.testing.assert_allclose(total, s / d, rtol=1e-5)


def test_seq_mean_token_sum_norm_defaults_to_mask_width():
    new, _, _, m = _batch(6)
    s, d = aggregate_loss(jnp.asarray(new), jnp.asarray(m), mode="seq_mean_token_sum_norm")
    np.testing.assert_allclose(s / d, _np_aggregate(new, m, "norm", T), rtol=1e-5)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate_loss(jnp.asarray(new), jnp.asarray(m), mode="token-mean")


def test_masked_entropy_matches_numpy():
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=3.0, size=(B, T, 11))
    _, _, _, m = _batch(7)
    for temp in (1.0, 0.6):
        z = logits / temp
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ref = -(p * np.log(p)).sum(-1) * m
        out = masked_entropy(jnp.asarray(logits), jnp.asarray(m), temperature=temp)
        # fp32: log Z - E[logit] cancels where the distribution is nearly one-hot.
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(masked_entropy(jnp.asarray(logits), m, temperature=0.0), 0.0)


def test_explained_variance_matches_numpy():
    rng = np.random.default_rng(8)
    _, _, _, m = _batch(8)
    ret = rng.normal(size=(B, T))
    v = ret + rng.normal(scale=0.5, size=(B, T))
    sel = m > 0
    ref = 1 - np.var((ret - v)[sel]) / np.var(ret[sel])
    np.testing.assert_allclose(explained_variance(*_j(v, ret, m)), ref, rtol=1e-5)
    np.testing.assert_allclose(explained_variance(*_j(ret, ret, m)), 1.0)


@pytest.mark.parametrize("kind", KL_ESTIMATORS)
def test_kl_loss_per_token(kind):
    new, ref, _, m = _batch(9)
    out = kl_loss_per_token(*_j(new, ref), jnp.asarray(m), kind=kind)
    lr = np.where(m > 0, ref - new, 0.0)  # log(ref / pi) of tokens sampled from pi
    expected = {"k1": -lr, "k2": 0.5 * lr**2, "k3": np.expm1(lr) - lr}[kind]
    np.testing.assert_allclose(out, expected * m, rtol=1e-5, atol=1e-6)
    # Differentiable in the policy log-probs (the KL-in-the-loss switch).
    g = jax.grad(lambda lp: jnp.sum(kl_loss_per_token(lp, *_j(ref, m), kind=kind)))(
        jnp.asarray(np.nan_to_num(new), jnp.float32)
    )
    assert np.all(np.asarray(g)[m == 0] == 0) and np.any(np.asarray(g)[m > 0] != 0)


def test_choices_and_errors_name_the_setting():
    for combo in itertools.product(POLICY_LOSS_TYPES, RATIO_LEVELS, LOSS_AGG_MODES, KL_ESTIMATORS):
        check_policy_choices(
            loss_type=combo[0], ratio_level=combo[1], agg_mode=combo[2], kl_estimator=combo[3]
        )
    for kwargs, name in (
        (dict(loss_type="vanilla"), "loss_type"),
        (dict(ratio_level="seq"), "ratio_level"),
        (dict(agg_mode="token-mean"), "agg_mode"),
        (dict(kl_estimator="low_var_kl"), "kl_estimator"),
        (dict(loss_type="cispo", dual_clip=True), "dual clip"),
    ):
        with pytest.raises(ValueError, match=name):
            check_policy_choices(**kwargs)
    new, old, adv, m = _j(*_batch(10, garbage=0.0))
    with pytest.raises(ValueError, match="dual_clip_c"):
        policy_loss(new, old, adv, m, loss_type="cispo", dual_clip_c=3.0)
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(new, old, adv, m, ratio_level="seq")


def test_hyperparameters_are_traced_compile_once():
    new, old, adv, m = _j(*_batch(11, garbage=0.0))
    traces = []

    @jax.jit
    def f(eps_low, eps_high, c, clip_range, max_len, temperature):
        traces.append(1)
        pg, _ = policy_loss(new, old, adv, m, eps_low=eps_low, eps_high=eps_high, dual_clip_c=c)
        vf, _ = value_loss(new, old, adv, m, clip_range=clip_range)
        ent = masked_entropy(jnp.stack([new, old], -1), m, temperature=temperature)
        s, d = aggregate_loss(
            pg + vf - 0.01 * ent, m, mode="seq_mean_token_sum_norm", max_len=max_len
        )
        return s / d

    values = [
        (0.2, 0.2, 3.0, 0.2, 8.0, 1.0),
        (0.1, 0.3, 3.0, 0.2, 8.0, 1.0),
        (0.2, 0.2, 1.5, 0.2, 8.0, 1.0),
        (0.2, 0.2, 3.0, 0.05, 8.0, 1.0),
        (0.2, 0.2, 3.0, 0.2, 16.0, 1.0),
        (0.2, 0.2, 3.0, 0.2, 8.0, 0.5),
    ]
    results = {float(f(*v)) for v in values}
    assert len(traces) == 1
    assert len(results) == len(values)


def test_vmap_over_hyperparameters_matches_separate_calls():
    # A population of runs vmaps over hparams: each lane equals its own call.
    new, old, adv, m = _j(*_batch(12, garbage=0.0))

    def loss(eps_high, c):
        per_token, _ = policy_loss(new, old, adv, m, eps_high=eps_high, dual_clip_c=c)
        s, d = aggregate_loss(per_token, m, mode="token_mean")
        return s / d

    eps, cs = jnp.array([0.1, 0.2, 0.3]), jnp.array([1.5, 2.0, 3.0])
    lanes = jax.vmap(loss)(eps, cs)
    np.testing.assert_allclose(lanes, [loss(e, c) for e, c in zip(eps, cs, strict=True)], rtol=1e-6)
