"""Policy-level evaluation: load a trained policy from its run directory, sample completions for
prompts with the compiled sampler, score them with judges, and estimate the sequence KL to a
reference policy.

KL. For y ~ π(·|x), KL(π‖π_ref)(x) = E_y[log π(y|x) − log π_ref(y|x)] (the k1 estimator), so a
KL estimate needs samples from π itself: temperature 1, no top-k or top-p filtering (`sample`
refuses anything else when given `ref=`). Both log-probs are then computed the same way, by a
teacher-forced forward over the sampled tokens (`ops.completion_logprobs`, the log-probs
to use for any policy ratio), so that a policy compared with itself gives exactly zero rather
than the difference between the decode loop's cached numerics and a full forward.

`evaluate_policies` puts these together: sample each policy, score with the task's judges,
report means with standard errors and write each policy's samples to RUN_DIR/samples.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from rlhf_jax import atomic, partitioning
from rlhf_jax.data.batching import BatchIterator
from rlhf_jax.data.errors import TokenizerError
from rlhf_jax.data.examples import TokenizedDataset
from rlhf_jax.data.prompts import build_prompt_dataset
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.errors import UserError
from rlhf_jax.generate import SampleOutput, Sampler, SamplingConfig, SamplingHParams
from rlhf_jax.generate import sequence_batch as make_sequence_batch
from rlhf_jax.models import ModelConfig
from rlhf_jax.ops import completion_logprobs
from rlhf_jax.partitioning import to_host
from rlhf_jax.rundir import check_model_class, load_params, samples_path

log = logging.getLogger(__name__)

Judge = Callable[[list[str]], dict[str, np.ndarray]]
Row = dict[str, Any]

# Padded prompt lengths (one compiled sampler per bucket used). Longer prompts keep their end.
DEFAULT_BUCKETS = (8, 16, 32, 64)


@dataclasses.dataclass
class Policy:
    """A loaded policy: parameters placed on a mesh, its graphdef, config and tokenizer.

    Attributes:
      graphdef: the model's NNX graphdef.
      params: its `nnx.Param` state, sharded for `mesh`.
      config: the `ModelConfig` from RUN_DIR/model.json.
      tokenizer: the tokenizer the policy was trained with.
      mesh: the device mesh the parameters live on.
      rules: the logical-axis rules the parameters were placed with.
      run_dir: the policy's run directory.
      step: the training step of the loaded checkpoint.
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    config: ModelConfig
    tokenizer: Tokenizer
    mesh: Mesh
    rules: Any
    run_dir: Path
    step: int

    @functools.cached_property
    def sampler(self) -> Sampler:
        """The policy's compiled sampler, kept so repeated `sample` calls do not recompile."""
        return Sampler(self.graphdef, self.config, self.mesh, self.rules)


def load_policy(path: str | os.PathLike, mesh: Mesh | None = None, rules: Any = None) -> Policy:
    """Loads the newest good checkpoint of a policy run (see `rundir.load_params`).

    Args:
      path: a run directory, its `checkpoints/` folder or one `checkpoints/<step>/` folder.
      mesh: target mesh (default: the gin-configured `partitioning.make_mesh()`).
      rules: logical-axis rules (default: `partitioning.logical_rules()`).

    Raises:
      FileNotFoundError: `path` does not exist, is not a run directory, or holds no checkpoint.
      TokenizerError: the run records no tokenizer, or its file is missing or unreadable.
      CheckpointRestoreError: no checkpoint could be restored.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"policy checkpoint {path} does not exist")
    check_model_class(path, "Transformer", "the policy")
    mesh = mesh if mesh is not None else partitioning.make_mesh()
    rules = rules if rules is not None else partitioning.logical_rules()
    loaded = load_params(path, mesh=mesh, rules=rules)
    if not loaded.tokenizer_path:
        raise TokenizerError(f"{loaded.run_dir}/model.json names no tokenizer")
    tok = Tokenizer.from_file(loaded.tokenizer_path)
    return Policy(
        loaded.graphdef,
        loaded.params,
        loaded.config,
        tok,
        mesh,
        rules,
        loaded.run_dir,
        loaded.step,
    )


@contextlib.contextmanager
def _no_lock(path: Path) -> Iterator[None]:
    yield


def _prompt_batches(
    prompts: Sequence[str],
    num_samples: int,
    tok: Tokenizer,
    batch_size: int,
    buckets: Sequence[int],
) -> BatchIterator:
    """Left-padded batches of each prompt repeated `num_samples` times, in input order (the
    last batch padded, see `valid`)."""
    ds = datasets.Dataset.from_dict({"prompt": list(prompts)})
    examples = build_prompt_dataset(ds, tok, max_prompt_len=max(buckets))
    truncated = examples.stats.get("long_prompt_truncated", 0)
    if truncated:
        log.warning(
            "%d prompt(s) are longer than %d tokens and keep only their end",
            truncated,
            max(buckets),
        )
    rows = [row for row in examples.rows for _ in range(num_samples)]
    repeated = TokenizedDataset("prompt", rows, examples.stats, tok.pad_id, examples.name)
    return BatchIterator.for_eval(repeated, batch_size, buckets)


def _round_batch(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of data×fsdp (the sampler shards rows over them)."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    return max(n, -(-batch_size // n) * n)


@functools.partial(jax.jit, static_argnums=0, static_argnames="chunk_size")
def _teacher_forced_logprobs(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    out: SampleOutput,
    chunk_size: int = 128,
) -> jax.Array:
    """Summed log-probs [B] of sampled completions under a model: one forward over prompt +
    completion, then `ops.completion_logprobs` (never a full [B, T, V] logits array)."""
    seq = make_sequence_batch(prompt_ids_BP, prompt_mask_BP, out)
    model = nnx.merge(graphdef, params)
    hidden_BTD, _ = model.forward(seq["input_ids"], seq["attention_mask"], seq["positions"])
    logps_BN = completion_logprobs(
        hidden_BTD, model.unembed, out.tokens, out.completion_mask, chunk_size
    )
    return logps_BN.sum(-1)


def _check_kl_setup(
    policy: Policy, ref: Policy, temperature: float, top_p: float, top_k: int
) -> None:
    if temperature != 1.0 or top_p < 1.0 or top_k:
        raise ValueError(
            "a KL estimate needs samples from the policy itself: use temperature=1, top_p=1 "
            f"and top_k=0 with ref= (got temperature={temperature}, top_p={top_p}, "
            f"top_k={top_k})"
        )
    if ref.mesh.devices.tolist() != policy.mesh.devices.tolist():
        raise ValueError("the policy and its reference must be loaded on the same mesh")
    if ref.tokenizer.backend.get_vocab() != policy.tokenizer.backend.get_vocab():
        raise ValueError(
            f"{ref.run_dir} and {policy.run_dir} use different tokenizers; their log-probs "
            "are not comparable"
        )


def sample(
    policy: Policy,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    batch_size: int = 64,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    ref: Policy | None = None,
    progress: bool = True,
    segment_len: int = 0,
) -> list[Row]:
    """Samples `num_samples` completions per prompt.

    Batch i is sampled with `fold_in(key(seed), i)`, so the output is a deterministic function
    of the policy, the prompts, the seed and the batching (batch_size, buckets).

    Args:
      policy: from `load_policy`.
      prompts: prompt strings; each is tokenised as `[bos] prompt`.
      max_new_tokens: decode steps at most; a completion ends at EOS.
      num_samples: completions per prompt (the prompt's rows are consecutive).
      temperature, top_p, top_k: sampling settings (see `generate.SamplingConfig`).
      seed: sampling seed.
      batch_size: rows per sampler call (rounded up to a multiple of data×fsdp).
      buckets: allowed padded prompt lengths; longer prompts keep their last max(buckets)
        tokens.
      ref: a reference policy on the same mesh, for the per-sequence KL (needs temperature 1,
        top_p 1, top_k 0).
      progress: show a progress bar.
      segment_len: decode-loop segments (`SamplingConfig.segment_len`; same samples, 0 = one
        loop with a per-step exit test).

    Returns:
      One dict per (prompt, sample), prompt-major: `prompt`, `sample` (0..num_samples-1),
      `completion` (decoded new tokens, stop token dropped), `text` (decoded prompt +
      completion, what judges score), `length` (new tokens, stop token included) and `logprob`
      (summed log-prob under the policy at temperature 1). With `ref`: `ref_logprob` and `kl`
      (= logprob − ref_logprob, the k1 term); `logprob` is then teacher-forced like
      `ref_logprob`.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if ref is not None:
        _check_kl_setup(policy, ref, temperature, top_p, top_k)
    tok = policy.tokenizer
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        segment_len=segment_len,
    )
    hp = SamplingHParams(temperature=temperature, top_p=top_p)
    total = len(prompts) * num_samples
    if not total:
        return []
    bs = _round_batch(min(batch_size, total), policy.mesh)
    batches = _prompt_batches(prompts, num_samples, tok, bs, buckets)
    key = jax.random.key(seed)
    rows: list[Row] = []
    bar = tqdm(
        total=total,
        desc=f"sampling {policy.run_dir.name}",
        disable=not progress or jax.process_index() != 0,
        unit="seq",
        leave=False,
    )
    for i, batch in enumerate(batches):
        ids_BP, mask_BP = batch["prompt_ids"], batch["prompt_mask"]
        out = policy.sampler(policy.params, ids_BP, mask_BP, jax.random.fold_in(key, i), cfg, hp)
        if ref is None:
            logp_B = to_host(out.model_logprobs).sum(-1)
            ref_logp_B = None
        else:
            with jax.set_mesh(policy.mesh), nnx.logical_axis_rules(policy.rules):
                logp_B = to_host(
                    _teacher_forced_logprobs(policy.graphdef, policy.params, ids_BP, mask_BP, out)
                )
                ref_logp_B = to_host(
                    _teacher_forced_logprobs(ref.graphdef, ref.params, ids_BP, mask_BP, out)
                )
        tokens_BN, cmask_BN = to_host(out.tokens), to_host(out.completion_mask)
        for b in np.flatnonzero(batch["valid"]):
            new = tokens_BN[b][cmask_BN[b] == 1].tolist()
            if new and new[-1] in cfg.stop_tokens:
                new = new[:-1]
            prompt_tokens = ids_BP[b][mask_BP[b] == 1].tolist()
            row: Row = {
                "prompt": str(batch["prompt_text"][b]),
                "sample": len(rows) % num_samples,
                "completion": tok.decode(new),
                "text": tok.decode(prompt_tokens + new),
                "length": int(cmask_BN[b].sum()),
                "logprob": float(logp_B[b]),
            }
            if ref_logp_B is not None:
                row["ref_logprob"] = float(ref_logp_B[b])
                row["kl"] = row["logprob"] - row["ref_logprob"]
            rows.append(row)
        bar.update(int(batch["valid"].sum()))
    bar.close()
    return rows


def score(rows: list[Row], judge: Judge | None, field: str = "text") -> list[str]:
    """Adds one field per judge output to each row (in place), scoring `row[field]` in one call.

    Returns:
      The names of the fields added (none without a judge or rows).
    """
    if judge is None or not rows:
        return []
    scores = judge([r[field] for r in rows])
    for name, values in scores.items():
        for r, v in zip(rows, np.asarray(values), strict=True):
            r[name] = float(v)
    return list(scores)


def summarize(rows: list[Row], keys: Sequence[str]) -> dict[str, float]:
    """Means (and standard errors, as `<key>/sem`) of numeric fields over the rows.

    A key no row has is left out; `samples` is the number of rows.
    """
    out: dict[str, float] = {"samples": float(len(rows))}
    for k in keys:
        vals = np.asarray([r[k] for r in rows if k in r], dtype=np.float64)
        if len(vals):
            out[k] = float(vals.mean())
            sem = vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else 0.0
            out[f"{k}/sem"] = float(sem)
    return out


def write_jsonl(path: str | os.PathLike, rows: list[Row]) -> Path:
    """Writes rows as JSONL, atomically (a temporary file renamed into place).

    In a multi-process job every process must call it (it is a collective): only process 0
    writes (every process holds the same rows); every process returns once the file is in
    place, and raises if the write failed.
    """
    path = Path(path)

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(atomic.dumps(r) + "\n")
        os.replace(tmp, path)

    partitioning.on_process_0(write, f"writing {path}")
    return path


def load_named_policy(path: str | os.PathLike, what: str, **kwargs: Any) -> Policy:
    """`load_policy`, with a missing or unusable run reported as one user error naming the
    setting `what` (e.g. "CHECKPOINT") it came from.

    Raises:
      UserError: `path` is no policy run, or its checkpoint or tokenizer cannot be read.
    """
    try:
        return load_policy(path, **kwargs)
    except (FileNotFoundError, UserError) as e:
        raise UserError(f"cannot load the policy from {what}={str(path)!r}: {e}") from e


def evaluate_policies(
    policies: Mapping[str, str | os.PathLike],
    reference: str | os.PathLike,
    prompts: Sequence[str],
    *,
    judge: Judge | None,
    max_new_tokens: int = 24,
    seed: int = 0,
    batch_size: int = 128,
    lock: Callable[[Path], contextlib.AbstractContextManager[Any]] = _no_lock,
) -> dict[str, dict[str, float]]:
    """Samples each policy on `prompts` at temperature 1 and reports the judges' means, the
    completion length and the sequence KL to `reference` (all with standard errors); writes
    each policy's samples to RUN_DIR/samples.jsonl.

    Args:
      policies: display name -> policy run directory.
      reference: the reference policy's run directory (e.g. the SFT run).
      prompts: prompt strings.
      judge: the task's judges (texts -> {score name: [N] scores}), or None.
      max_new_tokens, seed, batch_size: sampling settings (the same for every policy).
      lock: `lock(path)` is held while samples.jsonl is written at `path` (the caller's
        run-directory lock; evaluation itself takes none).

    Returns:
      Display name -> `summarize` output.
    """
    ref = load_named_policy(reference, "reference")
    results = {}
    for name, run_dir in policies.items():
        pol = load_named_policy(run_dir, name, mesh=ref.mesh, rules=ref.rules)
        rows = sample(
            pol,
            prompts,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            ref=ref,
        )
        fields = score(rows, judge)
        path = samples_path(run_dir)
        with lock(path):
            write_jsonl(path, rows)
        results[name] = summarize(rows, [*fields, "kl", "length"])
    return results
