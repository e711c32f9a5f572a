"""The DPO stage: gin wiring from preference data and an SFT policy to the generic loop.

`dpo_stage` (bound as `train.stage = @dpo_stage`) trains any DPO-family loss
(`steps.dpo`) on preference pairs from a gin-configured data callable, normally
`@preference_data` (`data.pipeline.make_preference_iterator`). The policy starts from
`init_from` (the SFT run), whose model.json also gives the model config and the tokenizer;
the reference is that same starting point, either kept as frozen parameters in the state
(`reference="params"`) or replaced by reference log-probs precomputed once and cached on disk,
shared by every run of a sweep (`reference="precomputed"`, see `train.ref_cache`).
Reference-free types (simpo, orpo) use neither.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import gin
import numpy as np

from rlhf_jax import partitioning, paths, settings
from rlhf_jax.data import pipeline  # noqa: F401  (registers @preference_data for gin)
from rlhf_jax.data.batching import BatchIterator
from rlhf_jax.models import ModelConfig, lora, model_config
from rlhf_jax.steps.algorithm import HParams, eval_step, train_step
from rlhf_jax.steps.dpo import DPOConfig, DPOHParams
from rlhf_jax.train import ref_cache, stages
from rlhf_jax.train.checkpoint import (
    load_params,
    read_model_info,
    resolve_run_dir,
)
from rlhf_jax.train.faults import RunLock
from rlhf_jax.train.loop import LoopConfig, LoopResult, LoopSpec, train_loop

log = logging.getLogger(__name__)

HostBatch = dict[str, np.ndarray]


def count_pair_tokens(batch: HostBatch) -> float:
    """Real tokens of a preference batch (both sides)."""
    return float(np.sum(batch["chosen_attention_mask"]) + np.sum(batch["rejected_attention_mask"]))


def _flops_per_batch(cfg: ModelConfig, ref_forward: bool, batch: HostBatch) -> float:
    rows, seq_len = batch["chosen_input_ids"].shape
    train = cfg.flops_per_token(seq_len) * 2 * rows * seq_len  # forward + backward, both sides
    return train * (4.0 / 3.0 if ref_forward else 1.0)  # a reference forward is ~1/3 of it


def _rewound(it: BatchIterator) -> Iterable[HostBatch]:
    """One full pass over an eval iterator from its start (an earlier eval may have stopped
    early at `LoopConfig.eval_batches`)."""
    it.reset()
    return it


def _length_settings(
    buckets: Sequence[int], max_len: int | None, max_prompt_len: int | None, on_long_prompt: str
) -> dict[str, Any]:
    top = max(buckets)
    max_len = top if max_len is None else max_len
    return {
        "max_len": max_len,
        "max_prompt_len": max_len // 2 if max_prompt_len is None else max_prompt_len,
        "buckets": sorted(int(b) for b in buckets),
        "on_long_prompt": on_long_prompt,
    }


def precompute_reference(
    splits: dict[str, BatchIterator],
    *,
    cache_dir: str,
    lengths: dict[str, Any],
    init_from: str | None,
    fresh_params: Callable[[], Any],
    graphdef: Any,
    model_cfg: ModelConfig,
    batch_size: int,
    mesh,
    rules,
    chunk_size: int,
) -> tuple[dict[str, BatchIterator], dict[str, Any]]:
    """Attaches cached (or newly computed) reference log-probs to each split's iterator.

    The reference is the checkpoint `init_from` (hashed as files; loaded only on a cache miss)
    or, without one, the freshly initialised policy (`fresh_params()`, hashed as bytes with
    `model_cfg`).

    Returns:
      The wrapped iterators, and summary entries `ref_cache/hit` (every split read from the
      cache) and `ref_cache/<split>_key`.
    """
    cache = ref_cache.ReferenceCache(cache_dir)
    loaded: dict[str, Any] = {}

    if init_from is not None:
        step_dir = ref_cache.checkpoint_step_dir(init_from)
        fingerprint = ref_cache.hash_checkpoint(step_dir)

        def reference_params():
            if "params" not in loaded:
                ref = load_params(init_from, mesh=mesh, rules=rules, step=int(step_dir.name))
                loaded["params"], loaded["graphdef"] = ref.params, ref.graphdef
            return loaded["graphdef"], loaded["params"]
    else:
        loaded["params"], loaded["graphdef"] = fresh_params(), graphdef
        model = {"model_config": dataclasses.asdict(model_cfg)}
        fingerprint = ref_cache.hash_params(loaded["params"], model)

        def reference_params():
            return loaded["graphdef"], loaded["params"]

    out, info, hits = {}, {}, []
    for name, it in splits.items():
        data_hash = ref_cache.hash_examples(it.examples)
        key = ref_cache.cache_key(reference=fingerprint, data=data_hash, lengths=lengths)

        def compute(examples=it.examples):
            g, p = reference_params()
            return ref_cache.compute_reference_logps(
                g, p, examples, batch_size=batch_size, buckets=lengths["buckets"],
                mesh=mesh, rules=rules, chunk_size=chunk_size,
            )  # fmt: skip

        meta = {"reference": fingerprint, "reference_path": str(init_from), "data": data_hash,
                "lengths": lengths, "split": name}  # fmt: skip
        entry = cache.get_or_compute(key, compute, num_examples=len(it.examples), meta=meta)
        out[name] = ref_cache.with_reference(it, entry.chosen, entry.rejected)
        info[f"ref_cache/{name}_key"] = key
        hits.append(entry.hit)
    info["ref_cache/hit"] = all(hits)
    return out, info


def _tokenizer_for(tokenizer: str | None, init_from: str | None) -> str | None:
    if tokenizer is not None or init_from is None:
        return tokenizer
    return read_model_info(resolve_run_dir(init_from)).get("tokenizer")


@gin.configurable
def dpo_stage(
    run_dir: str = gin.REQUIRED,
    data: Callable[..., tuple] = gin.REQUIRED,
    init_from: str | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    batch_size: int = 32,
    buckets: Sequence[int] = (64, 128),
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    on_long_prompt: str = "truncate",
    loss_type: str | Sequence[str] = "sigmoid",
    reference: str = "precomputed",
    ref_cache_dir: str | None = ref_cache.DEFAULT_CACHE_DIR,
    grad_accum_steps: int = 1,
    logits_chunk_size: int = 128,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    tau: float = 0.05,
    orpo_lambda: float = 0.1,
    loss_weights: Sequence[float] | None = None,
    bco_delta: float = 0.0,
    rpo_alpha: float | None = None,
    lr_scale: float = 1.0,
    debug_nan_step: int = -1,
    match_vocab: bool = True,
) -> LoopResult:
    """Offline preference optimisation of a causal LM (gin: `train.stage = @dpo_stage`).

    Args:
      run_dir: the run directory (RUN_DIR); re-running on it resumes from its checkpoints.
      data: called as `data(batch_size=, seed=, buckets=, max_len=, max_prompt_len=,
        on_long_prompt=[, tokenizer=])`; returns `(train_iter, eval_iter or None, tokenizer)`
        like `make_preference_iterator` (gin: `@preference_data`).
      init_from: the SFT run (or checkpoint) the policy and the reference start from; its
        model.json defines the model and the tokenizer. None: a fresh `model_config()` model.
      tokenizer: overrides the tokenizer of `init_from`'s model.json.
      seed: init and data seed.
      batch_size: global batch of pairs; divisible by data×fsdp and by `grad_accum_steps`.
      buckets, max_len, max_prompt_len, on_long_prompt: length settings of the pairs (both
        sides of a batch share one bucket); part of the reference-cache key.
      loss_type: a preference loss type or a tuple of them (see gin/algorithms/dpo.gin).
      reference: "precomputed" (cached reference log-probs) or "params" (frozen reference
        parameters in the state, run forward every step).
      ref_cache_dir: the shared cache of precomputed reference log-probs (REF_CACHE_DIR; None:
        `$RLHF_JAX_CACHE/ref_cache`, by default ~/.cache/rlhf_jax/ref_cache).
      grad_accum_steps, logits_chunk_size: static step settings (`DPOConfig`).
      beta, label_smoothing, gamma, tau, orpo_lambda, loss_weights, bco_delta: traced loss
        hyperparameters (`DPOHParams`).
      rpo_alpha: weight of the RPO chosen-NLL term (None: off).
      lr_scale: traced learning-rate multiplier.
      debug_nan_step: fault injection: the loss/gradients of this step become NaN (-1: off).
      match_vocab: without `init_from`, set the model's vocab_size to the tokenizer's.
    """
    loop_cfg = LoopConfig()
    stages.check_stage_settings(
        run_dir=run_dir, seed=seed, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
        lr_scale=lr_scale, init_from=init_from, stage="dpo_stage",
    )  # fmt: skip
    settings.choice("dpo_stage.reference", reference, ("precomputed", "params"))
    settings.nonneg_float("dpo_stage.beta (BETA)", beta)
    settings.in_range("dpo_stage.label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)
    run_dir_path = Path(run_dir)
    with RunLock(run_dir_path):
        mesh, rules = partitioning.make_mesh(), partitioning.logical_rules()
        partitioning.check_batch_divisible(batch_size, mesh)
        lengths = _length_settings(buckets, max_len, max_prompt_len, on_long_prompt)
        data_kwargs = dict(batch_size=batch_size, seed=seed, buckets=tuple(lengths["buckets"]),
                           max_len=max_len, max_prompt_len=max_prompt_len,
                           on_long_prompt=on_long_prompt)  # fmt: skip
        tok_path = _tokenizer_for(tokenizer, init_from)
        if tok_path is not None:
            data_kwargs["tokenizer"] = tok_path
        train_it, eval_it, tok = data(**data_kwargs)
        if init_from is not None:
            cfg = read_model_info(resolve_run_dir(init_from))["model_config"]
            cfg = stages.fit_vocab(cfg, tok.vocab_size, match=False)
        else:
            cfg = stages.fit_vocab(model_config(), tok.vocab_size, match_vocab)
        cfg = lora.with_lora(cfg)  # LoRA adapters when gin/algorithms/lora.gin sets a rank
        stages.check_seq_len(cfg, lengths["buckets"][-1])

        step_cfg = DPOConfig(
            loss_type=loss_type if isinstance(loss_type, str) else tuple(loss_type),
            reference=reference,
            grad_accum_steps=grad_accum_steps,
            logits_chunk_size=logits_chunk_size,
            rpo=rpo_alpha is not None,
        )
        loss_hp = DPOHParams.create(
            num_loss_types=len(step_cfg.loss_types), beta=beta,
            label_smoothing=label_smoothing, gamma=gamma, tau=tau, orpo_lambda=orpo_lambda,
            loss_weights=loss_weights, bco_delta=bco_delta, rpo_alpha=rpo_alpha or 0.0,
        )  # fmt: skip
        hparams = HParams.create(loss_hp, lr_scale=lr_scale, debug_nan_step=debug_nan_step)
        optimizer = stages.build_optimizer(loop_cfg.train_steps)
        factory, graphdef = stages.model_state_factory(
            cfg, optimizer, mesh, rules, seed=seed, init_from=init_from
        )
        frozen = None
        if step_cfg.uses_ref_params and not cfg.lora_rank:  # LoRA: the reference is the base
            frozen = stages.frozen_models(
                "ref", init_from=init_from, mesh=mesh, rules=rules,
                fresh=lambda: (graphdef, factory.init().policy.params),
            )  # fmt: skip
        stages.record_model(
            run_dir_path, cfg, stage="dpo_stage", tokenizer_path=tok.path,
            lora_base=init_from if cfg.lora_rank else None,
        )  # fmt: skip

        summary_extra: dict[str, Any] = stages.truncation_summary(
            {"train": getattr(train_it, "stats", None), "eval": getattr(eval_it, "stats", None)}
        )
        if step_cfg.needs_reference and reference == "precomputed":
            cache_dir = ref_cache_dir or paths.cache_dir("ref_cache")
            splits = {"train": train_it, **({"eval": eval_it} if eval_it is not None else {})}
            splits, ref_info = precompute_reference(
                splits, cache_dir=cache_dir, lengths=lengths, init_from=init_from,
                fresh_params=lambda: factory.init().policy.params, graphdef=graphdef, model_cfg=cfg,
                batch_size=batch_size, mesh=mesh, rules=rules, chunk_size=logits_chunk_size,
            )  # fmt: skip
            summary_extra.update(ref_info)
            train_it, eval_it = splits["train"], splits.get("eval")

        spec = LoopSpec(
            step_fn=functools.partial(train_step, cfg=step_cfg),
            state=factory,
            hparams=hparams,
            frozen=frozen,
            train_data=train_it,
            eval_fn=functools.partial(eval_step, cfg=step_cfg) if eval_it is not None else None,
            eval_data=functools.partial(_rewound, eval_it) if eval_it is not None else None,
            summarize_eval=step_cfg.summarize_eval,
            count_tokens=count_pair_tokens,
            flops_per_batch=functools.partial(_flops_per_batch, cfg, step_cfg.uses_ref_params),
            summary_extra=summary_extra,
        )
        result = train_loop(spec, loop_cfg, run_dir=run_dir_path, mesh=mesh, rules=rules, seed=seed)
        if result.summary is not None:
            _log_summary(result.summary)
        return result


def _log_summary(summary: dict[str, Any]) -> None:
    log.info(
        "DPO done: %d steps, eval loss %.4f, eval accuracy %.3f, eval margin %.4f, %.1f s",
        summary["step"],
        summary.get("eval/loss", float("nan")),
        summary.get("eval/rewards/accuracies", float("nan")),
        summary.get("eval/rewards/margins", float("nan")),
        summary["wall_time_s"],
    )
