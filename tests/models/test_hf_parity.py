"""Parity of imported Hugging Face checkpoints with `transformers` on CPU, for every family:
fp32 logits (unpadded, left- and right-padded batches) within 1e-4, and a 16-token KV-cache
greedy decode picking the same tokens as `transformers` generate."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # noqa: E402
import transformers  # noqa: F401  (test extra: a missing install fails, never skips)
from flax import nnx

from rlhf_jax import partitioning  # noqa: E402
from rlhf_jax.generate import SamplingConfig, SamplingHParams, generate  # noqa: E402
from rlhf_jax.models import Transformer, hf  # noqa: E402
from tests.models.hf_helpers import (  # noqa: E402
    FAMILIES,
    PAD,
    hf_family,
    hf_logits,
    make_hf_model,
    padded_batch,
)

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def loaded(request, tmp_path_factory):
    """(family, HF model, our config, our model, mesh, rules) on a 2x2x2 mesh."""
    family = request.param
    model = make_hf_model(family)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    mesh = partitioning.make_mesh((2, 2, 2))
    rules = partitioning.logical_rules()
    cfg, ours = hf.load_pretrained(path, mesh=mesh, rules=rules)
    return family, model, cfg, ours, mesh, rules


def _forward(ours, mesh, rules, ids, mask):
    graphdef, params = nnx.split(ours)

    @jax.jit
    def f(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, mask)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return np.asarray(f(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))


def test_config_switches(loaded):
    key, model, cfg, *_ = loaded
    family, hc = hf_family(key), model.config
    assert cfg.family == family
    assert cfg.sliding_window == FAMILIES[key].get("sliding_window")
    assert cfg.max_seq_len == (hc.n_positions if family == "gpt2" else hc.max_position_embeddings)
    assert cfg.tie_embeddings == bool(hc.tie_word_embeddings)
    if family != "gpt2":
        assert cfg.num_kv_heads == hc.num_key_value_heads
        assert (
            cfg.head_dim == getattr(hc, "head_dim", None)
            or hc.hidden_size // hc.num_attention_heads
        )
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.qk_norm == (family == "qwen3")
    rope = FAMILIES[key].get("rope_parameters", {}).get("rope_type", "default")
    assert cfg.rope_scaling == ("none" if rope == "default" else rope)
    n_hf = sum(p.numel() for p in model.parameters())
    assert cfg.num_params() == n_hf


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_logits_match_transformers(loaded, side):
    family, model, cfg, ours, mesh, rules = loaded
    rng = np.random.default_rng(1)
    lengths = [12, 12, 12, 12] if side == "none" else [12, 5, 9, 1]
    ids, mask = padded_batch(rng, lengths, 12, "left" if side == "none" else side)
    want = hf_logits(model, ids, mask)
    got = _forward(ours, mesh, rules, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=ATOL, rtol=0)
    if cfg.sliding_window is not None:
        # The window matters on these sequences (transformers applies it in eager attention):
        # the same weights with full attention give other logits.
        full = nnx.merge(
            nnx.graphdef(Transformer(dataclasses.replace(cfg, sliding_window=None),
                                     rngs=nnx.Rngs(0))),
            nnx.state(ours),
        )  # fmt: skip
        assert np.abs(_forward(full, mesh, rules, ids, mask)[real] - want[real]).max() > 1e-2


def test_greedy_decode_matches_transformers_generate(loaded):
    family, model, cfg, ours, mesh, rules = loaded
    n_new = 16
    ids, mask = padded_batch(np.random.default_rng(2), [7, 3, 5, 7], 7, "left")
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
        )
    want = out[:, ids.shape[1] :].numpy()
    graphdef, params = nnx.split(ours)
    config = SamplingConfig(max_new_tokens=n_new, greedy=True, pad_id=PAD)

    @jax.jit
    def sample(params, ids, mask):
        return generate(params, ids, mask, jax.random.key(0), SamplingHParams(),
                        graphdef=graphdef, config=config)  # fmt: skip

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        got = sample(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got.tokens), want)
