"""Deterministic synthetic SFT batches for tests, smoke runs and benchmarks (no files needed).

Each row is `[bos] prompt completion [eos] pad...` in the SFT batch format. The prompt is an
arithmetic progression modulo the vocabulary with a random start and stride; the completion
continues it, so a model can learn to predict the completion from the prompt and the loss falls
quickly. Batch `i` depends only on `(seed, i)`, which makes the iterator's position (one integer)
its whole state: `state_dict()` / `load_state_dict()` resume it exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

PAD, BOS, EOS, FIRST_TOKEN = 0, 1, 2, 3


def synthetic_sft_batch(
    rng: np.random.Generator, rows: int, seq_len: int, vocab_size: int
) -> dict[str, np.ndarray]:
    """One host batch: `input_ids`, `attention_mask`, `loss_mask` ([rows, seq_len] int32)."""
    if vocab_size <= FIRST_TOKEN + 1 or seq_len < 6:
        raise ValueError(f"need vocab_size > 4 and seq_len >= 6, got {vocab_size}, {seq_len}")
    span = vocab_size - FIRST_TOKEN
    ids = np.full((rows, seq_len), PAD, np.int32)
    attn = np.zeros((rows, seq_len), np.int32)
    loss = np.zeros((rows, seq_len), np.int32)
    for r in range(rows):
        length = int(rng.integers(seq_len // 2, seq_len + 1))  # bos .. eos inclusive
        prompt_len = int(rng.integers(2, max(3, length // 2)))
        start, stride = int(rng.integers(0, span)), int(rng.integers(1, 4))
        body = FIRST_TOKEN + (start + stride * np.arange(length - 2)) % span
        ids[r, 0], ids[r, 1 : length - 1], ids[r, length - 1] = BOS, body, EOS
        attn[r, :length] = 1
        loss[r, 1 + prompt_len : length] = 1  # completion tokens and the final eos
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


class SyntheticSFTIterator(Iterator):
    """Endless synthetic SFT batches; this process's rows only (global batch / processes)."""

    def __init__(self, batch_size: int, seq_len: int, vocab_size: int, seed: int = 0):
        if batch_size % jax.process_count():
            raise ValueError(f"batch {batch_size} not divisible by {jax.process_count()} processes")
        self.rows = batch_size // jax.process_count()
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed
        self.index = 0

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.index, jax.process_index()])
        self.index += 1
        return synthetic_sft_batch(rng, self.rows, self.seq_len, self.vocab_size)

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def check_state_dict(self, state: Any, batches: int | None = None) -> None:
        """Raises ValueError unless `state` is {"index": n >= 0} (n == batches when given)."""
        index = state.get("index") if isinstance(state, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ValueError(f"synthetic iterator state {state!r} is malformed")
        if batches is not None and index != batches:
            raise ValueError(f"synthetic iterator state {state!r} is not after {batches} batches")

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.check_state_dict(state)
        self.index = int(state["index"])


def synthetic_eval_batches(
    batch_size: int, seq_len: int, vocab_size: int, num_rows: int, seed: int = 10_000
) -> list[dict[str, np.ndarray]]:
    """A fixed eval split of `num_rows` rows in batches of `batch_size`; the last batch is
    padded with all-padding rows marked `valid = 0`."""
    rng = np.random.default_rng([seed, jax.process_index()])
    local = batch_size // jax.process_count()
    rows = synthetic_sft_batch(rng, num_rows, seq_len, vocab_size)
    batches = []
    for lo in range(0, num_rows, local):
        part = {k: v[lo : lo + local] for k, v in rows.items()}
        n = len(part["input_ids"])
        if n < local:
            part = {k: np.pad(v, ((0, local - n), (0, 0))) for k, v in part.items()}
        part["valid"] = (np.arange(local) < n).astype(np.int32)
        batches.append(part)
    return batches
