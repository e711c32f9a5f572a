"""Export to Hugging Face: `transformers` loads what `save_pretrained` writes with the same
logits (policies) or the ensemble's mean score (reward models); import -> export -> import is
exact; bad checkpoints fail with an error naming the tensor or setting."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch  # noqa: E402
import transformers  # noqa: F401  (test extra: a missing install fails, never skips)
from flax import nnx

from rlhf_jax import partitioning  # noqa: E402
from rlhf_jax.models import ScalarModel, Transformer, hf, model_config  # noqa: E402
from rlhf_jax.models.param_paths import by_path
from rlhf_jax.models.safetensors_io import SafetensorsFile  # noqa: E402
from tests.models.hf_helpers import (  # noqa: E402
    FAMILIES,
    hf_logits,
    make_hf_model,
    padded_batch,
)


@pytest.fixture(scope="module")
def mesh():
    return partitioning.make_mesh((1, 4, 2))


def _params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.get_value()) for k, v in by_path(nnx.state(model, nnx.Param)).items()}


def _tensors(path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path / "model.safetensors")
    return {k: np.asarray(f.array(k)) for k in f.entries}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_export_import_is_exact(family, tmp_path, mesh):
    model = make_hf_model(family)
    model.save_pretrained(tmp_path / "hf")
    cfg, ours = hf.load_pretrained(tmp_path / "hf", mesh=mesh)
    hf.save_pretrained(ours, cfg, tmp_path / "out")
    # Same tensors, bit for bit (GPT-2's tied checkpoint carries no lm_head either way).
    original, exported = _tensors(tmp_path / "hf"), _tensors(tmp_path / "out")
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    assert type(reloaded) is type(model)
    ids, mask = padded_batch(np.random.default_rng(0), [9, 4], 9, "left")
    real = mask.astype(bool)
    np.testing.assert_array_equal(
        hf_logits(reloaded, ids, mask)[real], hf_logits(model, ids, mask)[real]
    )
    cfg2, again = hf.load_pretrained(tmp_path / "out", mesh=mesh)
    assert cfg2 == cfg
    a, b = _params(ours), _params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_native_model_exports_with_same_logits(preset, tmp_path):
    cfg = model_config(preset, vocab_size=96)
    ours = Transformer(cfg, rngs=nnx.Rngs(3))
    hf.save_pretrained(ours, cfg, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    ids, mask = padded_batch(np.random.default_rng(1), [10, 6, 10], 10, "right")
    want = np.asarray(ours(jax.numpy.asarray(ids), jax.numpy.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(hf_logits(theirs, ids, mask)[real], want[real], atol=1e-4, rtol=0)


def test_reward_ensemble_exports_mean_head_and_round_trips(tmp_path, mesh):
    cfg = model_config("llama-tiny", vocab_size=96)
    ours = ScalarModel(cfg, rngs=nnx.Rngs(4), num_heads=3)
    ours.head_b.set_value(jax.numpy.asarray([0.5, -1.0, 2.0]))
    hf.save_pretrained(ours, cfg, tmp_path / "rm")
    info = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert info["rlhf_jax"]["reward_heads"] == 3
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert theirs.config.num_labels == 1
    theirs.config.pad_token_id = 0  # exported without a tokenizer: no pad id in config.json
    ids, mask = padded_batch(np.random.default_rng(2), [8, 8], 8, "right")
    with torch.no_grad():
        score = theirs.eval()(input_ids=torch.as_tensor(ids)).logits[:, 0].numpy()
    mine = np.asarray(ours(jax.numpy.asarray(ids), jax.numpy.asarray(mask)))  # [B, 3]
    np.testing.assert_allclose(score, mine.mean(-1) - np.mean([0.5, -1.0, 2.0]), atol=1e-4)
    cfg2, again = hf.load_pretrained(tmp_path / "rm", mesh=mesh)
    assert isinstance(again, ScalarModel) and again.num_heads == 3
    a, b = _params(ours), _params(again)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    make_hf_model("qwen2").save_pretrained(path)
    return path


def _rewrite(src, dst, edit):
    """A copy of checkpoint `src` whose tensors dict went through `edit`."""
    from rlhf_jax.models.safetensors_io import write_streaming

    shutil.copytree(src, dst)
    tensors = edit(_tensors(src))
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_streaming(dst / "model.safetensors", specs, tensors.get, {"format": "pt"})
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.self_attn.k_proj.bias"},
         "missing tensor model.layers.1.self_attn.k_proj.bias"),
        (lambda t: {**t, "model.layers.0.extra.weight": np.zeros(3, np.float32)},
         "unexpected tensor(s) in the checkpoint: model.layers.0.extra.weight"),
        (lambda t: {**t, "model.norm.weight": np.ones(47, np.float32)},
         "tensor model.norm.weight has shape [47], expected [48]"),
    ],
)  # fmt: skip
def test_bad_tensors_are_named(qwen2_dir, tmp_path, edit, message, mesh):
    bad = _rewrite(qwen2_dir, tmp_path / "bad", edit)
    with pytest.raises(hf.HFError) as e:
        hf.load_pretrained(bad, mesh=mesh)
    assert message in str(e.value)


def test_unsupported_architecture_and_pickles_are_refused(qwen2_dir, tmp_path, mesh):
    shutil.copytree(qwen2_dir, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg | {"model_type": "falcon"}))
    with pytest.raises(hf.HFError, match="unsupported model_type 'falcon'"):
        hf.load_pretrained(tmp_path / "a", mesh=mesh)
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg | {"hidden_act": "gelu"}))
    with pytest.raises(hf.HFError, match="hidden_act='gelu'"):
        hf.load_pretrained(tmp_path / "a", mesh=mesh)
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "a" / "model.safetensors").rename(tmp_path / "a" / "pytorch_model.bin")
    with pytest.raises(hf.HFError, match="pickle files are never loaded"):
        hf.load_pretrained(tmp_path / "a", mesh=mesh)


def test_sharded_checkpoint_loads_each_slice(tmp_path, mesh, monkeypatch):
    """A checkpoint split over several files (model.safetensors.index.json) loads the same,
    and every read is one device's block, never a whole sharded tensor."""
    model = make_hf_model("llama")
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="20KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    _, a = hf.load_pretrained(tmp_path / "one", mesh=mesh)
    reads = []
    read = hf.View.read

    def spy(self, arr, index):
        out = read(self, arr, index)
        reads.append((self.hf_name, out.shape))
        return out

    monkeypatch.setattr(hf.View, "read", spy)
    _, b = hf.load_pretrained(tmp_path / "many", mesh=mesh)
    q = [shape for name, shape in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    assert q == [(48 // 4, 6 // 2, 8)] * 8  # [D, N, H] over fsdp=4 x tensor=2
    pa, pb = _params(a), _params(b)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    sharding = nnx.state(b, nnx.Param)["blocks"][0]["attn"]["wq"].get_value().sharding
    assert sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_tokenizer_and_chat_template_travel_with_the_model(tmp_path):
    """save_pretrained writes the tokenizer with its special tokens and chat template, which
    `transformers` applies and `load_tokenizer` reads back."""
    import tokenizers

    from rlhf_jax.data.tokenizer import Tokenizer

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "user:", "assistant:", "hello", "there"]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    src = tmp_path / "tok"
    src.mkdir()
    backend.save(str(src / "tokenizer.json"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = Tokenizer.from_file(src)
    cfg = model_config("llama-tiny", vocab_size=len(words))
    hf.save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path / "out", tokenizer=tok)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "there"}]
    assert theirs.apply_chat_template(chat, tokenize=False) == "user: hello assistant: there "
    assert theirs.pad_token == "<pad>" and theirs.eos_token == "<eos>"
    back = hf.load_tokenizer(tmp_path / "out")
    assert back.chat_template == template and (back.bos_id, back.eos_id, back.pad_id) == (1, 2, 0)


def test_unprefixed_gpt2_checkpoint_with_buffers_loads(tmp_path, mesh):
    """The original GPT-2 checkpoint's layout: no `transformer.` prefix, causal-mask buffers."""
    model = make_hf_model("gpt2")
    model.save_pretrained(tmp_path / "hf")

    def old_layout(t):
        out = {k.removeprefix("transformer."): v for k, v in t.items()}
        out["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        return out

    old = _rewrite(tmp_path / "hf", tmp_path / "old", old_layout)
    _, a = hf.load_pretrained(tmp_path / "hf", mesh=mesh)
    _, b = hf.load_pretrained(old, mesh=mesh)
    pa, pb = _params(a), _params(b)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_sliding_window_settings_map_both_ways():
    """Mistral's window, Qwen's `use_sliding_window` (all layers from `max_window_layers` on)
    and `layer_types` map onto `sliding_window`; a window on some layers only is refused; the
    exported config.json makes `transformers` window every layer."""
    base = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64,
                max_position_embeddings=128)  # fmt: skip
    mistral = hf.config_from_hf(base | {"model_type": "mistral", "sliding_window": 8})
    assert mistral.sliding_window == 8 and mistral.max_seq_len == 128
    off = hf.config_from_hf(base | {"model_type": "mistral", "sliding_window": None})
    assert off.sliding_window is None
    qwen = base | {"model_type": "qwen2", "sliding_window": 8}
    assert hf.config_from_hf(qwen).sliding_window is None  # use_sliding_window defaults off
    on = qwen | {"use_sliding_window": True}
    assert hf.config_from_hf(on | {"max_window_layers": 0}).sliding_window == 8
    assert hf.config_from_hf(on | {"max_window_layers": 2}).sliding_window is None
    with pytest.raises(hf.HFError, match="some layers only"):
        hf.config_from_hf(on | {"max_window_layers": 1})
    with pytest.raises(hf.HFError, match="some layers only"):
        hf.config_from_hf(qwen | {"layer_types": ["full_attention", "sliding_attention"]})
    for mt, cls in (("qwen2", transformers.Qwen2Config), ("mistral", transformers.MistralConfig)):
        window = {"sliding_window": 8, "use_sliding_window": True, "max_window_layers": 0}
        cfg = hf.config_from_hf(base | {"model_type": mt} | window)
        out = hf.hf_config(cfg)
        assert out["model_type"] == mt and out["sliding_window"] == 8
        theirs = cls(**{k: v for k, v in out.items() if k != "model_type"})
        assert theirs.sliding_window == 8
        if mt == "qwen2":
            assert theirs.layer_types == ["sliding_attention"] * 2
        assert hf.config_from_hf(out) == cfg
    # A Llama-shaped model with a window exports as Mistral (Llama has none).
    llama = model_config("llama-tiny", sliding_window=16)
    assert hf.hf_model_type(llama) == "mistral"


def test_chat_template_saved_by_transformers_is_read(tmp_path):
    """`transformers` saves a tokenizer's chat template as chat_template.jinja (not in
    tokenizer_config.json): `load_tokenizer` reads it, and an export carries it on."""
    import tokenizers

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "user", "hi"]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    theirs.chat_template = template
    theirs.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "chat_template.jinja").is_file()
    tok = hf.load_tokenizer(tmp_path / "tok")
    assert tok.chat_template == template and tok.eos_id == 2
    cfg = model_config("llama-tiny", vocab_size=len(words))
    hf.save_pretrained(Transformer(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path / "out", tokenizer=tok)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    chat = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(chat, tokenize=False) == "user hi "


def test_bad_hf_path_is_a_user_error(qwen2_dir, tmp_path, capsys):
    """`rlhf-jax train ... --gin.HF_PATH=` on a directory that cannot be imported: exit code 2
    and one message naming the problem, before any training."""
    import gin

    from rlhf_jax import cli

    shutil.copytree(qwen2_dir, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config | {"model_type": "falcon"}))
    cases = [(tmp_path / "hf", "unsupported model_type 'falcon'"),
             (tmp_path / "none", "is not a Hugging Face model directory")]  # fmt: skip
    for path, message in cases:
        gin.clear_config()
        argv = ["train", "--gin_file", "gin/experiments/dpo_reviews_tiny.gin",
                "--gin_file", "gin/models/hf.gin", f"--gin.HF_PATH={path}",
                f"--gin.HF_IMPORT_DIR={tmp_path / 'imports'}", f"--gin.RUN_DIR={tmp_path / 'run'}",
                f"--gin.PREFERENCES={tmp_path / 'prefs'}", "--log_level=WARNING"]  # fmt: skip
        try:
            assert cli.main(argv) == 2
        finally:
            gin.clear_config()
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "imports").exists()
