"""Static-shape batches: length buckets, collation into numpy batch dicts, and the resumable,
multi-host-aware `BatchIterator`.

Batch layouts (numpy; int32 unless stated; B = the per-process batch size):

* SFT (right-padded `[bos] prompt completion [eos] pad...`):
  `input_ids` [B,T], `attention_mask` [B,T] (1 real, 0 pad), `loss_mask` [B,T] (1 where
  `input_ids[t]` is a completion token or the final EOS, i.e. a target predicted from t-1;
  0 on BOS, prompt and pad).
* Preference: `chosen_input_ids`, `chosen_attention_mask`, `chosen_loss_mask`,
  `rejected_input_ids`, `rejected_attention_mask`, `rejected_loss_mask` (all [B,T]; both sides
  padded to the same bucket T), `margin` [B] float32 (0 when the data has none), and each
  extra field the rows carry as [B] float32 (NaN on padding rows).
* Prompts (LEFT-padded for generation: `pad... [bos] prompt`): `prompt_ids` [B,P],
  `prompt_mask` [B,P], and `prompt_text`, a numpy object array [B] of the raw prompt strings
  (host-only: drop it with `device_fields` before sending a batch to devices).
* Every batch also has `valid` [B] (1 for a real row, 0 for a padding row). Padding rows appear
  only in the last batch of a pass when `drop_last=False` (the eval mode); all their masks are
  0, their ids are pad and their `prompt_text` is "".

T (or P) is the smallest bucket that fits the longest row of the *global* batch, so every
process agrees on the shape and a step compiles at most once per bucket.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rlhf_jax.data.errors import DataError

Batch = dict[str, np.ndarray]
CollateFn = Callable[[Sequence[Any], int], Batch]


def pick_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length.

    Raises:
      DataError: the length exceeds the largest bucket.
    """
    buckets = sorted(buckets)
    k = bisect.bisect_left(buckets, length)
    if k == len(buckets):
        raise DataError(f"a row of length {length} exceeds the largest bucket {buckets[-1]}")
    return buckets[k]


def _right_pad(rows, prefix: str, length: int, pad_id: int) -> Batch:
    n = len(rows)
    ids = np.full((n, length), pad_id, dtype=np.int32)
    attn = np.zeros((n, length), dtype=np.int32)
    loss = np.zeros((n, length), dtype=np.int32)
    for b, row in enumerate(rows):
        if row is None:
            continue
        seq = row[f"{prefix}input_ids"]
        ids[b, : len(seq)] = seq
        attn[b, : len(seq)] = 1
        loss[b, row[f"{prefix}completion_start"] : len(seq)] = 1
    return {
        f"{prefix}input_ids": ids,
        f"{prefix}attention_mask": attn,
        f"{prefix}loss_mask": loss,
    }


def collate_sft(rows: Sequence[dict | None], length: int, *, pad_id: int) -> Batch:
    """SFT rows -> input_ids/attention_mask/loss_mask [B, length] (None rows = padding)."""
    return _right_pad(rows, "", length, pad_id)


def collate_preference(
    rows: Sequence[dict | None], length: int, *, pad_id: int, extras: Sequence[str] = ()
) -> Batch:
    """Preference rows -> chosen_*/rejected_* [B, length], margin [B] float32 and each of
    `extras` [B] float32, in row order (NaN on padding rows: no value, not a zero)."""
    out = _right_pad(rows, "chosen_", length, pad_id)
    out.update(_right_pad(rows, "rejected_", length, pad_id))
    out["margin"] = np.asarray(
        [0.0 if r is None else r["margin"] for r in rows], dtype=np.float32
    ).reshape(len(rows))
    for name in extras:
        out[name] = np.asarray([np.nan if r is None else r[name] for r in rows], np.float32)
    return out


def collate_prompts(rows: Sequence[dict | None], length: int, *, pad_id: int) -> Batch:
    """Prompt rows -> LEFT-padded prompt_ids/prompt_mask [B, length], prompt_text [B] object."""
    n = len(rows)
    ids = np.full((n, length), pad_id, dtype=np.int32)
    mask = np.zeros((n, length), dtype=np.int32)
    text = np.empty((n,), dtype=object)
    for b, row in enumerate(rows):
        if row is None:
            text[b] = ""
            continue
        seq = row["prompt_ids"]
        ids[b, length - len(seq) :] = seq
        mask[b, length - len(seq) :] = 1
        text[b] = row["prompt_text"]
    return {"prompt_ids": ids, "prompt_mask": mask, "prompt_text": text}


def device_fields(batch: Batch) -> Batch:
    """The batch without host-only fields (object arrays such as `prompt_text`)."""
    return {k: v for k, v in batch.items() if v.dtype != object}


class BatchIterator:
    """Iterates static-shape numpy batches over tokenised examples, resumably.

    Order: epoch e visits the examples in `permutation(seed, e)` (or in order when
    shuffle=False). The global batch is the next `batch_size` examples of that order; process p
    of P receives the contiguous rows [p*B/P, (p+1)*B/P) of it, collated to the bucket that
    fits the global batch's longest row, so all processes produce equal shapes.

    Modes:
      * train (defaults): shuffled, repeating forever, incomplete last batches dropped.
      * eval (`BatchIterator.for_eval`): in order, one pass, the last batch filled to
        `batch_size` with padding rows whose masks are all zero and whose `valid` is 0. A
        non-repeating iterator rewinds when exhausted and whenever `iter()` is called on
        it, so every `for` loop is one full pass.

    Args:
      examples: a `TokenizedDataset` (or any sequence of rows, with `lengths` given).
      batch_size: the GLOBAL batch size B, divisible by `process_count`.
      buckets: allowed padded lengths; every row must fit the largest.
      seed: shuffling seed.
      collate_fn: (rows, length) -> batch dict; defaults to `examples.collate`.
      shuffle: shuffle each epoch.
      drop_last: drop an incomplete last batch (else pad it and mark it in `valid`).
      process_index, process_count: this process's slice of every global batch.
      repeat: start a new epoch after the last batch (else stop).
      lengths: per-row lengths when `examples` has no `lengths` attribute.

    Raises:
      DataError: empty data, fewer rows than a batch with drop_last, a row longer than the
        largest bucket, or batch_size not divisible by process_count.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        batch_size: int,
        buckets: Sequence[int],
        seed: int = 0,
        collate_fn: CollateFn | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        repeat: bool = True,
        lengths: Sequence[int] | None = None,
    ):
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise DataError(f"bad process_index={process_index} / process_count={process_count}")
        if batch_size % process_count:
            raise DataError(
                f"global batch_size={batch_size} is not divisible by process_count="
                f"{process_count}; each process must get the same number of rows"
            )
        if not buckets:
            raise DataError("buckets must name at least one length")
        self.examples = examples
        self.batch_size = batch_size
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.seed = int(seed)
        self.collate_fn = collate_fn if collate_fn is not None else examples.collate
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.process_index = process_index
        self.process_count = process_count
        self.repeat = repeat
        lengths = getattr(examples, "lengths", None) if lengths is None else lengths
        if lengths is None:
            raise DataError("examples have no `lengths`; pass lengths=")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        n = len(examples)
        if len(self.lengths) != n:
            raise DataError(f"{len(self.lengths)} lengths for {n} examples")
        if n == 0:
            raise DataError("no examples to iterate")
        if drop_last and n < batch_size:
            raise DataError(
                f"{n} examples are fewer than one batch of {batch_size} (drop_last=True)"
            )
        longest = int(self.lengths.max())
        if longest > self.buckets[-1]:
            raise DataError(
                f"the longest row has {longest} tokens but the largest bucket is "
                f"{self.buckets[-1]}; raise the buckets or lower max_len"
            )
        self.local_batch_size = batch_size // process_count
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    @classmethod
    def for_eval(
        cls,
        examples: Sequence[Any],
        batch_size: int,
        buckets: Sequence[int],
        collate_fn: CollateFn | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ) -> BatchIterator:
        """An eval iterator: in order, one pass per loop, last batch padded (see `valid`)."""
        return cls(
            examples,
            batch_size,
            buckets,
            seed=0,
            collate_fn=collate_fn,
            shuffle=False,
            drop_last=False,
            process_index=process_index,
            process_count=process_count,
            repeat=False,
        )

    @property
    def stats(self) -> dict[str, int] | None:
        """The examples' build statistics (rows skipped, truncated, ...), if any."""
        return getattr(self.examples, "stats", None)

    def __len__(self) -> int:
        """Batches per pass over the data."""
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = len(self.examples)
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> BatchIterator:
        """The iterator itself; a non-repeating (eval) iterator first rewinds to the start, so
        every `for` loop over it is one full pass even after an early `break`."""
        if not self.repeat:
            self.reset()
        return self

    def __next__(self) -> Batch:
        n, bsz = len(self.examples), self.batch_size
        end_of_epoch = self._position >= n or (self.drop_last and self._position + bsz > n)
        if end_of_epoch:
            if not self.repeat:
                self.reset()
                raise StopIteration
            self._epoch += 1
            self._position = 0
        idx = self._order_for(self._epoch)[self._position : self._position + bsz]
        self._position += bsz
        length = pick_bucket(int(self.lengths[idx].max()), self.buckets)
        lo = self.process_index * self.local_batch_size
        hi = lo + self.local_batch_size
        rows = [self.examples[int(i)] for i in idx[lo:hi]]
        n_valid = len(rows)
        rows += [None] * (self.local_batch_size - n_valid)
        batch = self.collate_fn(rows, length)
        valid = np.zeros((self.local_batch_size,), dtype=np.int32)
        valid[:n_valid] = 1
        batch["valid"] = valid
        return batch

    def reset(self) -> None:
        """Back to the start of epoch 0."""
        self._epoch = 0
        self._position = 0

    def state_dict(self) -> dict[str, int | bool]:
        """The iterator's position as a small JSON-able dict (the same on every process)."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "data_hash": self.data_hash,
        }

    @property
    def data_hash(self) -> str:
        """A fingerprint of the examples (their lengths, in order): a resumed run must see the
        same data, not only the same number of rows."""
        if getattr(self, "_data_hash", None) is None:
            self._data_hash = hashlib.sha256(self.lengths.tobytes()).hexdigest()[:16]
        return self._data_hash

    def check_state_dict(self, state: Any, batches: int | None = None) -> None:
        """Checks a saved position before it is trusted: the keys and types, the same data and
        settings, a position this iterator can reach, and (given `batches`, the number of
        batches the run consumed) that it is the position after exactly that many batches.

        Raises:
          DataError: naming what does not match.
        """
        keys = ("epoch", "position", "seed", "num_examples", "batch_size", "shuffle")
        if not isinstance(state, dict) or any(k not in state for k in keys):
            raise DataError(f"iterator state {state!r} lacks some of {keys}")
        for key in ("epoch", "position", "seed", "num_examples", "batch_size"):
            if not isinstance(state[key], int) or isinstance(state[key], bool):
                raise DataError(f"iterator state has {key}={state[key]!r}; expected an integer")
        for key in ("num_examples", "batch_size", "seed", "shuffle", "data_hash"):
            if key == "data_hash" and key not in state:
                continue  # saved before the fingerprint existed
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise DataError(
                    f"iterator state has {key}={state[key]!r} but this iterator has {mine!r}; "
                    "it was saved over different data or settings"
                )
        n, bsz = len(self.examples), self.batch_size
        epoch, position = state["epoch"], state["position"]
        if epoch < 0 or position < 0 or position % bsz or position > n + bsz - 1:
            raise DataError(
                f"iterator state has epoch={epoch}, position={position}: not a position of "
                f"{n} examples in batches of {bsz}"
            )
        if batches is not None and epoch * len(self) + position // bsz != batches:
            raise DataError(
                f"iterator state (epoch {epoch}, position {position}) is not the position "
                f"after {batches} batches"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by `state_dict`; the next batch is the one that followed.

        Raises:
          DataError: the state was saved over different data, batch size, seed or shuffling,
            or is malformed (see `check_state_dict`).
        """
        self.check_state_dict(state)
        self._epoch = int(state["epoch"])
        self._position = int(state["position"])
