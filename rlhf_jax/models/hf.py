"""Hugging Face checkpoints in and out: GPT-2, Llama (2, 3), Mistral, Qwen2/2.5 and Qwen3.

`load_pretrained(path)` reads a local `transformers` directory (config.json, one or several
.safetensors files, tokenizer.json) into a `Transformer` (a `*ForCausalLM`) or a `ScalarModel`
(a one-label `*ForSequenceClassification`), each parameter built with
`jax.make_array_from_callback`: the callback reads, from the memory-mapped file, only the slice
that one addressable device holds, so a process never holds more than its devices' share of a
tensor on the host, and never more than one tensor's slices at a time. `save_pretrained` is the
inverse, one tensor at a time. Nothing from the directory is executed: no pickle files, no
`trust_remote_code`.

Each parameter of ours is a view of one HF tensor (`hf_layout.View`, which also holds the
config.json mapping); the same views drive import (slice by slice) and export (assembling each
HF tensor from its views).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import partitioning
from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.hf_layout import (  # noqa: F401  (public names of this module too)
    _BUFFERS,
    REWARD_SIDE_FILE,
    SUPPORTED,
    HFError,
    View,
    _is_reward,
    config_from_hf,
    hf_config,
    hf_model_type,
    is_hf_dir,
    param_views,
    read_hf_config,
)
from rlhf_jax.models.param_paths import by_path, param_path
from rlhf_jax.models.safetensors_io import SafetensorsFile, write_streaming
from rlhf_jax.models.transformer import Transformer

log = logging.getLogger(__name__)

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

        self.stored = {name: name for name in self.where}  # our name -> name in the file

    def add_prefix(self, prefix: str, unprefixed: tuple[str, ...]) -> None:
        """Names as `transformers` saves a model with its head, for files saved from the bare
        base model or by older versions (the original GPT-2 checkpoint has `h.0...`, not
        `transformer.h.0...`), when no tensor carries the prefix yet."""
        if any(n.startswith(prefix) for n in self.where):
            return
        rename = {n: n if n in unprefixed else prefix + n for n in self.where}
        self.where = {rename[n]: f for n, f in self.where.items()}
        self.stored = {rename[n]: n for n in self.stored}

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(self.stored[name])

    def array(self, name: str) -> np.ndarray:
        return self.where[name].array(self.stored[name])


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
    prefix = "transformer." if hf["model_type"] == "gpt2" else "model."
    tensors.add_prefix(prefix, ("lm_head.weight", "score.weight"))
    _check_tensors(tensors, views, cfg.tie_embeddings)
    mesh = mesh if mesh is not None else partitioning.make_mesh()
    rules = rules if rules is not None else partitioning.logical_rules()
    side = _reward_side(root, tensors, cfg) if reward else None
    num_heads = 1 if side is None else side["head_w"].shape[1]
    cls, kwargs = (ScalarModel, {"num_heads": num_heads}) if reward else (Transformer, {})
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **kwargs))
    graphdef, state = nnx.split(abstract)
    shardings = by_path(partitioning.state_shardings(state, mesh, rules))
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
    return param_path(path)


def load_tokenizer(path: str | os.PathLike):
    """The directory's tokenizer.json (with tokenizer_config.json's special tokens and chat
    template) as a `rlhf_jax.data.tokenizer.Tokenizer`, or None when it has none."""
    from rlhf_jax.data.tokenizer import Tokenizer

    p = Path(path).expanduser() / "tokenizer.json"
    return Tokenizer.from_file(p) if p.is_file() else None


# ------------------------------------------------------------------------------------ export


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

    LoRA adapters are merged into their weights first (`merge_lora`; `save_peft` writes
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
        config, model = merge_lora(model, config)
    reward = isinstance(model, ScalarModel)
    views = param_views(config, hf_model_type(config), reward=reward)
    hfc = hf_config(config, reward=reward, tokenizer=tokenizer)
    params = by_path(nnx.state(model, nnx.Param))
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


# ------------------------------------------------------------------------------------ LoRA


def merge_lora(model, cfg: ModelConfig):
    """`(config, model)` without adapters whose weights are W + scale * A . B (fp32 sum, cast
    back to the parameter dtype): the same function as the adapted model (what a merged
    export writes)."""
    base_cfg = dataclasses.replace(cfg, lora_rank=0)
    flat = {k: v.get_value() for k, v in by_path(nnx.state(model, nnx.Param)).items()}
    if isinstance(model, ScalarModel):
        cls, kwargs = ScalarModel, {"num_heads": model.num_heads}
    else:
        cls, kwargs = Transformer, {}
    abstract = nnx.eval_shape(lambda: cls(base_cfg, rngs=nnx.Rngs(0), **kwargs))
    graphdef, state = nnx.split(abstract)

    def value(path, var):
        name = param_path(path)
        w = flat[name]
        if f"{name}_lora_a" in flat:
            a, b = flat[f"{name}_lora_a"], flat[f"{name}_lora_b"]
            delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
            w = (w.astype(jnp.float32) + cfg.lora_scale * delta).astype(w.dtype)
        return var.replace(w)

    state = jax.tree_util.tree_map_with_path(
        value, state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return base_cfg, nnx.merge(graphdef, state)


# GPT-2 (transformers' Conv1D layers, [in, out]): our projection -> its module. Q, K and V share
# the fused `c_attn`, whose output columns are Q, K, V side by side.
GPT2_MODULES = {"attn/wo": "attn.c_proj", "mlp/wi": "mlp.c_fc", "mlp/wo": "mlp.c_proj"}
_QKV = ("attn/wq", "attn/wk", "attn/wv")


def _peft_tensors(flat: dict[str, Any], cfg: ModelConfig, gpt2: bool):
    """{module name: (lora_A [r', in], lora_B [out, r'])} in PEFT's orientation.

    On GPT-2, the adapters of Q, K and V (each [d, r] and [r, N, H]) become one adapter of
    `c_attn` of rank r * (number of adapted projections): A stacks their A matrices, B places
    each B in its projection's block of c_attn's output, zeros elsewhere. The product B A is
    exactly the sum of the separate updates, so the PEFT model computes the same function.
    """

    def host(name):
        return np.asarray(partitioning.to_host(flat[name].get_value()), np.float32)

    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    fused: dict[str, list] = {}
    for name in sorted(flat):
        m = re.fullmatch(r"blocks/(\d+)/((?:attn|mlp)/w[a-z]+)_lora_a", name)
        if not m:
            continue
        layer, proj = m.groups()
        a, b = host(name), host(name[: -len("a")] + "b")
        r = a.shape[-1]
        a_t, b_t = a.reshape(-1, r).T, b.reshape(r, -1).T  # [r, in], [out, r]
        if gpt2 and proj in _QKV:
            fused.setdefault(f"transformer.h.{layer}.attn.c_attn", []).append((proj, a_t, b_t))
        elif gpt2:
            out[f"transformer.h.{layer}.{GPT2_MODULES[proj]}"] = (a_t, b_t)
        else:
            out[f"model.layers.{layer}.{lora.HF_MODULES[proj]}"] = (a_t, b_t)
    d = cfg.d_model
    for module, parts in fused.items():
        a = np.concatenate([a_t for _, a_t, _ in parts], axis=0)
        b = np.zeros((3 * d, a.shape[0]), np.float32)
        for i, (proj, _, b_t) in enumerate(parts):
            j, r = _QKV.index(proj), b_t.shape[1]
            b[j * d : (j + 1) * d, i * r : (i + 1) * r] = b_t
        out[module] = (a, b)
    return out


def save_peft(
    model, cfg: ModelConfig, path: str | os.PathLike, *, base_model: str | None = None
) -> Path:
    """Writes the adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

    Tensor names follow PEFT's saved LoRA models
    (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` [r, in] and `lora_B`
    [out, r]); `target_modules` lists the adapted modules' full names, so adapters on some
    layers only are described exactly. GPT-2 adapters go on its Conv1D modules
    (`fan_in_fan_out`), Q, K and V together on `c_attn` with a larger rank (`_peft_tensors`),
    recorded in `rank_pattern` and `alpha_pattern` so that PEFT's scale alpha / r stays ours.

    In a multi-process job every process must call it (the adapters are gathered); process 0
    writes.

    Args:
      model: a `Transformer` with adapters.
      cfg: its config.
      path: the output directory (replaced atomically).
      base_model: `base_model_name_or_path` to record (the HF directory of the base).
    """
    gpt2 = hf_model_type(dataclasses.replace(cfg, lora_rank=0)) == "gpt2"
    adapters = _peft_tensors(by_path(nnx.state(model, nnx.Param)), cfg, gpt2)
    if not adapters:
        raise HFError("the model has no LoRA adapters to export")
    dtype = np.dtype(cfg.pdtype)
    tensors: dict[str, np.ndarray] = {}
    rank_pattern, alpha_pattern = {}, {}
    for module, (a, b) in sorted(adapters.items()):
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.astype(dtype))
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.astype(dtype))
        if a.shape[0] != cfg.lora_rank:  # a fused GPT-2 c_attn adapter
            rank_pattern[re.escape(module)] = a.shape[0]
            alpha_pattern[re.escape(module)] = cfg.lora_scale * a.shape[0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(adapters), "bias": "none", "fan_in_fan_out": gpt2,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "base_model_name_or_path": base_model,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
    }  # fmt: skip
    out = Path(path).expanduser()
    if jax.process_index() != 0:  # every process gathered the adapters above; process 0 writes
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
        write_streaming(tmp / "adapter_model.safetensors", specs, tensors.get, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
