"""Model tests: parameter counts, padding invariance, KV cache, remat, dtypes, scalar heads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import PRESETS, ScalarModel, Transformer, model_config
from rlhf_jax.models.param_paths import param_path

SMALL = ["tiny", "llama-tiny"]


def _model(preset, **kw):
    return Transformer(model_config(preset, **kw), rngs=nnx.Rngs(0))


def _ids(b=3, t=12, seed=0, vocab=2048):
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, (b, t)), jnp.int32)


def _prefill_then_decode(m, ids, prefill: int, slots: int) -> jax.Array:
    """Logits of `ids` [B, T] from a KV-cache prefill of the first `prefill` tokens, then one
    token at a time (slot i holds token i), concatenated as [B, T, V]."""
    b, t = ids.shape
    cache = m.init_cache(b, slots, jnp.float32)
    slot_mask = jnp.zeros((b, slots), jnp.int32).at[:, :prefill].set(1)
    pos = jnp.broadcast_to(jnp.arange(prefill), (b, prefill))
    logits, cache = m(ids[:, :prefill], slot_mask, pos, cache=cache, cache_index=0)
    outs = [logits]
    for i in range(prefill, t):
        slot_mask = slot_mask.at[:, i].set(1)
        logits, cache = m(
            ids[:, i : i + 1], slot_mask, jnp.full((b, 1), i), cache=cache, cache_index=i
        )
        outs.append(logits)
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_param_count_matches_config(preset):
    cfg = model_config(preset)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == cfg.num_params()
    if preset == "gpt2":  # the published GPT-2 small size
        assert n == 124_439_808


@pytest.mark.parametrize("preset", SMALL)
def test_left_padding_gives_same_logits(preset):
    m = _model(preset)
    ids = _ids()
    ref = m(ids)
    pad = 5
    ids_p = jnp.concatenate([jnp.zeros((3, pad), jnp.int32), ids], axis=1)
    mask_p = jnp.concatenate([jnp.zeros((3, pad), jnp.int32), jnp.ones_like(ids)], axis=1)
    out = m(ids_p, mask_p)[:, pad:]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", SMALL)
def test_right_padding_does_not_change_real_positions(preset):
    m = _model(preset)
    ids = _ids()
    ref = m(ids)
    ids_p = jnp.concatenate([ids, jnp.zeros((3, 4), jnp.int32)], axis=1)
    mask_p = jnp.concatenate([jnp.ones_like(ids), jnp.zeros((3, 4), jnp.int32)], axis=1)
    out = m(ids_p, mask_p, right_padded=True)[:, :12]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(m(ids_p, mask_p))).all()


@pytest.mark.parametrize("preset", SMALL)
def test_kv_cache_prefill_then_decode_equals_full_forward(preset):
    m = _model(preset)
    b, t, prefill, slots = 3, 12, 7, 20
    ids = _ids(b, t)
    ref = m(ids)
    decoded = _prefill_then_decode(m, ids, prefill, slots)
    np.testing.assert_allclose(decoded, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("decode", ["einsum", "reduce"])
def test_sliding_window_same_in_full_forward_and_cached_decode(decode):
    """A window of 3 slots: the full forward and a prefill + one-token decode agree (both
    decode kernels), and the window changes the logits of the later positions only."""
    m = _model("llama-tiny", sliding_window=3, decode_attention=decode)
    full = nnx.merge(
        nnx.graphdef(_model("llama-tiny", decode_attention=decode)), nnx.state(m)
    )  # the same weights, full attention
    b, t, prefill, slots = 2, 12, 5, 16
    ids = _ids(b, t)
    ref = m(ids)
    wide = full(ids)
    np.testing.assert_allclose(wide[:, :3], ref[:, :3], atol=1e-6, rtol=0)
    assert float(jnp.abs(wide[:, 3:] - ref[:, 3:]).max(axis=-1).min()) > 1e-4  # every one
    decoded = _prefill_then_decode(m, ids, prefill, slots)
    np.testing.assert_allclose(decoded, ref, atol=1e-5, rtol=1e-5)


def _fused_copy(m: Transformer) -> Transformer:
    """A `fused_qkv` model holding `m`'s weights (Q, K and V stacked on a new axis 1)."""
    fused = Transformer(dataclasses.replace(m.cfg, fused_qkv=True), rngs=nnx.Rngs(1))
    state = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    for blk in state["blocks"].values():
        a = blk["attn"]
        a["wqkv"] = jnp.stack([a.pop("wq"), a.pop("wk"), a.pop("wv")], axis=1)
        a["bqkv"] = jnp.stack([a.pop("bq"), a.pop("bk"), a.pop("bv")], axis=0)
    target = nnx.state(fused, nnx.Param)
    nnx.replace_by_pure_dict(target, state)
    nnx.update(fused, target)
    return fused


@pytest.mark.parametrize("variant", ["fused_qkv", "reduce"])
def test_decode_variants_give_the_same_logits(variant):
    """fused_qkv (one projection) and decode_attention="reduce" change kernels, not numbers."""
    m = _model("tiny")
    # Non-zero biases (they start at zero), so a dropped or misplaced bias shows.
    state = nnx.state(m, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(3), 64))

    def noisy_bias(path, x):
        if param_path(path).rsplit("/", 1)[-1].startswith("b"):  # bq, bk, bv, bo, bi, bias
            return 0.5 * jax.random.normal(next(keys), x.shape, x.dtype)
        return x

    state = jax.tree_util.tree_map_with_path(noisy_bias, state)
    nnx.update(m, state)
    if variant == "fused_qkv":
        other = _fused_copy(m)
        assert "wqkv" in nnx.state(other, nnx.Param)["blocks"][0]["attn"]
    else:
        other = nnx.merge(*nnx.split(m))
        other.cfg = dataclasses.replace(m.cfg, decode_attention="reduce")
        for blk in other.blocks:
            blk.attn.cfg = other.cfg
    b, t, prefill, slots = 3, 12, 5, 16
    ids = _ids(b, t)
    if variant == "fused_qkv":
        np.testing.assert_allclose(other(ids), m(ids), atol=1e-5, rtol=1e-5)
    outs = []
    for model in (m, other):
        cache = model.init_cache(b, slots, jnp.float32)
        # Left padding in row 0: its first two slots stay masked.
        slot_mask = jnp.zeros((b, slots), jnp.int32).at[:, :prefill].set(1).at[0, :2].set(0)
        pos = jnp.maximum(jnp.cumsum(slot_mask[:, :prefill], axis=1) - 1, 0)
        logits, cache = model(ids[:, :prefill], slot_mask, pos, cache=cache, cache_index=0)
        steps = [logits[:, -1]]
        for i in range(prefill, t):
            slot_mask = slot_mask.at[:, i].set(1)
            logits, cache = model(
                ids[:, i : i + 1],
                slot_mask,
                pos[:, -1:] + i - prefill + 1,
                cache=cache,
                cache_index=i,
            )
            steps.append(logits[:, 0])
        outs.append(jnp.stack(steps, axis=1))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(outs[0]).max()) > 0.1  # the comparison is not between zeros


def test_remat_same_logits_and_grads():
    ids = _ids()
    grads = []
    for remat in (False, True):
        m = _model("tiny", remat=remat)
        graphdef, params = nnx.split(m, nnx.Param)

        def loss(p, graphdef=graphdef):
            return nnx.merge(graphdef, p)(ids).mean()

        grads.append(jax.jit(jax.grad(loss))(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_fp32_params():
    m32, m16 = _model("tiny"), _model("tiny", compute_dtype="bfloat16")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    ids = _ids()
    out16 = m16(ids)
    assert out16.dtype == jnp.float32  # logits are always fp32
    hidden, _ = m16.forward(ids)
    assert hidden.dtype == jnp.bfloat16
    np.testing.assert_allclose(out16, m32(ids), atol=0.05)


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        model_config("tiny", n_kv_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("nope")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        model_config("tiny", d_modle=3)
    with pytest.raises(ValueError, match="fused_qkv needs multi-head"):
        model_config("llama-tiny", fused_qkv=True)
    with pytest.raises(ValueError, match="decode_attention"):
        model_config("tiny", decode_attention="flash")
    with pytest.raises(ValueError, match="sliding_window"):
        model_config("tiny", sliding_window=0)


def test_scalar_head_reads_last_real_token():
    cfg = model_config("tiny")
    rm = ScalarModel(cfg, rngs=nnx.Rngs(1), num_heads=2)
    ids = _ids(2, 10)
    mask = jnp.ones_like(ids).at[0, 6:].set(0)
    s = rm(ids, mask)
    assert s.shape == (2, 2)
    # Changing tokens under padding does not change the score; changing the last real one does.
    s2 = rm(ids.at[0, 8].set(5), mask)
    np.testing.assert_allclose(s, s2, atol=1e-6)
    s3 = rm(ids.at[0, 5].set(5), mask)
    assert not np.allclose(s3[0], s[0])
    # Left padding: same score as unpadded.
    ids_l = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids[1:]], axis=1)
    mask_l = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 10), jnp.int32)], 1)
    np.testing.assert_allclose(rm(ids_l, mask_l)[0], s[1], atol=1e-5)
    assert rm(ids, mask, per_token=True).shape == (2, 10, 2)
