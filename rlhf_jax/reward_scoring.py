"""Scoring with a trained reward model: the host-side `RewardScorer`, its loader from a run
directory, and the reward normalisation record.

- `RewardScorer` takes texts (prompt + completion, or whole texts) or token ids, pads them into
  static-shape batches (rows a multiple of data×fsdp, lengths from a small set of buckets, so it
  compiles once per bucket), runs the jitted, sharded pure function `steps.reward.make_reward_fn`
  and returns numpy arrays: per-head rewards, their mean and std across heads and the
  conservative score mean - k·std (k = `std_coef`, traced: changing it does not recompile).
- `load_reward_model(run_dir)` returns what a jitted consumer (PPO) needs without the host
  wrapper: graphdef, sharded params, normalisation; pass them to `make_reward_fn`.
- `RewardNormalization` is RUN_DIR/reward_norm.json: per-head mean and std of the rewards of a
  reference sample (the reward stage uses the eval split's chosen and rejected sequences at the
  end of training). Scorers built from a run directory apply it unless told not to.

Text is tokenised exactly as the preference pipeline does it (`data.examples.Truncator`):
`[bos] prompt completion [eos]`, the prompt and the completion encoded separately.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import atomic, partitioning
from rlhf_jax.data.batching import pick_bucket
from rlhf_jax.data.examples import Truncator, new_stats
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.errors import UserError
from rlhf_jax.rundir import check_model_class, load_params, resolve_run_dir
from rlhf_jax.steps.reward import make_reward_fn

log = logging.getLogger(__name__)

NORM_FILE = "reward_norm.json"


@dataclasses.dataclass(frozen=True)
class RewardNormalization:
    """Per-head reward statistics of a reference sample; the scorer maps r_k to
    (r_k - mean[k]) / std[k].

    Attributes:
      mean: [K] per-head mean.
      std: [K] per-head standard deviation (floored at `min_std` when created).
      count: sequences in the reference sample.
      source: where the sample came from (free text, for the record).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: int = 0
    source: str = ""

    @classmethod
    def create(
        cls,
        mean: Sequence[float],
        std: Sequence[float],
        count: int = 0,
        source: str = "",
        min_std: float = 1e-6,
    ) -> RewardNormalization:
        if len(mean) != len(std):
            raise ValueError(f"{len(mean)} means but {len(std)} stds")
        std = [max(float(s), min_std) for s in std]
        return cls(tuple(float(m) for m in mean), tuple(std), int(count), source)

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Writes RUN_DIR/reward_norm.json atomically (process 0 only)."""
        path = Path(run_dir) / NORM_FILE
        if jax.process_index() == 0:
            atomic.write_json(path, dataclasses.asdict(self))
        return path

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RewardNormalization | None:
        """RUN_DIR/reward_norm.json, or None when the run has none."""
        path = Path(run_dir) / NORM_FILE
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        return cls(tuple(d["mean"]), tuple(d["std"]), int(d.get("count", 0)), d.get("source", ""))


@dataclasses.dataclass
class LoadedRewardModel:
    """What `load_reward_model` returns."""

    graphdef: nnx.GraphDef
    params: nnx.State
    num_heads: int
    normalization: RewardNormalization | None
    tokenizer_path: str | None
    run_dir: Path
    step: int


def load_reward_model(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules=None,
    step: int | None = None,
    normalize: bool = True,
) -> LoadedRewardModel:
    """Loads a reward model's params (sharded for `mesh`) and its normalisation.

    Args:
      path: an RM run directory, its checkpoints/ folder or one checkpoint step folder.
      mesh, rules: placement (defaults: the gin-configured mesh and rules).
      step: which checkpoint (default: the newest that restores).
      normalize: read RUN_DIR/reward_norm.json (else no normalisation).
    """
    # A policy run passed where a reward model is expected: refused before loading anything.
    check_model_class(path, "ScalarModel", "the reward model")
    loaded = load_params(path, mesh=mesh, rules=rules, step=step)
    head_w = loaded.params["head_w"][...] if "head_w" in loaded.params else None
    if head_w is None:
        raise UserError(f"{loaded.run_dir} does not hold a reward model (no scalar head)")
    norm = RewardNormalization.load(resolve_run_dir(path)) if normalize else None
    if normalize and norm is None:
        log.warning("%s has no %s: rewards are not normalised", loaded.run_dir, NORM_FILE)
    num_heads = int(head_w.shape[-1])
    if norm is not None and len(norm.mean) != num_heads:
        raise UserError(f"{NORM_FILE} has {len(norm.mean)} heads, the model {num_heads}")
    return LoadedRewardModel(
        loaded.graphdef,
        loaded.params,
        num_heads,
        norm,
        loaded.tokenizer_path,
        loaded.run_dir,
        loaded.step,
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class RewardScorer:
    """Batched, jitted, sharded scoring of token sequences or texts with a reward model.

    Args:
      graphdef: the `ScalarModel` graphdef.
      params: its params (placed on `mesh`, e.g. from `load_reward_model`).
      mesh: the device mesh; rows are sharded over (data, fsdp).
      rules: logical-axis rules (default: the gin-configured table).
      tokenizer: needed for `score_texts`.
      normalization: per-head statistics to apply (None: raw rewards).
      batch_size: rows per forward (rounded up to a multiple of data×fsdp).
      buckets: allowed padded lengths (one compile per bucket used).
      std_coef: default k of the conservative score mean - k·std.
      max_prompt_len: text scoring only; as in the preference pipeline (default max_len // 2).
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        *,
        mesh: Mesh,
        rules=None,
        tokenizer: Tokenizer | None = None,
        normalization: RewardNormalization | None = None,
        batch_size: int = 32,
        buckets: Sequence[int] = (64, 128, 256),
        std_coef: float = 1.0,
        max_prompt_len: int | None = None,
    ):
        self.mesh, self.tokenizer, self.normalization = mesh, tokenizer, normalization
        self.rules = rules if rules is not None else partitioning.logical_rules()
        self.params = params
        self.rows = _round_up(batch_size, mesh.shape["data"] * mesh.shape["fsdp"])
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.std_coef = std_coef
        self.max_prompt_len = max_prompt_len
        self.num_traces = 0
        norm = {}
        if normalization is not None:
            norm = {"norm_mean": normalization.mean, "norm_std": normalization.std}
        param_sh = jax.tree.map(lambda x: x.sharding, params)
        rows_sh = partitioning.batch_sharding(mesh, 2)
        rep = NamedSharding(mesh, PartitionSpec())
        self._jitted = {}
        for right in (False, True):
            fn = make_reward_fn(graphdef, right_padded=right, **norm)
            self._jitted[right] = jax.jit(
                self._counted(fn),
                in_shardings=(param_sh, rows_sh, rows_sh, rep),
                out_shardings=rep,
            )

    def _counted(self, fn):
        def counted(*args):
            self.num_traces += 1  # trace time only
            return fn(*args)

        return counted

    @classmethod
    def from_run_dir(
        cls,
        path: str | os.PathLike,
        *,
        mesh: Mesh | None = None,
        rules=None,
        step: int | None = None,
        normalize: bool = True,
        **kwargs: Any,
    ) -> RewardScorer:
        """A scorer for the reward model of an RM run (tokenizer and normalisation included)."""
        mesh = mesh if mesh is not None else partitioning.make_mesh()
        rules = rules if rules is not None else partitioning.logical_rules()
        rm = load_reward_model(path, mesh=mesh, rules=rules, step=step, normalize=normalize)
        if "tokenizer" not in kwargs and rm.tokenizer_path:
            kwargs["tokenizer"] = Tokenizer.from_file(rm.tokenizer_path)
        return cls(
            rm.graphdef,
            rm.params,
            mesh=mesh,
            rules=rules,
            normalization=rm.normalization,
            **kwargs,
        )

    # ------------------------------------------------------------------ tokens
    def score_tokens(
        self,
        input_ids: Sequence[Sequence[int]] | np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        std_coef: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Scores token sequences.

        Args:
          input_ids: a list of id lists (any lengths), or an [N, T] array (with its mask).
          attention_mask: [N, T] for an array input (1 = real token; padding on either side);
            default all ones.
          std_coef: k of the conservative score (default: the scorer's).

        Returns:
          numpy `heads` [N, K], `mean`, `std`, `conservative` [N].
        """
        ids, mask = self._as_arrays(input_ids, attention_mask)
        k = np.float32(self.std_coef if std_coef is None else std_coef)
        outs = []
        for lo in range(0, len(ids), self.rows):
            outs.append(self._score_chunk(ids[lo : lo + self.rows], mask[lo : lo + self.rows], k))
        if not outs:
            raise ValueError("nothing to score")
        return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}

    def _as_arrays(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(input_ids, np.ndarray) and input_ids.ndim == 2:
            mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
            return input_ids.astype(np.int32), np.asarray(mask, np.int32)
        if attention_mask is not None:
            raise ValueError("attention_mask goes with an [N, T] array of ids, not id lists")
        seqs = [np.asarray(s, np.int32) for s in input_ids]
        T = max((len(s) for s in seqs), default=0)
        ids, mask = np.zeros((len(seqs), T), np.int32), np.zeros((len(seqs), T), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return ids, mask

    def _score_chunk(self, ids: np.ndarray, mask: np.ndarray, k: np.float32) -> dict:
        n, T = ids.shape
        length = pick_bucket(T, self.buckets)
        ids = np.pad(ids, ((0, self.rows - n), (0, length - T)))
        mask = np.pad(mask, ((0, self.rows - n), (0, length - T)))
        # Right-padded rows (mask never rises again after a 0) may use the fused attention.
        right = bool(np.all(np.diff(mask, axis=1) <= 0))
        sharding = partitioning.batch_sharding(self.mesh, 2)
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            g_ids = jax.make_array_from_callback(ids.shape, sharding, lambda i: ids[i])
            g_mask = jax.make_array_from_callback(mask.shape, sharding, lambda i: mask[i])
            out = self._jitted[right](self.params, g_ids, g_mask, k)
        return {key: np.asarray(v)[:n] for key, v in jax.device_get(out).items()}

    # ------------------------------------------------------------------ text
    def tokenize(
        self, texts: Sequence[str], completions: Sequence[str] | None = None
    ) -> list[np.ndarray]:
        """`[bos] prompt completion [eos]` ids, truncated as the preference pipeline does."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError("this scorer has no tokenizer; pass tokenizer= to score text")
        trunc = Truncator(tok.bos_id, tok.eos_id, self.buckets[-1], self.max_prompt_len)
        stats = new_stats()
        if completions is None:
            prompts, bodies = [[] for _ in texts], tok.encode_batch(list(texts))
        else:
            if len(completions) != len(texts):
                raise ValueError(f"{len(texts)} prompts but {len(completions)} completions")
            prompts, bodies = tok.encode_batch(list(texts)), tok.encode_batch(list(completions))
        out = []
        for i, (p, c) in enumerate(zip(prompts, bodies, strict=True)):
            p_ids = trunc.prompt(p, stats) if p else list(trunc.bos)
            seq = trunc.sequence(p_ids, c, stats) if c else None
            if seq is None:
                raise ValueError(f"text {i} has no completion tokens to score")
            out.append(seq[0])
        return out

    def score_texts(
        self,
        texts: Sequence[str],
        completions: Sequence[str] | None = None,
        *,
        std_coef: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Scores decoded texts: `texts` alone, or prompts `texts` with their `completions`."""
        return self.score_tokens(self.tokenize(texts, completions), std_coef=std_coef)
