"""Hugging Face checkpoints in and out: GPT-2, Llama (2, 3), Mistral, Qwen2/2.5 and Qwen3.

`load_pretrained(path)` reads a local `transformers` directory (config.json, one or several
.safetensors files, tokenizer.json) into a `Transformer` (a `*ForCausalLM`) or a `ScalarModel`
(a one-label `*ForSequenceClassification`), each parameter built with
`jax.make_array_from_callback`: the callback reads, from the memory-mapped file, only the slice
that one addressable device holds, so a process never holds more than its devices' share of a
tensor on the host, and never more than one tensor's slices at a time. `save_pretrained` is the
inverse, one tensor at a time. Nothing from the directory is executed: no pickle files, no
`trust_remote_code`.

Each parameter of ours is a *view* of one HF tensor: a transpose plus splits of HF axes into
several of ours (e.g. `q_proj.weight` [N*H, D] -> `wq` [D, N, H]), possibly at an offset along
one HF axis (GPT-2's fused `c_attn` holds Q, K and V side by side). The same views drive import
(slice by slice) and export (assembling each HF tensor from its views).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import partitioning
from rlhf_jax.models.config import DTYPES, ModelConfig
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.safetensors_io import CheckpointFileError, SafetensorsFile, write_streaming
from rlhf_jax.models.transformer import Transformer

log = logging.getLogger(__name__)

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
    window = hf.get("sliding_window")
    use_window = hf.get("use_sliding_window", mt == "mistral")
    if window is not None and use_window and window < max_len:
        # Attention over at most `window` tokens equals full attention on sequences that fit
        # in the window; longer sequences are not supported, so the model says it is this long.
        log.warning("sliding_window=%d < %d: max_seq_len set to the window", window, max_len)
        max_len = window
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d // n
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
        n_kv_heads=hf.get("num_key_value_heads") or n, d_ff=hf["intermediate_size"],
        max_seq_len=max_len, pos_emb="rope", norm="rmsnorm", mlp="swiglu", use_bias=False,
        tie_embeddings=tie, norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3",
        attn_head_dim=None if head_dim * n == d else head_dim, **_rope_fields(hf), **common,
    )  # fmt: skip


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


# ------------------------------------------------------------------------------------ import


class _Tensors:
    """Tensor name -> file, over a single model.safetensors or an index of shards."""

    def __init__(self, root: Path):
        index = root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFError(f"cannot read {index}: {e}") from None
            files = {f: SafetensorsFile(root / f) for f in sorted(set(weight_map.values()))}
            self.where = {name: files[f] for name, f in weight_map.items()}
            for f in files.values():  # the index and the files must agree
                for name in f.entries:
                    if self.where.get(name) is not f:
                        raise HFError(f"tensor {name} in {f.path} is not in the index {index}")
        elif (root / "model.safetensors").is_file():
            f = SafetensorsFile(root / "model.safetensors")
            self.where = {name: f for name in f.entries}
        else:
            pickled = [p.name for p in root.glob("*.bin")] + [p.name for p in root.glob("*.pt")]
            hint = f" (found {pickled}: pickle files are never loaded; convert them to " \
                "safetensors)" if pickled else ""  # fmt: skip
            raise HFError(f"no model.safetensors or model.safetensors.index.json in {root}{hint}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def array(self, name: str) -> np.ndarray:
        return self.where[name].array(name)


def _check_tensors(tensors: _Tensors, views: Mapping[str, View], tie: bool) -> None:
    """Every view's tensor exists with the expected shape, and no tensor is left unused."""
    want: dict[str, dict[int, int]] = {}
    for v in views.values():
        ext = want.setdefault(v.hf_name, {})
        for ax, end in v.hf_extent().items():
            ext[ax] = max(ext.get(ax, 0), end)
    for name, ext in sorted(want.items()):
        if name not in tensors.where:
            raise HFError(f"missing tensor {name} in the checkpoint")
        shape = tensors.shape(name)
        expected = tuple(ext[ax] for ax in range(len(ext)))
        if shape != expected:
            raise HFError(f"tensor {name} has shape {list(shape)}, expected {list(expected)}")
    extra = [
        n
        for n in tensors.where
        if n not in want
        and not n.endswith(_BUFFERS)
        and not (tie and n == "lm_head.weight")  # a tied head some tools save anyway
    ]
    if extra:
        raise HFError(f"unexpected tensor(s) in the checkpoint: {', '.join(sorted(extra)[:10])}")


def _flat(state: Any) -> dict[str, Any]:
    from rlhf_jax.train.optim import param_path

    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {param_path(p): v for p, v in leaves}


def load_pretrained(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules=None,
    dtype: str | None = None,
) -> tuple[ModelConfig, Transformer | ScalarModel]:
    """Loads a Hugging Face checkpoint directory straight into sharded parameters.

    Args:
      path: a local directory with config.json and model.safetensors (or
        model.safetensors.index.json and its shards), as `save_pretrained` of `transformers`
        writes it. A `*ForCausalLM` becomes a `Transformer`; a one-label
        `*ForSequenceClassification` becomes a one-head `ScalarModel` (reward model).
      mesh: target mesh (default `partitioning.make_mesh()`, as gin configures it).
      rules: logical-axis rules (default `partitioning.logical_rules()`).
      dtype: parameter and compute dtype; default the checkpoint's.

    Returns:
      `(config, model)`; the tokenizer is `load_tokenizer(path)`.

    Raises:
      HFError: unsupported architecture or setting; missing, extra or mis-shaped tensor;
        unreadable files. The message names the tensor or setting.
    """
    root = Path(path).expanduser()
    hf = read_hf_config(root)
    cfg = config_from_hf(hf, dtype)
    reward = _is_reward(hf)
    views = param_views(cfg, hf["model_type"], reward=reward)
    tensors = _Tensors(root)
    _check_tensors(tensors, views, cfg.tie_embeddings)
    mesh = mesh if mesh is not None else partitioning.make_mesh()
    rules = rules if rules is not None else partitioning.logical_rules()
    side = _reward_side(root, tensors, cfg) if reward else None
    num_heads = 1 if side is None else side["head_w"].shape[1]
    cls, kwargs = (ScalarModel, {"num_heads": num_heads}) if reward else (Transformer, {})
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **kwargs))
    graphdef, state = nnx.split(abstract)
    shardings = _flat(partitioning.state_shardings(state, mesh, rules))
    pdtype = np.dtype(cfg.pdtype)

    def build(key, var):
        name = _key(key)
        sharding = shardings[name].get_value()
        shape = var.get_value().shape
        if side is not None and name in side:  # the ensemble, from the side file
            return var.replace(jax.device_put(np.asarray(side[name], pdtype), sharding))
        if name == "head_b":  # HF's score layer has no bias
            return var.replace(jax.device_put(np.zeros(shape, pdtype), sharding))
        view = views[name]
        arr = tensors.array(view.hf_name)

        def slice_for(index):
            out = np.ascontiguousarray(view.read(arr, index).astype(pdtype, copy=False))
            # On CPU jax may adopt the array's memory as the device buffer: it must own it,
            # never alias the read-only map of the file.
            return out.copy() if np.may_share_memory(out, arr) else out

        return var.replace(jax.make_array_from_callback(shape, sharding, slice_for))

    state = jax.tree_util.tree_map_with_path(
        build, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return cfg, nnx.merge(graphdef, state)


def _reward_side(root: Path, tensors: _Tensors, cfg: ModelConfig) -> dict | None:
    """The K reward heads and biases `save_pretrained` keeps beside an exported ensemble, when
    they are still consistent with the checkpoint's score layer (their mean)."""
    path = root / REWARD_SIDE_FILE
    if not path.is_file():
        return None
    f = SafetensorsFile(path)
    if set(f.entries) != {"head_w", "head_b"} or f.shape("head_w")[0] != cfg.d_model:
        raise HFError(f"{path} does not hold [d_model, K] head_w and [K] head_b")
    side = {k: np.asarray(f.array(k)) for k in ("head_w", "head_b")}
    score = np.asarray(tensors.array("score.weight"), np.float32)[0]
    mean = side["head_w"].astype(np.float32).mean(axis=1)
    if not np.allclose(mean, score, rtol=1e-2, atol=1e-4):
        log.warning("%s does not match score.weight (edited since export?): ignored", path)
        return None
    return side


def _key(path) -> str:
    from rlhf_jax.train.optim import param_path

    return param_path(path)


def load_tokenizer(path: str | os.PathLike):
    """The directory's tokenizer.json (with tokenizer_config.json's special tokens and chat
    template) as a `rlhf_jax.data.tokenizer.Tokenizer`, or None when it has none."""
    from rlhf_jax.data.tokenizer import Tokenizer

    p = Path(path).expanduser() / "tokenizer.json"
    return Tokenizer.from_file(p) if p.is_file() else None


# ------------------------------------------------------------------------------------ export

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
    return "mistral" if cfg.family == "mistral" else "llama"


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
            "attention_bias": False, "mlp_bias": False, "sliding_window": None,
            "use_sliding_window": False,
        }  # fmt: skip
    if reward:
        out |= {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    if tokenizer is not None:
        out |= {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                "pad_token_id": tokenizer.pad_id}  # fmt: skip
    return out


def _save_tokenizer(tokenizer, out: Path) -> None:
    """tokenizer.json and a tokenizer_config.json with the special tokens and chat template."""
    src = Path(tokenizer.path) if tokenizer.path else None
    if src is not None and src.is_file():
        shutil.copyfile(src, out / "tokenizer.json")
    else:
        tokenizer.backend.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {}
    if src is not None and (src.parent / "tokenizer_config.json").is_file():
        config = json.loads((src.parent / "tokenizer_config.json").read_text())
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    for role in ("bos", "eos", "pad"):
        token = getattr(tokenizer, f"{role}_token")
        if token is not None:
            config[f"{role}_token"] = token
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_pretrained(
    model: Transformer | ScalarModel,
    config: ModelConfig,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Writes `model` as a `transformers` directory, one tensor at a time.

    LoRA adapters are merged into their weights first (`lora.merged`; `lora.save_peft` writes
    them apart instead). A `Transformer` becomes `<Family>ForCausalLM` (GPT-2:
    `GPT2LMHeadModel`); a `ScalarModel` (reward model) becomes
    `<Family>ForSequenceClassification` with one label. An ensemble of K heads exports its
    mean head (the mean of linear heads is the linear head of the mean weights, so the HF
    score is the ensemble's mean score); the K heads and the biases
    (`transformers` score layers have none, so HF scores lack the constant mean bias, which
    Bradley-Terry preferences do not see) go to `reward_heads.safetensors` beside it, and
    `load_pretrained` restores them. The folder is written under a temporary name and renamed
    when complete. In a multi-process job every process must call it (the parameters are
    gathered tensor by tensor); process 0 writes.

    Args:
      model: the model to export (its parameters may be sharded).
      config: its `ModelConfig`.
      path: the output directory.
      tokenizer: a `rlhf_jax.data.tokenizer.Tokenizer` to write beside it (tokenizer.json,
        tokenizer_config.json with the chat template); its special ids go into config.json.
      overwrite: replace an existing non-empty `path` (otherwise HFError).

    Returns:
      The output directory.
    """
    out = Path(path).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HFError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    if config.lora_rank:  # a plain checkpoint: adapters merged into their weights
        from rlhf_jax.models import lora

        config, model = lora.merged(model, config)
    reward = isinstance(model, ScalarModel)
    views = param_views(config, hf_model_type(config), reward=reward)
    hfc = hf_config(config, reward=reward, tokenizer=tokenizer)
    params = _flat(nnx.state(model, nnx.Param))
    dtype = np.dtype(config.pdtype)
    by_name: dict[str, list[tuple[str, View]]] = {}
    for ours, view in views.items():
        by_name.setdefault(view.hf_name, []).append((ours, view))
    specs = []
    for name, vs in by_name.items():
        ext: dict[int, int] = {}
        for _, v in vs:
            for ax, end in v.hf_extent().items():
                ext[ax] = max(ext.get(ax, 0), end)
        specs.append((name, tuple(ext[a] for a in range(len(ext))), dtype))

    def host(ours: str) -> np.ndarray:
        value = partitioning.to_host(params[ours].get_value())
        if ours == "head_w":  # the ensemble's mean head
            value = value.astype(np.float32).mean(axis=1, keepdims=True)
        return value.astype(dtype)

    def produce(name: str) -> np.ndarray:
        shape = next(s for n, s, _ in specs if n == name)
        arr = np.zeros(shape, dtype)
        for ours, view in by_name[name]:
            view.write(arr, host(ours))
        return arr

    def write(tmp: Path) -> None:
        write_streaming(tmp / "model.safetensors", specs, produce, {"format": "pt"})
        if reward:
            w = partitioning.to_host(params["head_w"].get_value())
            b = partitioning.to_host(params["head_b"].get_value())
            side = [("head_w", w.shape, w.dtype), ("head_b", b.shape, b.dtype)]
            write_streaming(tmp / REWARD_SIDE_FILE, side, {"head_w": w, "head_b": b}.get)
            hfc["rlhf_jax"] = {
                "reward_heads": int(w.shape[1]),
                "score_bias": float(np.mean(b.astype(np.float32))),
                "side_file": REWARD_SIDE_FILE,
            }
        (tmp / "config.json").write_text(json.dumps(hfc, indent=2))
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp)

    if jax.process_index() != 0:  # gather in step with process 0, write nothing
        for name, _, _ in specs:
            produce(name)
        if reward:
            partitioning.to_host(params["head_w"].get_value())
            partitioning.to_host(params["head_b"].get_value())
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
