"""Tiny randomly initialised `transformers` checkpoints of every supported family, for the
import/export tests (written on CPU; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 96
PAD = 0

# One tiny config per family: GQA with ratios 1 (MHA), 2, 3 (not a power of two) and 4; tied
# and untied embeddings; Qwen2's q/k/v biases; Qwen3's q/k norms and a head_dim that is not
# hidden/heads; Llama-3 RoPE scaling whose band edges fall inside the tested positions; a
# sliding attention window. A key's family is the part before any "_".
FAMILIES = {
    "gpt2": dict(n_embd=48, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True),
    "llama": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=16,
        ),
    ),
    # Llama 2's layout: multi-head attention (no GQA), untied, and linear RoPE scaling.
    "llama_2": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    ),
    "mistral": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
        sliding_window=None,
    ),
    # Mistral's sliding-window attention with a window (4) shorter than the tested sequences
    # (12 tokens; 7-token prompts plus 16 decoded) and GQA ratio 2.
    "mistral_window": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False,
        sliding_window=4,
    ),
    "qwen2": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
    ),
    "qwen3": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
        head_dim=16, intermediate_size=64, max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
}  # fmt: skip


def hf_family(key: str) -> str:
    """The `model_type` of a `FAMILIES` key (`mistral_window` -> `mistral`)."""
    return key.split("_")[0]


def hf_classes(family: str):
    """(config class, causal LM class, sequence classification class) of a family."""
    import transformers as tr

    family = hf_family(family)
    prefix = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
              "qwen3": "Qwen3"}[family]  # fmt: skip
    head = "LMHeadModel" if family == "gpt2" else "ForCausalLM"
    return (
        getattr(tr, f"{prefix}Config"),
        getattr(tr, f"{prefix}{head}"),
        getattr(tr, f"{prefix}ForSequenceClassification"),
    )


def make_hf_model(family: str, *, reward: bool = False, seed: int = 0):
    """A random tiny `transformers` model of `family` in fp32 eval mode, every parameter
    (norm scales and biases too) perturbed so that a wrong mapping shows in the logits."""
    import torch

    cfg_cls, lm_cls, cls_cls = hf_classes(family)
    kwargs = dict(FAMILIES[family], vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1,
                  eos_token_id=2)  # fmt: skip
    if reward:
        kwargs["num_labels"] = 1
    cfg = cfg_cls(**kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = (cls_cls if reward else lm_cls)(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save_hf_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def padded_batch(rng: np.random.Generator, lengths, width: int, side: str):
    """(ids, mask) [B, width] with rows of `lengths` real tokens padded on `side`."""
    ids = np.full((len(lengths), width), PAD, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        toks = rng.integers(3, VOCAB, n)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, sl], mask[i, sl] = toks, 1
    return ids, mask


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """The position ids `transformers` generate derives from a padded mask."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def hf_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(hf_positions(mask)),
        )
    return out.logits.float().numpy()
