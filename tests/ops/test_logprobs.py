"""Tests for rlhf_jax.ops.logprobs against plain NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ops import (
    chunked_token_logprobs,
    completion_logprobs,
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
    token_logprobs,
)


def _np_log_softmax(logits):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_masked_sum_mean_var(rng):
    x = rng.normal(size=(4, 7)).astype(np.float32)
    mask = (rng.random((4, 7)) > 0.3).astype(np.float32)
    mask[0] = 0.0  # an empty row
    sel = x[mask > 0].astype(np.float64)
    np.testing.assert_allclose(masked_sum(x, mask), sel.sum(), rtol=1e-5)
    np.testing.assert_allclose(masked_mean(x, mask), sel.mean(), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x, mask), sel.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x, mask, unbiased=False), sel.var(), rtol=1e-5)
    row_means = masked_mean(x, mask, axis=1)
    assert row_means[0] == 0.0  # empty row: 0, not NaN
    for i in range(1, 4):
        np.testing.assert_allclose(row_means[i], x[i][mask[i] > 0].mean(), rtol=1e-5)


def test_masked_sum_ignores_garbage_in_padding():
    x = jnp.array([1.0, 2.0, jnp.inf, jnp.nan])
    mask = jnp.array([1, 1, 0, 0])
    assert masked_sum(x, mask) == 3.0
    assert masked_mean(x, mask) == 1.5
    grad = jax.grad(lambda v: masked_mean(v, mask))(x)
    np.testing.assert_array_equal(grad, [0.5, 0.5, 0.0, 0.0])


def test_masked_whiten(rng):
    x = (rng.normal(size=(3, 9)) * 4 + 2).astype(np.float32)
    mask = (rng.random((3, 9)) > 0.4).astype(np.float32)
    w = np.asarray(masked_whiten(x, mask))
    sel = w[mask > 0]
    np.testing.assert_allclose(sel.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(sel.std(ddof=1), 1.0, rtol=1e-4)
    assert np.all(w[mask == 0] == 0)
    w2 = np.asarray(masked_whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(w2[mask > 0].mean(), x[mask > 0].mean(), rtol=1e-4)


def test_token_logprobs_fp32_and_matches_numpy(rng):
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 5))
    out = token_logprobs(jnp.asarray(logits, jnp.bfloat16), targets)
    assert out.dtype == jnp.float32
    ref = np.take_along_axis(_np_log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(logits, targets), ref, rtol=1e-5, atol=1e-5)


def test_entropy_from_logits(rng):
    logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    logp = _np_log_softmax(logits)
    ref = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(entropy_from_logits(logits), ref, rtol=1e-5)


def test_sequence_logprobs():
    logps = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = jnp.array([[0, 1, 1], [1, 1, 0]])
    total, count = sequence_logprobs(logps, mask)
    np.testing.assert_allclose(total, [-5.0, -1.0])
    np.testing.assert_allclose(count, [2.0, 2.0])


@pytest.mark.parametrize("T,chunk", [(12, 4), (13, 5), (7, 16)])
def test_chunked_matches_unchunked(rng, T, chunk):
    B, D, V = 2, 8, 17
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, size=(B, T)))

    def full(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w)
        return token_logprobs(logits, targets), entropy_from_logits(logits)

    def chunked(h, w):
        return chunked_token_logprobs(
            h, lambda hc: jnp.einsum("bcd,dv->bcv", hc, w), targets, chunk, return_entropy=True
        )

    lp_full, ent_full = full(hidden, W)
    lp_chunk, ent_chunk = jax.jit(chunked)(hidden, W)
    assert lp_chunk.shape == (B, T)
    np.testing.assert_allclose(lp_chunk, lp_full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ent_chunk, ent_full, rtol=1e-5, atol=1e-5)
    only_logps = chunked_token_logprobs(hidden, lambda hc: hc @ W, targets, chunk)
    np.testing.assert_allclose(only_logps, lp_full, rtol=1e-5, atol=1e-5)

    # Gradients w.r.t. hidden states and the closed-over unembedding must match too.
    mask = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)

    def objective(fn):
        def f(h, w):
            lp, ent = fn(h, w)
            return jnp.sum(lp * mask) + 0.1 * jnp.sum(ent * mask)

        return jax.grad(f, argnums=(0, 1))

    g_full = objective(full)(hidden, W)
    g_chunk = jax.jit(objective(chunked))(hidden, W)
    for a, b in zip(g_chunk, g_full, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(jnp.zeros((1, 2, 3)), lambda h: h, jnp.zeros((1, 2), int), 0)


def test_completion_logprobs_read_the_columns_before_each_completion_token():
    """Column P - 1 + j predicts completion token j; padding after the stop token is zero."""
    rng = np.random.default_rng(3)
    B, P, N, D, V = 3, 4, 5, 6, 11
    hidden = jnp.asarray(rng.normal(size=(B, P + N, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    completion = jnp.asarray(rng.integers(0, V, size=(B, N)))
    mask = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], jnp.int32)
    logps = completion_logprobs(hidden, lambda h: h @ W, completion, mask, chunk_size=2)
    logits = np.asarray(hidden @ W, np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.zeros((B, N))
    for b in range(B):
        for j in range(N):
            if mask[b, j]:
                expected[b, j] = log_softmax[b, P - 1 + j, int(completion[b, j])]
    assert logps.shape == (B, N) and logps.dtype == jnp.float32
    np.testing.assert_allclose(logps, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(logps)[np.asarray(mask) == 0] == 0)
