"""Sampler tests: cache vs full recomputation, log-probs vs teacher forcing, filters, stopping,
padding invariance, determinism, sharding (1 device vs 2×2×2) and the recompile guard."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import partitioning as P
from rlhf_jax.generate import (
    Sampler,
    SamplingConfig,
    SamplingHParams,
    choose_tokens,
    segment_ends,
    sequence_batch,
    top_k_filter,
    top_p_filter,
)
from rlhf_jax.info import create_params
from rlhf_jax.models import model_config

B, PROMPT, N = 4, 8, 12


def _prompts(vocab, b=B, p=PROMPT, seed=0):
    """Left-padded prompts of mixed lengths (8, 5, 2, 7 real tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (b, p)).astype(np.int32)
    real = np.array([p, p - 3, 2, p - 1][:b])
    mask = (np.arange(p)[None] >= (p - real)[:, None]).astype(np.int32)
    return ids * mask, mask


class Setup:
    """A tiny model on a mesh, its sampler, and a jitted full forward for references."""

    def __init__(self, preset, mesh_shape=(1, 1, 1)):
        # A wider init than the default 0.02 keeps greedy choices well apart: with near-tied
        # logits, summation order (1 device vs 2x2x2, jax versions) could flip an argmax.
        self.preset, self.cfg = preset, model_config(preset, init_std=0.2)
        devices = jax.devices()[: int(np.prod(mesh_shape))]
        self.mesh, self.rules = P.make_mesh(mesh_shape, devices), P.logical_rules()
        self.graphdef, self.params, self.shardings = create_params(self.cfg, self.mesh, self.rules)
        self.sampler = Sampler(self.graphdef, self.cfg, self.mesh, self.rules, self.shardings)
        self.ids, self.mask = _prompts(self.cfg.vocab_size)

    def sample(self, config, hp=None, rng=0, params=None, ids=None, mask=None, sampler=None):
        params = self.params if params is None else params
        ids = self.ids if ids is None else ids
        mask = self.mask if mask is None else mask
        sampler = sampler or self.sampler
        return sampler(params, ids, mask, jax.random.key(rng), config, hp)

    @functools.cached_property
    def logits_fn(self):
        return jax.jit(lambda p, ids, mask, pos: nnx.merge(self.graphdef, p)(ids, mask, pos))

    def teacher_forced_logits(self, out):
        """Logits [B, N, V] predicting each completion token, from one full forward."""
        seq = sequence_batch(self.ids, self.mask, out)
        logits = self.logits_fn(
            self.params, seq["input_ids"], seq["attention_mask"], seq["positions"]
        )
        p = self.ids.shape[1]
        return np.asarray(logits[:, p - 1 : p - 1 + out.tokens.shape[1]])


@functools.cache
def _setup(preset: str, mesh_shape=(1, 1, 1)) -> Setup:
    """One Setup per model and mesh per process, so compiled programs are shared by tests."""
    return Setup(preset, mesh_shape)


@pytest.fixture(params=["tiny", "llama-tiny"])
def setup(request):
    return _setup(request.param)


@pytest.fixture
def tiny():
    return _setup("tiny")


GREEDY = SamplingConfig(max_new_tokens=N, greedy=True)
# Temperature 0.7, then top-k 50, then top-p 0.9; segments of 6 steps.
SAMPLED = SamplingConfig(max_new_tokens=N, top_k=50, segment_len=6), SamplingHParams(0.7, 0.9)


def _greedy_by_recomputation(s: Setup, n: int) -> np.ndarray:
    """Slow reference: a full forward over prompt + tokens so far at every step, no cache."""
    b, p = s.ids.shape
    ids = np.concatenate([s.ids, np.zeros((b, n), np.int32)], axis=1)
    mask = np.concatenate([s.mask, np.zeros((b, n), np.int32)], axis=1)
    for i in range(n):
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits = s.logits_fn(s.params, ids, mask, pos)
        ids[:, p + i] = np.asarray(jnp.argmax(logits[:, p - 1 + i], axis=-1))
        mask[:, p + i] = 1
    return ids[:, p:]


# ----------------------------------------------------------------------------- filters


def test_top_p_keeps_exactly_the_smallest_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
    logits = jnp.log(jnp.asarray(np.stack([probs] * 5), jnp.float32))
    top_p = jnp.asarray([0.4, 0.75, 0.85, 0.99, 1.0])
    kept = np.isfinite(np.asarray(top_p_filter(logits, top_p)))
    expected = [{1}, {1, 3}, {1, 3, 2}, {0, 1, 2, 3}, {0, 1, 2, 3}]
    for row, want in zip(kept, expected, strict=True):
        assert set(np.flatnonzero(row)) == want
    # At least one token survives even for top_p = 0, and a scalar top_p works too.
    assert np.isfinite(np.asarray(top_p_filter(logits, 0.0))).sum(-1).tolist() == [1] * 5
    # Kept logits are unchanged.
    out = np.asarray(top_p_filter(logits, 0.75))
    np.testing.assert_allclose(out[0, [1, 3]], np.asarray(logits)[0, [1, 3]])


def test_top_k_filter():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 0.5]])
    assert np.flatnonzero(np.isfinite(top_k_filter(logits, 2))).tolist() == [1, 3]
    np.testing.assert_array_equal(top_k_filter(logits, 0), logits)
    np.testing.assert_array_equal(top_k_filter(logits, 5), logits)


def test_sampling_frequencies_follow_the_filtered_distribution():
    probs = np.array([0.05, 0.4, 0.1, 0.25, 0.2])
    logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (20_000, 5)))
    config = SamplingConfig(max_new_tokens=1, top_k=4)
    hp = SamplingHParams(temperature=1.0, top_p=0.8)  # top-4 drops 0.05; top-p keeps {1, 3, 4}
    tok, lp, model_lp = choose_tokens(logits, jax.random.key(0), 0, hp, config)
    kept = np.array([0, 0.4, 0, 0.25, 0.2]) / 0.85
    freq = np.bincount(np.asarray(tok), minlength=5) / tok.shape[0]
    np.testing.assert_allclose(freq, kept, atol=0.015)
    np.testing.assert_allclose(lp, np.log(kept[np.asarray(tok)]), atol=1e-5)
    np.testing.assert_allclose(model_lp, np.log(probs[np.asarray(tok)]), atol=1e-5)
    # Temperature 2 flattens the distribution: p ∝ probs ** 0.5 (no filtering here).
    tok, _, _ = choose_tokens(logits, jax.random.key(1), 0, SamplingHParams(2.0), config)
    flat = np.sqrt(probs[1:]) / np.sqrt(probs[1:]).sum()  # top-4 still drops token 0
    freq = np.bincount(np.asarray(tok), minlength=5)[1:] / tok.shape[0]
    np.testing.assert_allclose(freq, flat, atol=0.015)


def test_config_validation_and_segments():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingConfig(max_new_tokens=3, min_new_tokens=4)
    assert SamplingConfig(4, eos_id=2, stop_ids=[7, 2]).stop_tokens == (2, 7)
    assert segment_ends(10, 0) == [10]
    assert segment_ends(10, 4) == [5, 9, 10]
    assert segment_ends(10, 9) == [10]


def test_top_p_without_the_filter_compiled_is_rejected(tiny):
    with pytest.raises(ValueError, match="use_top_p"):
        tiny.sample(SamplingConfig(max_new_tokens=4, use_top_p=False), SamplingHParams(top_p=0.9))


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("segment_len", [0, 5])
def test_greedy_with_cache_equals_full_recomputation(setup, segment_len):
    out = setup.sample(SamplingConfig(max_new_tokens=N, greedy=True, segment_len=segment_len))
    np.testing.assert_array_equal(out.tokens, _greedy_by_recomputation(setup, N))
    assert out.tokens.shape == (B, N) and out.lengths.tolist() == [N] * B
    np.testing.assert_array_equal(out.logprobs, 0.0)  # greedy: a point mass


def test_logprobs_match_teacher_forcing(setup):
    out = setup.sample(*SAMPLED, rng=3)
    logits = setup.teacher_forced_logits(out)
    tok = np.asarray(out.tokens)[..., None]
    model_lp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), tok, -1)[..., 0]
    np.testing.assert_allclose(out.model_logprobs, model_lp, atol=1e-4)
    # The sampling distribution: temperature, then top-k, then top-p.
    shaped = top_p_filter(top_k_filter(jnp.asarray(logits / 0.7).reshape(B * N, -1), 50), 0.9)
    sample_lp = np.take_along_axis(
        np.asarray(jax.nn.log_softmax(shaped)).reshape(B, N, -1), tok, -1
    )[..., 0]
    np.testing.assert_allclose(out.logprobs, sample_lp, atol=1e-4)
    assert (np.asarray(out.logprobs) > np.asarray(out.model_logprobs)).all()


def test_topk1_and_cold_temperature_equal_greedy(tiny):
    greedy = np.asarray(tiny.sample(GREEDY).tokens)
    top1 = tiny.sample(SamplingConfig(max_new_tokens=N, top_k=1), rng=1)
    np.testing.assert_array_equal(top1.tokens, greedy)
    np.testing.assert_allclose(top1.logprobs, 0.0, atol=1e-6)
    sampled = SamplingConfig(max_new_tokens=N)
    cold = tiny.sample(sampled, SamplingHParams(temperature=jnp.full((B,), 1e-4)), rng=2)
    np.testing.assert_array_equal(cold.tokens, greedy)
    # Temperature 0 is greedy per row; the other rows still sample.
    mixed = tiny.sample(sampled, SamplingHParams(temperature=jnp.asarray([0.0, 1, 0, 1])), rng=2)
    np.testing.assert_array_equal(np.asarray(mixed.tokens)[[0, 2]], greedy[[0, 2]])
    assert (np.asarray(mixed.tokens)[[1, 3]] != greedy[[1, 3]]).any()


def test_deterministic_given_rng(tiny):
    a, b, c = (tiny.sample(*SAMPLED, rng=r) for r in (7, 7, 8))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()


def test_left_padding_does_not_change_greedy_output(setup):
    out = np.asarray(setup.sample(GREEDY).tokens)
    # More left padding (a longer prompt bucket) gives the same tokens...
    extra = 5
    ids = np.pad(setup.ids, ((0, 0), (extra, 0)))
    mask = np.pad(setup.mask, ((0, 0), (extra, 0)))
    np.testing.assert_array_equal(setup.sample(GREEDY, ids=ids, mask=mask).tokens, out)
    # ...and so does a batch of the unpadded 2-token prompt (row 2) alone.
    short = np.repeat(setup.ids[2:3, -2:], B, axis=0)
    alone = setup.sample(GREEDY, ids=short, mask=np.ones_like(short))
    np.testing.assert_array_equal(alone.tokens[0], out[2])


# ----------------------------------------------------------------------------- stopping


def test_rows_stop_independently_on_eos_and_stop_ids(tiny):
    free = np.asarray(tiny.sample(GREEDY).tokens)
    eos, extra = int(free[1, 3]), int(free[3, 5])
    config = SamplingConfig(max_new_tokens=N, greedy=True, eos_id=eos, stop_ids=(extra,), pad_id=1)
    out = tiny.sample(config)
    # Segmented decoding (skips whole segments once all rows are done) gives the same result.
    segmented = tiny.sample(dataclasses.replace(config, segment_len=4))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(segmented), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # exact for the integer leaves
    tokens, mask = np.asarray(out.tokens), np.asarray(out.completion_mask)
    for row in range(B):
        hits = np.flatnonzero(np.isin(free[row], [eos, extra]))
        length = hits[0] + 1 if hits.size else N
        assert out.lengths[row] == length
        np.testing.assert_array_equal(tokens[row, :length], free[row, :length])
        assert (tokens[row, length:] == 1).all()
        assert mask[row].tolist() == [1] * length + [0] * (N - length)
        assert (np.asarray(out.model_logprobs)[row, length:] == 0).all()
    assert len(set(out.lengths.tolist())) > 1  # rows really did stop at different steps


def _eos_dominant_params(s: Setup, eos: int):
    """GPT-2-style params whose final LayerNorm outputs a constant aligned with EOS's embedding.

    With tied embeddings the logits become 1e4 · embed[eos] · embed[v], so EOS wins by a wide
    margin at every step, whatever the input.
    """
    model = nnx.merge(s.graphdef, s.params)
    model.ln_f.scale[...] = jnp.zeros_like(model.ln_f.scale[...])
    model.ln_f.bias[...] = 1e4 * model.embed[...][eos]
    return jax.device_put(nnx.state(model, nnx.Param), s.shardings)


def test_min_new_tokens_masks_eos(tiny):
    eos = 2
    params = _eos_dominant_params(tiny, eos)
    # Every row stops at once; with segments, each segment after the first is then skipped.
    out = tiny.sample(SamplingConfig(max_new_tokens=N, eos_id=eos, segment_len=6), params=params)
    assert out.lengths.tolist() == [1] * B and (np.asarray(out.tokens)[:, 0] == eos).all()
    out = tiny.sample(SamplingConfig(max_new_tokens=N, min_new_tokens=5, eos_id=eos), params=params)
    tokens = np.asarray(out.tokens)
    assert out.lengths.tolist() == [6] * B
    assert (tokens[:, :5] != eos).all() and (tokens[:, 5] == eos).all()
    assert (tokens[:, 6:] == 0).all()


# ----------------------------------------------------------------------------- compilation


def test_compiles_once_per_shape_and_config(tiny):
    fresh = Sampler(tiny.graphdef, tiny.cfg, tiny.mesh, tiny.rules, tiny.shardings)
    config = SamplingConfig(max_new_tokens=6)
    tiny.sample(config, SamplingHParams(1.0, 1.0), rng=0, sampler=fresh)
    tiny.sample(config, SamplingHParams(0.5, 0.8), rng=1, ids=tiny.ids[::-1].copy(), sampler=fresh)
    tiny.sample(config, SamplingHParams(jnp.float32(2.0), 0.95), rng=2, sampler=fresh)
    assert fresh.trace_count == 1


def test_sharded_2x2x2_equals_one_device(setup):
    # Fresh setups: other tests craft parameters from the cached ones.
    one, eight = Setup(setup.preset), Setup(setup.preset, (2, 2, 2))
    out1, out8 = one.sample(GREEDY), eight.sample(GREEDY)
    np.testing.assert_array_equal(out1.tokens, out8.tokens)
    np.testing.assert_allclose(out1.model_logprobs, out8.model_logprobs, atol=1e-5)
    assert out8.tokens.sharding.spec == P.batch_sharding(eight.mesh, 2).spec
    assert len(out8.tokens.sharding.device_set) == 8
    if setup.preset != "llama-tiny":  # one model is enough for the sampled check
        return
    # Sampling draws the same tokens too (threefry is partitionable).
    out1, out8 = one.sample(*SAMPLED, rng=3), eight.sample(*SAMPLED, rng=3)
    np.testing.assert_array_equal(out1.tokens, out8.tokens)
    np.testing.assert_allclose(out1.logprobs, out8.logprobs, atol=1e-5)
