"""How Hugging Face checkpoints map onto our models: tensor views and config.json fields.

Each parameter of ours is a *view* of one HF tensor (`View`): a transpose plus splits of HF axes
into several of ours (e.g. `q_proj.weight` [N*H, D] -> `wq` [D, N, H]), possibly at an offset
along one HF axis (GPT-2's fused `c_attn` holds Q, K and V side by side). `param_views` lists
them per family; `config_from_hf` and `hf_config` translate config.json both ways. The loading
and writing itself is `rlhf_jax.models.hf`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.models.config import DTYPES, ModelConfig
from rlhf_jax.models.safetensors_io import CheckpointFileError

HFError = CheckpointFileError
SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
REWARD_SIDE_FILE = "reward_heads.safetensors"
# Non-parameter buffers that some (older) checkpoints carry: safe to skip.
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class View:
    """Our parameter as a view of an HF tensor.

    `groups[i] = (hf_axis, sizes, offset)`: our next `len(sizes)` axes are HF axis `hf_axis`
    split row-major into `sizes`, starting at `offset` along that HF axis. Our axes follow the
    order of the groups (that is the transpose).
    """

    hf_name: str
    groups: tuple[tuple[int, tuple[int, ...], int], ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(s for _, sizes, _ in self.groups for s in sizes)

    def hf_extent(self) -> dict[int, int]:
        """HF axis -> the end of this view's span along it."""
        return {ax: off + math.prod(sizes) for ax, sizes, off in self.groups}

    def read(self, arr: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
        """Our array's block `index`, reading only (a cover of) that block from `arr`."""
        hf_index: list[slice] = [slice(None)] * arr.ndim
        post, local, i = [], [], 0
        for ax, sizes, off in self.groups:
            cut = index[i : i + len(sizes)]
            ranges = [sl.indices(n)[:2] for sl, n in zip(cut, sizes, strict=True)]
            inner = math.prod(sizes[1:])
            (a, b), rest = ranges[0], ranges[1:]
            # The leading split axis maps to a contiguous HF range; inner axes that the block
            # cuts (a sharded head_dim, say) are cut after the reshape.
            hf_index[ax] = slice(off + a * inner, off + b * inner)
            post += [slice(None)] + [slice(lo, hi) for lo, hi in rest]
            local += [b - a, *sizes[1:]]
            i += len(sizes)
        block = np.asarray(arr[tuple(hf_index)])
        block = block.transpose([ax for ax, _, _ in self.groups]).reshape(local)
        return block[tuple(post)]

    def write(self, out: np.ndarray, value: np.ndarray) -> None:
        """Places our full array `value` into the HF tensor `out` (inverse of `read`)."""
        merged = [math.prod(sizes) for _, sizes, _ in self.groups]
        order = [ax for ax, _, _ in self.groups]
        block = value.reshape(merged).transpose(np.argsort(order))
        index = [slice(None)] * out.ndim
        for ax, sizes, off in self.groups:
            index[ax] = slice(off, off + math.prod(sizes))
        out[tuple(index)] = block


def _v(name: str, *groups) -> View:
    return View(name, tuple((ax, tuple(sizes), off) for ax, sizes, off in groups))


def _lin(name: str, d_in: int, out_sizes: tuple[int, ...]) -> View:
    """A torch Linear weight [out, in] as our [in, *out_sizes]."""
    return _v(name, (1, (d_in,), 0), (0, out_sizes, 0))


def _lin_in(name: str, in_sizes: tuple[int, ...], d_out: int) -> View:
    """A torch Linear weight [out, in] as our [*in_sizes, out]."""
    return _v(name, (1, in_sizes, 0), (0, (d_out,), 0))


def _vec(name: str, sizes: tuple[int, ...], off: int = 0) -> View:
    return _v(name, (0, sizes, off))


def _llama_views(cfg: ModelConfig, p: str) -> dict[str, View]:
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
    views = {"embed": _v(f"{p}embed_tokens.weight", (0, (cfg.vocab_size,), 0), (1, (d,), 0))}
    for i in range(cfg.n_layers):
        hf, us = f"{p}layers.{i}.", f"blocks/{i}/"
        a = hf + "self_attn."
        views |= {
            us + "ln1/scale": _vec(hf + "input_layernorm.weight", (d,)),
            us + "ln2/scale": _vec(hf + "post_attention_layernorm.weight", (d,)),
            us + "attn/wq": _lin(a + "q_proj.weight", d, (n, h)),
            us + "attn/wk": _lin(a + "k_proj.weight", d, (k, h)),
            us + "attn/wv": _lin(a + "v_proj.weight", d, (k, h)),
            us + "attn/wo": _lin_in(a + "o_proj.weight", (n, h), d),
            us + "mlp/wi": _lin(hf + "mlp.up_proj.weight", d, (f,)),
            us + "mlp/wg": _lin(hf + "mlp.gate_proj.weight", d, (f,)),
            us + "mlp/wo": _lin_in(hf + "mlp.down_proj.weight", (f,), d),
        }
        if cfg.qkv_bias:
            views |= {
                us + "attn/bq": _vec(a + "q_proj.bias", (n, h)),
                us + "attn/bk": _vec(a + "k_proj.bias", (k, h)),
                us + "attn/bv": _vec(a + "v_proj.bias", (k, h)),
            }
        if cfg.qk_norm:
            views[us + "attn/q_norm/scale"] = _vec(a + "q_norm.weight", (h,))
            views[us + "attn/k_norm/scale"] = _vec(a + "k_norm.weight", (h,))
    views["ln_f/scale"] = _vec(f"{p}norm.weight", (d,))
    return views


def _gpt2_views(cfg: ModelConfig, p: str) -> dict[str, View]:
    d, n, h, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    views = {
        "embed": _v(f"{p}wte.weight", (0, (cfg.vocab_size,), 0), (1, (d,), 0)),
        "pos_embed": _v(f"{p}wpe.weight", (0, (cfg.max_seq_len,), 0), (1, (d,), 0)),
    }
    for i in range(cfg.n_layers):
        hf, us = f"{p}h.{i}.", f"blocks/{i}/"
        # GPT-2's Conv1D stores [in, out]; c_attn's columns are Q, K, V side by side.
        views |= {
            us + "ln1/scale": _vec(hf + "ln_1.weight", (d,)),
            us + "ln1/bias": _vec(hf + "ln_1.bias", (d,)),
            us + "ln2/scale": _vec(hf + "ln_2.weight", (d,)),
            us + "ln2/bias": _vec(hf + "ln_2.bias", (d,)),
            us + "attn/wo": _v(hf + "attn.c_proj.weight", (0, (n, h), 0), (1, (d,), 0)),
            us + "attn/bo": _vec(hf + "attn.c_proj.bias", (d,)),
            us + "mlp/wi": _v(hf + "mlp.c_fc.weight", (0, (d,), 0), (1, (f,), 0)),
            us + "mlp/bi": _vec(hf + "mlp.c_fc.bias", (f,)),
            us + "mlp/wo": _v(hf + "mlp.c_proj.weight", (0, (f,), 0), (1, (d,), 0)),
            us + "mlp/bo": _vec(hf + "mlp.c_proj.bias", (d,)),
        }
        for j, name in enumerate(("q", "k", "v")):
            views[us + f"attn/w{name}"] = _v(
                hf + "attn.c_attn.weight", (0, (d,), 0), (1, (n, h), j * d)
            )
            views[us + f"attn/b{name}"] = _vec(hf + "attn.c_attn.bias", (n, h), j * d)
    views["ln_f/scale"] = _vec(f"{p}ln_f.weight", (d,))
    views["ln_f/bias"] = _vec(f"{p}ln_f.bias", (d,))
    return views


def param_views(cfg: ModelConfig, model_type: str, *, reward: bool = False) -> dict[str, View]:
    """Our parameter path (`blocks/0/attn/wq`) -> its `View` of an HF tensor.

    Args:
      cfg: the model config.
      model_type: the HF `model_type` (one of `SUPPORTED`).
      reward: a `ScalarModel` with one head (`score.weight`, `*ForSequenceClassification`).
    """
    if model_type == "gpt2":
        views = _gpt2_views(cfg, "transformer.")
    else:
        views = _llama_views(cfg, "model.")
    if reward:
        views = {f"trunk/{k}": v for k, v in views.items()}
        views["head_w"] = _lin("score.weight", cfg.d_model, (1,))
    elif not cfg.tie_embeddings:
        views["lm_head"] = _lin("lm_head.weight", cfg.d_model, (cfg.vocab_size,))
    return views


# ------------------------------------------------------------------------------ config mapping


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE theta and scaling from `rope_parameters` (transformers 5) or the older
    `rope_theta` + `rope_scaling` keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind == "linear":
        return out | {"rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
    if kind == "llama3":
        return out | {
            "rope_scaling": "llama3",
            "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_len": int(params["original_max_position_embeddings"]),
        }
    raise HFError(f"unsupported RoPE scaling {kind!r} (supported: default, linear, llama3)")


def _reject(hf: Mapping[str, Any], key: str, ok, what: str) -> None:
    if key in hf and hf[key] not in ok:
        raise HFError(f"unsupported config.json setting {key}={hf[key]!r} ({what})")


def config_from_hf(hf: Mapping[str, Any], dtype: str | None = None) -> ModelConfig:
    """The `ModelConfig` of a `transformers` config.json (as a dict).

    Args:
      hf: the parsed config.json.
      dtype: parameter and compute dtype ("float32", "bfloat16", ...); default: the
        checkpoint's own dtype (float32 when it names none).

    Raises:
      HFError: an architecture or setting this model does not implement, naming it.
    """
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise HFError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
    saved = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = dtype or (saved if saved in DTYPES else "float32")
    if dtype not in DTYPES:
        raise HFError(f"dtype {dtype!r}; choose one of {list(DTYPES)}")
    common = dict(param_dtype=dtype, compute_dtype=dtype, family=mt)
    tie = bool(hf.get("tie_word_embeddings", mt == "gpt2"))
    if mt == "gpt2":
        _reject(hf, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "tanh GELU only")
        _reject(hf, "scale_attn_by_inverse_layer_idx", (False,), "not implemented")
        _reject(hf, "reorder_and_upcast_attn", (False,), "not implemented")
        _reject(hf, "scale_attn_weights", (True,), "not implemented")
        d = hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d, max_seq_len=hf["n_positions"], pos_emb="learned",
            norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=tie,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), **common,
        )  # fmt: skip
    _reject(hf, "hidden_act", ("silu",), "SwiGLU with SiLU only")
    _reject(hf, "mlp_bias", (False,), "MLP biases are not implemented for this family")
    attn_bias = bool(hf.get("attention_bias", False))
    if mt in ("llama", "mistral", "qwen3") and attn_bias:
        raise HFError("unsupported config.json setting attention_bias=True (output bias)")
    max_len = hf.get("max_position_embeddings", 4096)
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // n
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
        n_kv_heads=hf.get("num_key_value_heads") or n, d_ff=hf["intermediate_size"],
        max_seq_len=max_len, pos_emb="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
        tie_embeddings=tie, norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3",
        attn_head_dim=None if head_dim * n == d else head_dim, **_rope_fields(hf), **common,
        sliding_window=_sliding_window(hf, mt),
    )  # fmt: skip


def _sliding_window(hf: Mapping[str, Any], mt: str) -> int | None:
    """The attention window of every layer, as `transformers` applies it.

    Mistral: whenever `sliding_window` is set, on every layer (its model ignores
    `layer_types`). Qwen2/3: with `use_sliding_window`, on the layers from `max_window_layers`
    on (or as `layer_types` lists them). A window on some layers only is refused (one window
    for the whole model here).
    """
    window = hf.get("sliding_window")
    if mt == "llama" or window is None:
        return None
    if mt in ("qwen2", "qwen3"):
        n_layers = hf["num_hidden_layers"]
        types = hf.get("layer_types")
        if types is None:
            if not hf.get("use_sliding_window", False):
                return None
            start = hf.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= start else "full_attention"
                     for i in range(n_layers)]  # fmt: skip
        if set(types) == {"full_attention"}:
            return None
        if set(types) != {"sliding_attention"}:
            raise HFError(
                f"unsupported config.json setting: a sliding window on some layers only "
                f"(layer_types={types}); one window for all layers or none is supported"
            )
    if not isinstance(window, int) or window < 1:
        raise HFError(f"unsupported config.json setting sliding_window={window!r}")
    return window


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of an HF model directory (HFError when missing or malformed)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise HFError(f"{p} is not a Hugging Face model directory (no config.json)")
    try:
        return json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFError(f"cannot read {p / 'config.json'}: {e}") from None


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True when `path` looks like a Hugging Face model directory (a config.json with a
    model_type), as opposed to one of our run directories."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "model.json").exists()


def _is_reward(hf: Mapping[str, Any]) -> bool:
    archs = hf.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 1)
        if labels != 1:
            raise HFError(f"a sequence classifier with {labels} labels; reward models have one")
        return True
    return False


# ------------------------------------------------------------------------------ export config

_ARCH = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def hf_model_type(cfg: ModelConfig) -> str:
    """The `transformers` family that implements exactly `cfg`.

    Raises:
      HFError: no supported family has this combination of switches (naming the switch).
    """
    gpt2_like = (cfg.pos_emb, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu")
    llama_like = (cfg.pos_emb, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu")
    if gpt2_like:
        bad = [n for n in ("qkv_bias", "qk_norm", "attn_head_dim", "n_kv_heads")
               if getattr(cfg, n) not in (None, False, cfg.n_heads)]  # fmt: skip
        if not cfg.use_bias:
            bad.append("use_bias=False")
        if bad:
            raise HFError(f"GPT-2 has no equivalent of {', '.join(bad)}")
        return "gpt2"
    if not llama_like:
        raise HFError(
            f"no Hugging Face family has pos_emb={cfg.pos_emb}, norm={cfg.norm}, mlp={cfg.mlp}"
        )
    if cfg.use_bias:
        raise HFError("use_bias=True (biases everywhere) has no Llama-family equivalent")
    if cfg.qk_norm and cfg.qkv_bias:
        raise HFError("qk_norm together with qkv_bias has no Hugging Face equivalent")
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    # Llama has no sliding window; Mistral is Llama with one.
    return "mistral" if cfg.family == "mistral" or cfg.sliding_window else "llama"


def hf_config(cfg: ModelConfig, *, reward: bool = False, tokenizer=None) -> dict[str, Any]:
    """The config.json that makes `transformers` build the same network as `cfg`."""
    mt = hf_model_type(cfg)
    head = (
        "ForSequenceClassification"
        if reward
        else ("LMHeadModel" if mt == "gpt2" else "ForCausalLM")
    )
    out: dict[str, Any] = {
        "architectures": [_ARCH[mt] + head],
        "model_type": mt,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype,
    }
    if mt == "gpt2":
        out |= {
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "scale_attn_weights": True,
        }  # fmt: skip
    else:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        if cfg.rope_scaling == "linear":
            rope |= {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
        elif cfg.rope_scaling == "llama3":
            rope |= {
                "rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_len,
            }  # fmt: skip
        out |= {
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "hidden_act": "silu", "rope_parameters": rope, "rope_theta": cfg.rope_theta,
            "attention_bias": False, "mlp_bias": False,
            "sliding_window": cfg.sliding_window,
            "use_sliding_window": cfg.sliding_window is not None,
        }  # fmt: skip
        if mt in ("qwen2", "qwen3"):  # Qwen's window covers the layers from this one on
            out["max_window_layers"] = 0 if cfg.sliding_window else cfg.n_layers
    if reward:
        out |= {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    if tokenizer is not None:
        out |= {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                "pad_token_id": tokenizer.pad_id}  # fmt: skip
    return out
