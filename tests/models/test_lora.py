"""LoRA adapters: a fresh adapter leaves the model unchanged, switching adapters off gives the
base model exactly, merged export gives the adapted model's logits (also in `transformers`),
and the PEFT export has PEFT's layout and loads in `peft` with the same logits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import Transformer, hf, lora, model_config
from rlhf_jax.models.param_paths import by_path
from rlhf_jax.models.safetensors_io import SafetensorsFile

TARGETS = ("attn/w[qkvo]$", "blocks/1/mlp/w[ig]$")


def _adapted(seed=0, preset="llama-tiny", targets=TARGETS):
    """A llama-tiny model with adapters on every attention projection and on layer 1's MLP
    input projections, all B matrices random (a trained-looking adapter)."""
    cfg = model_config(preset, vocab_size=96, lora_rank=4, lora_alpha=8.0,
                       lora_targets=targets)  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for path, var in by_path(nnx.state(model, nnx.Param)).items():
        if path.endswith("_lora_b"):
            key, sub = jax.random.split(key)
            var.set_value(0.05 * jax.random.normal(sub, var.get_value().shape))
    return cfg, model


def _ids():
    return jnp.asarray(np.random.default_rng(0).integers(3, 96, (2, 10)), jnp.int32)


def _logits(model, params=None):
    if params is not None:
        model = nnx.merge(nnx.graphdef(model), params)
    return np.asarray(model(_ids()))


def test_adapters_where_targeted_only():
    cfg, model = _adapted()
    paths = {p for p in by_path(nnx.state(model, nnx.Param)) if lora.is_adapter(p)}
    want = {f"blocks/{i}/attn/w{n}_lora_{m}" for i in (0, 1) for n in "qkvo" for m in "ab"}
    want |= {f"blocks/1/mlp/w{n}_lora_{m}" for n in "ig" for m in "ab"}
    assert paths == want
    a = nnx.state(model, nnx.Param)["blocks"][0]["attn"]["wo_lora_a"]
    assert a.get_value().shape == (4, 16, 4) and tuple(a.get_metadata()["out_sharding"]) == (
        "heads", "head_dim", None)  # fmt: skip


def test_fresh_adapters_and_adapters_off_give_the_base_model():
    cfg, model = _adapted()
    base_cfg = cfg.__class__(**{**cfg.__dict__, "lora_rank": 0})
    base = Transformer(base_cfg, rngs=nnx.Rngs(0))
    # Same seed, same base weights: the adapters' draws come after every base weight's.
    params = nnx.state(model, nnx.Param)
    base_params = nnx.split_state(params, lora.LoRAParam, ...)[1]
    nnx.update(base, base_params)
    off = lora.without_adapters(params)
    np.testing.assert_array_equal(_logits(model, off), _logits(base))
    assert np.abs(_logits(model) - _logits(base)).max() > 1e-3  # the adapters do something
    fresh = Transformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(fresh, base_params)
    np.testing.assert_array_equal(_logits(fresh), _logits(base))


def test_merged_export_gives_adapted_logits(tmp_path):
    import transformers

    cfg, model = _adapted()
    mcfg, merged = hf.merge_lora(model, cfg)
    assert mcfg.lora_rank == 0 and not lora.has_adapters(nnx.state(merged, nnx.Param))
    np.testing.assert_allclose(_logits(merged), _logits(model), atol=1e-5, rtol=0)
    hf.save_pretrained(model, cfg, tmp_path)  # merges by itself
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    import torch

    with torch.no_grad():
        got = theirs(input_ids=torch.as_tensor(np.array(_ids()))).logits.numpy()
    np.testing.assert_allclose(got, _logits(model), atol=1e-4, rtol=0)


def test_peft_export_layout_and_logits(tmp_path):
    cfg, model = _adapted()
    base_cfg = cfg.__class__(**{**cfg.__dict__, "lora_rank": 0})
    base = Transformer(base_cfg, rngs=nnx.Rngs(0))
    nnx.update(base, nnx.split_state(nnx.state(model, nnx.Param), lora.LoRAParam, ...)[1])
    hf.save_pretrained(base, base_cfg, tmp_path / "base")
    out = hf.save_peft(model, cfg, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert "model.layers.1.mlp.gate_proj" in config["target_modules"]
    assert "model.layers.0.mlp.gate_proj" not in config["target_modules"]
    f = SafetensorsFile(out / "adapter_model.safetensors")
    name = "base_model.model.model.layers.0.self_attn.o_proj"
    assert f.shape(f"{name}.lora_A.weight") == (4, 4 * 16)  # [r, in = heads * head_dim]
    assert f.shape(f"{name}.lora_B.weight") == (64, 4)  # [out, r]
    assert len(f.entries) == 2 * len(config["target_modules"]) == 2 * 10
    import peft  # noqa: F401
    import torch
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").float()
    theirs = peft.PeftModel.from_pretrained(theirs, out).eval()
    with torch.no_grad():
        got = theirs(input_ids=torch.as_tensor(np.array(_ids()))).logits.numpy()
    np.testing.assert_allclose(got, _logits(model), atol=1e-4, rtol=0)


def test_adapter_dropout_only_inside_a_training_loss():
    cfg, model = _adapted()
    dropped = nnx.merge(
        nnx.graphdef(Transformer(cfg.__class__(**{**cfg.__dict__, "lora_dropout": 0.5}),
                                 rngs=nnx.Rngs(0))),
        nnx.state(model, nnx.Param),
    )  # fmt: skip
    np.testing.assert_array_equal(_logits(dropped), _logits(model))  # eval: no dropout
    with lora.dropout(jax.random.key(0)):
        a = _logits(dropped)
    with lora.dropout(jax.random.key(0)):
        b = _logits(dropped)
    with lora.dropout(jax.random.key(1)):
        c = _logits(dropped)
    np.testing.assert_array_equal(a, b)  # the masks follow the key
    assert np.abs(a - _logits(model)).max() > 1e-4 and np.abs(a - c).max() > 1e-4
    with lora.dropout(jax.random.key(0)):  # lora_dropout = 0: no effect
        inside = _logits(model)
    np.testing.assert_array_equal(inside, _logits(model))


def test_gin_lora_needs_the_adapter_only_optimizer():
    import gin

    from rlhf_jax.train import optim  # noqa: F401  (registers make_optimizer)

    cfg = model_config("llama-tiny")
    gin.parse_config("lora_settings.rank = 4")
    with pytest.raises(ValueError, match="make_optimizer.trainable"):
        lora.with_lora(cfg)
    with pytest.raises(ValueError, match="not supported by reward-model"):
        lora.check_unsupported("reward-model")
    gin.parse_config("make_optimizer.trainable = ['_lora_[ab]$']")
    assert lora.with_lora(cfg).lora_rank == 4


def test_gpt2_peft_export_loads_in_peft(tmp_path):
    """GPT-2 adapters export onto its Conv1D modules: Q and V's adapters together on the fused
    c_attn (rank 2r, K's block zero), the others one to one; `peft` gives the same logits."""
    import peft
    import torch
    import transformers

    cfg, model = _adapted(preset="tiny", targets=("attn/w[qvo]$", "blocks/1/mlp/wo$"))
    base_cfg = cfg.__class__(**{**cfg.__dict__, "lora_rank": 0})
    base = Transformer(base_cfg, rngs=nnx.Rngs(0))
    nnx.update(base, nnx.split_state(nnx.state(model, nnx.Param), lora.LoRAParam, ...)[1])
    hf.save_pretrained(base, base_cfg, tmp_path / "base")
    out = hf.save_peft(model, cfg, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert sorted(config["target_modules"]) == sorted(
        [f"transformer.h.{i}.attn.{m}" for i in (0, 1) for m in ("c_attn", "c_proj")]
        + ["transformer.h.1.mlp.c_proj"]
    )
    f = SafetensorsFile(out / "adapter_model.safetensors")
    name = "base_model.model.transformer.h.0.attn.c_attn"
    assert f.shape(f"{name}.lora_A.weight") == (8, 64)  # Q's and V's A: rank 2 * 4
    b = np.asarray(f.array(f"{name}.lora_B.weight"))
    assert b.shape == (3 * 64, 8) and not b[64:128].any() and b[:64, :4].any()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").float()
    theirs = peft.PeftModel.from_pretrained(theirs, out).eval()
    with torch.no_grad():
        got = theirs(input_ids=torch.as_tensor(np.array(_ids()))).logits.numpy()
    np.testing.assert_allclose(got, _logits(model), atol=1e-4, rtol=0)
    assert np.abs(_logits(base) - _logits(model)).max() > 1e-3  # the adapters do something
