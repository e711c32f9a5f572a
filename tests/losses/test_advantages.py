"""Tests for `losses.advantages`: each estimator and reward-shaping function against a plain
NumPy version written from the papers' definitions (float64 loops), on right-padded rows with
garbage (NaN) in the padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import (
    ADVANTAGE_ESTIMATORS,
    clip_rewards,
    compute_advantages,
    discounted_returns,
    ended_with_stop,
    gae,
    group_advantages,
    mask_truncated,
    missing_eos_penalty,
    token_rewards,
)

T = 7


def _rollout(seed, B=8, garbage=np.nan):
    """Rewards, values and a contiguous-prefix mask; lengths include 0 and T."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0], lengths[-1] = T, 0 if B > 2 else 1
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    rewards = rng.normal(size=(B, T))
    values = rng.normal(size=(B, T))
    rewards[mask == 0] = garbage
    values[mask == 0] = garbage
    return rewards, values, mask


def _np_gae(r, v, m, gamma, lam):
    adv = np.zeros(r.shape)
    for i in range(r.shape[0]):
        n = int(m[i].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_v = v[i, t + 1] if t + 1 < n else 0.0
            running = r[i, t] + gamma * next_v - v[i, t] + gamma * lam * running
            adv[i, t] = running
    ret = np.where(m > 0, adv + np.nan_to_num(v), 0.0)
    return adv, ret


def _np_reward_to_go(r, m, gamma):
    out = np.zeros(r.shape)
    for i in range(r.shape[0]):
        running = 0.0
        for t in reversed(range(int(m[i].sum()))):
            running = r[i, t] + gamma * running
            out[i, t] = running
    return out


def _np_group(s, k, estimator, eps=1e-6):
    out = np.zeros(len(s))
    for g in range(0, len(s), k):
        x = s[g : g + k]
        if estimator == "rloo":
            out[g : g + k] = [x[j] - np.mean(np.delete(x, j)) for j in range(k)]
        elif estimator == "grpo":
            out[g : g + k] = (x - x.mean()) / (np.std(x, ddof=1) + eps)
        else:
            out[g : g + k] = x - x.mean()
    return out


def _np_whiten(x, m):
    vals = x[m > 0]
    return np.where(m > 0, (x - vals.mean()) / np.sqrt(np.var(vals, ddof=1) + 1e-8), 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.99, 0.0)])
@pytest.mark.parametrize("garbage", [np.nan, 7.0])
def test_gae_matches_numpy(gamma, lam, garbage):
    # A finite value in the padding would show a bootstrap from V past the last token.
    r, v, m = _rollout(0, garbage=garbage)
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma=gamma, lam=lam)
    ref_adv, ref_ret = _np_gae(r, v, m, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[m == 0] == 0) and np.all(np.isfinite(adv))


def test_gae_lambda_one_is_reward_to_go_minus_value():
    # With lambda = 1 the telescoping sum leaves the Monte-Carlo return minus V(s_t).
    r, v, m = _rollout(1, garbage=0.0)
    adv, ret = gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), gamma=0.9, lam=1.0)
    rtg = _np_reward_to_go(r, m, 0.9)
    np.testing.assert_allclose(adv, (rtg - v) * m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, rtg, rtol=1e-5, atol=1e-5)


def test_discounted_returns_matches_numpy():
    r, _, m = _rollout(2)
    out = discounted_returns(jnp.asarray(r), jnp.asarray(m), gamma=0.8)
    np.testing.assert_allclose(out, _np_reward_to_go(r, m, 0.8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("k", [2, 4])
def test_group_advantages_match_numpy(estimator, k):
    s = np.random.default_rng(3).normal(size=4 * k)
    out = group_advantages(jnp.asarray(s), group_size=k, estimator=estimator)
    np.testing.assert_allclose(out, _np_group(s, k, estimator), rtol=1e-5, atol=1e-5)


def test_group_advantages_zero_std_group_and_eps():
    s = np.array([1.0, 1.0, 1.0, 0.0, 2.0, 4.0])
    out = np.asarray(group_advantages(jnp.asarray(s), group_size=3, estimator="grpo", eps=0.5))
    np.testing.assert_array_equal(out[:3], 0.0)  # identical scores: no signal, no NaN
    np.testing.assert_allclose(out[3:], _np_group(s, 3, "grpo", eps=0.5)[3:], rtol=1e-6)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo"])
def test_group_size_errors(estimator):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(jnp.zeros(4), group_size=1, estimator=estimator)
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(jnp.zeros(4), group_size=3, estimator=estimator)
    with pytest.raises(ValueError, match="Unknown"):
        group_advantages(jnp.zeros(4), group_size=2, estimator="nope")


def _np_estimate(name, r, v, m, baseline, gamma, lam, k):
    r0 = np.where(m > 0, r, 0.0)
    rtg = _np_reward_to_go(r0, m, gamma)
    seq = r0.sum(-1)
    if name == "gae":
        return _np_gae(r0, v, m, gamma, lam)
    if name == "reinforce":
        return rtg, rtg
    if name == "reinforce_pp":
        return _np_whiten(rtg, m), rtg
    if name == "reinforce_pp_baseline":
        return _np_whiten(_np_group(seq, k, "dr_grpo")[:, None] * m, m), rtg
    if name in ("rloo", "grpo", "dr_grpo"):
        return _np_group(seq, k, name)[:, None] * m, rtg
    return (seq - baseline)[:, None] * m, rtg


@pytest.mark.parametrize("name", ADVANTAGE_ESTIMATORS)
def test_compute_advantages_each_estimator(name):
    k = 4
    r, v, m = _rollout(4, B=8)
    baseline = np.random.default_rng(5).normal(size=8)
    adv, ret = compute_advantages(
        jnp.asarray(r),
        jnp.asarray(m),
        estimator=name,
        values_BT=jnp.asarray(v),
        baseline_B=jnp.asarray(baseline),
        gamma=0.95,
        lam=0.9,
        group_size=k,
    )
    ref_adv, ref_ret = _np_estimate(name, r, v, m, baseline, 0.95, 0.9, k)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(adv)[m == 0] == 0)


def test_compute_advantages_missing_inputs():
    r, v, m = _rollout(6)
    with pytest.raises(ValueError, match="values_BT"):
        compute_advantages(jnp.asarray(r), jnp.asarray(m), estimator="gae")
    with pytest.raises(ValueError, match="baseline_B"):
        compute_advantages(jnp.asarray(r), jnp.asarray(m), estimator="remax")
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages(jnp.asarray(r), jnp.asarray(m), estimator="rloo", group_size=1)
    with pytest.raises(ValueError, match="Unknown estimator"):
        compute_advantages(jnp.asarray(r), jnp.asarray(m), estimator="ppo2")


def test_token_rewards_places_score_and_kl():
    _, _, m = _rollout(7)
    rng = np.random.default_rng(8)
    scores, kl = rng.normal(size=m.shape[0]), rng.normal(size=m.shape)
    kl[m == 0] = np.nan
    out = token_rewards(jnp.asarray(scores), jnp.asarray(m), jnp.asarray(kl), kl_coef=0.3)
    ref = np.where(m > 0, -0.3 * np.nan_to_num(kl), 0.0)
    for i, n in enumerate(m.sum(-1).astype(int)):
        if n:
            ref[i, n - 1] += scores[i]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    no_kl = token_rewards(jnp.asarray(scores), jnp.asarray(m))
    np.testing.assert_allclose(np.asarray(no_kl).sum(-1), np.where(m.sum(-1) > 0, scores, 0))


def test_eos_penalty_truncation_mask_and_clipping():
    eos = 3
    tokens = np.array([[5, 6, 3, 0], [5, 6, 7, 8], [4, 0, 0, 0], [9, 3, 0, 0]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    tokens[2, 1] = eos  # an EOS id in the padding must not count
    ended = ended_with_stop(jnp.asarray(tokens), jnp.asarray(mask), (eos, 99))
    np.testing.assert_array_equal(ended, [True, False, False, True])
    scores = np.array([1.0, 2.0, -1.0, 0.5])
    out = missing_eos_penalty(jnp.asarray(scores), ended, 1.5)
    np.testing.assert_allclose(out, scores - 1.5 * np.array([0, 1, 1, 0]))
    masked = mask_truncated(jnp.asarray(mask), ended)
    np.testing.assert_array_equal(masked, mask * np.array([1, 0, 0, 1])[:, None])
    clipped = clip_rewards(jnp.asarray(scores), 0.75)
    np.testing.assert_allclose(clipped, np.clip(scores, -0.75, 0.75))


def test_hyperparameters_are_traced_compile_once():
    r, v, m = _rollout(9, garbage=0.0)
    traces = []

    @jax.jit
    def f(gamma, lam, eps, kl_coef, penalty, clip):
        traces.append(1)
        scores = clip_rewards(missing_eos_penalty(jnp.sum(r, -1), m[:, -1] > 0, penalty), clip)
        rewards = token_rewards(scores, m, jnp.asarray(v), kl_coef)
        out = [
            compute_advantages(
                rewards, m, estimator=e, values_BT=v, gamma=gamma, lam=lam, eps=eps, group_size=2
            )[0]
            for e in ("gae", "grpo", "reinforce_pp")
        ]
        return sum(jnp.sum(jnp.abs(o)) for o in out)

    results = {float(f(g, 0.9, 1e-6, 0.1, 1.0, 5.0)) for g in (0.5, 0.9, 1.0)} | {
        float(f(0.9, 0.9, 1e-6, c, p, cl)) for c, p, cl in ((0.0, 0.0, 1.0), (0.2, 2.0, 0.5))
    }
    assert len(traces) == 1
    assert len(results) == 5
