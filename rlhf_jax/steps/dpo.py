"""DPO and the offline preference family as one pure, sharded training step (and its eval step).

This module owns the model side of offline preference optimisation: turning a preference batch
into summed completion log-probs of the policy (and of the reference), the per-pair loss of any
`losses.preference` type, exact micro-batch accumulation, and the metrics. The loss functions
themselves (and their paper citations) live in `rlhf_jax.losses.preference`.

Batch format (global `jax.Array`s, rows sharded over (data, fsdp)): `chosen_input_ids`,
`chosen_attention_mask`, `chosen_loss_mask`, `rejected_input_ids`, `rejected_attention_mask`,
`rejected_loss_mask` [B, T] (right-padded to one bucket T), optional `valid` [B] (0 on eval
padding rows) and, in "precomputed" reference mode, `ref_chosen_logps` / `ref_rejected_logps`
[B] float32 (see `train.ref_cache`).

Static vs traced. `DPOConfig` (loss type, reference mode, accumulation, chunking) is the
algorithm object (`steps.algorithm`), bound with `functools.partial` before `jit`; `DPOHParams`
(beta, label smoothing, gamma, tau, lambda, loss weights, ...) is a pytree of float32 scalars,
so a beta sweep compiles once and a population can be `vmap`ped over it.

Chosen and rejected go through the policy in ONE forward: rows are interleaved along the batch
(`[c_0, r_0, c_1, r_1, ...]`) rather than stacked as `[c..., r...]`, so that each device keeps
the pairs it already holds and the concatenation moves no data between devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax import settings
from rlhf_jax.errors import SettingsError
from rlhf_jax.losses.preference import (
    PREFERENCE_LOSS_TYPES,
    REFERENCE_FREE_TYPES,
    preference_loss,
)
from rlhf_jax.models import lora
from rlhf_jax.ops import chunked_token_logprobs, sequence_logprobs
from rlhf_jax.partitioning import with_logical_constraint
from rlhf_jax.steps.algorithm import Algorithm
from rlhf_jax.steps.common import Batch
from rlhf_jax.steps.state import Frozen, TrainState

REFERENCE_MODES = ("params", "precomputed")
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclasses.dataclass(frozen=True)
class DPOConfig(Algorithm):
    """The DPO family as an `Algorithm`: static settings (bound before `jit`).

    Attributes:
      loss_type: a name from `losses.preference.PREFERENCE_LOSS_TYPES`, or a tuple of names
        whose losses are summed with `DPOHParams.loss_weights` (MPO-style mixes).
      reference: "params" (the frozen reference model `Frozen.params["ref"]`, run forward
        under `stop_gradient`) or "precomputed" (reference log-probs carried in the batch as
        `ref_chosen_logps` / `ref_rejected_logps`). Ignored when every type is reference-free.
      grad_accum_steps: micro-batches per step. Batch-coupled types (`aot`, `aot_unpaired`)
        then sort within each micro-batch.
      logits_chunk_size: sequence positions unembedded at a time.
      rpo: add the RPO term `rpo_alpha * NLL(chosen)` (Pang et al. 2024).
    """

    loss_type: str | tuple[str, ...] = "sigmoid"
    reference: str = "params"
    logits_chunk_size: int = 128
    rpo: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        unknown = [t for t in self.loss_types if t not in PREFERENCE_LOSS_TYPES]
        if unknown or not self.loss_types:
            raise SettingsError(
                f"unknown DPO loss type(s) {unknown or self.loss_type!r}; "
                f"choose from {PREFERENCE_LOSS_TYPES}"
            )
        if self.reference not in REFERENCE_MODES:
            raise SettingsError(f"reference={self.reference!r}; choose one of {REFERENCE_MODES}")

    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type

    @property
    def needs_reference(self) -> bool:
        """False when every loss type is reference-free (SimPO, ORPO)."""
        return any(t not in REFERENCE_FREE_TYPES for t in self.loss_types)

    @property
    def uses_ref_params(self) -> bool:
        """True when the step runs the reference model (`Frozen.params["ref"]`, or the LoRA
        policy's base)."""
        return self.needs_reference and self.reference == "params"

    def loss_sums(self, state, frozen, params, batch, rng, hp, prepared):
        """Summed per-pair loss over valid pairs and its statistics (`pairs`: denominator)."""
        del rng, prepared
        return dpo_loss_sums(state, frozen, params, batch, hp, self)

    def denominator(self, sums):
        return jnp.maximum(sums["pairs"], 1.0)

    def train_metrics(self, sums, denom):
        metrics = {k: v / denom for k, v in sums.items() if k != "pairs"}
        return {**metrics, "pairs": sums["pairs"]}

    def eval_sums(self, state, frozen, batch, hp):
        loss_sum, sums = dpo_loss_sums(state, frozen, state.policy.params, batch, hp, self)
        return {"loss_sum": loss_sum, **sums}

    def summarize_eval(self, sums):
        return summarize_eval(sums)


@struct.dataclass
class DPOHParams:
    """Traced DPO hyperparameters (float32 scalars; `loss_weights` is [K], one per loss type).

    Changing any value does not recompile the step. See `losses.preference.preference_loss` for
    which loss types read which value.
    """

    beta: jax.Array
    label_smoothing: jax.Array
    gamma: jax.Array
    tau: jax.Array
    orpo_lambda: jax.Array
    loss_weights: jax.Array
    bco_delta: jax.Array
    rpo_alpha: jax.Array

    @classmethod
    def create(
        cls,
        *,
        num_loss_types: int = 1,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        gamma: float = 0.5,
        tau: float = 0.05,
        orpo_lambda: float = 0.1,
        loss_weights: Sequence[float] | None = None,
        bco_delta: float = 0.0,
        rpo_alpha: float | None = 0.0,
    ) -> DPOHParams:
        """Builds the pytree; `loss_weights` defaults to 1 for each of `num_loss_types`;
        `rpo_alpha` None means 0 (the stage turns the RPO term on when it is not 0).

        Raises:
          errors.SettingsError: a value of the wrong type or out of range, named with its gin
            macro (BETA > 0, 0 <= LABEL_SMOOTHING < 0.5, DISCOPOP_TAU > 0, ORPO_LAMBDA >= 0,
            RPO_ALPHA >= 0, the others finite; one finite weight per loss type).
        """
        settings.positive_float("beta (BETA)", beta)
        settings.in_range("label_smoothing (LABEL_SMOOTHING)", label_smoothing, 0.0, 0.5,
                          high_open=True)  # fmt: skip
        settings.finite("gamma (SIMPO_GAMMA)", gamma)
        settings.positive_float("tau (DISCOPOP_TAU)", tau)
        settings.nonneg_float("orpo_lambda (ORPO_LAMBDA)", orpo_lambda)
        settings.finite("bco_delta (BCO_DELTA)", bco_delta)
        settings.nonneg_float("rpo_alpha (RPO_ALPHA)", rpo_alpha or 0.0)
        weights = [1.0] * num_loss_types if loss_weights is None else list(loss_weights)
        if len(weights) != num_loss_types:
            raise SettingsError(
                f"loss_weights (LOSS_WEIGHTS) has {len(weights)} weights for {num_loss_types} "
                "loss types (DPO_LOSS_TYPE): give one weight per type"
            )
        for w in weights:
            settings.finite("loss_weights (LOSS_WEIGHTS)", w)
        f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        return cls(
            beta=f32(beta),
            label_smoothing=f32(label_smoothing),
            gamma=f32(gamma),
            tau=f32(tau),
            orpo_lambda=f32(orpo_lambda),
            loss_weights=f32(weights),
            bco_delta=f32(bco_delta),
            rpo_alpha=f32(rpo_alpha or 0.0),
        )


def interleave_pairs(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`[2B, T]` ids, attention mask and completion mask, rows `2i` chosen and `2i+1` rejected.

    Padding rows (`valid == 0`) get an all-zero completion mask.
    """

    def pair(name: str) -> jax.Array:
        x = jnp.stack([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=1)
        x = x.reshape(-1, x.shape[-1])
        return with_logical_constraint(x, ("batch", "length"))

    mask = pair("loss_mask")
    if "valid" in batch:
        mask = mask * jnp.repeat(batch["valid"].astype(mask.dtype), 2)[:, None]
    return pair("input_ids"), pair("attention_mask"), mask


def pair_sequence_logps(
    graphdef: nnx.GraphDef, params: nnx.State, batch: Batch, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """Summed completion log-probs and completion lengths, both `[B, 2]` (chosen, rejected).

    One forward over the interleaved `[2B, T]` rows; log-probs of the shifted targets come from
    `chunked_token_logprobs`, summed over the completion mask (`sequence_logprobs`).
    """
    model = nnx.merge(graphdef, params)
    ids_NT, attn_NT, mask_NT = interleave_pairs(batch)
    hidden_NTD, _ = model.forward(ids_NT, attn_NT, right_padded=True)
    logps_NT = chunked_token_logprobs(hidden_NTD[:, :-1], model.unembed, ids_NT[:, 1:], chunk_size)
    logps_N, lengths_N = sequence_logprobs(logps_NT, mask_NT[:, 1:])
    return logps_N.reshape(-1, 2), lengths_N.reshape(-1, 2)


def reference_logps(
    state: TrainState, frozen: Frozen, batch: Batch, cfg: DPOConfig
) -> jax.Array | None:
    """Reference summed log-probs `[B, 2]`, or None for reference-free loss types."""
    if not cfg.needs_reference:
        return None
    if cfg.reference == "precomputed":
        missing = [k for k in REF_FIELDS if k not in batch]
        if missing:
            raise KeyError(
                f"reference='precomputed' needs {missing} in the batch (see train.ref_cache)"
            )
        return jnp.stack([batch[k] for k in REF_FIELDS], axis=1).astype(jnp.float32)
    policy = state.models["policy"]
    if "ref" in frozen:
        graphdef, ref_params = frozen.graphdefs["ref"], jax.lax.stop_gradient(frozen.params["ref"])
    elif lora.has_adapters(policy.params):
        # LoRA: the reference is the base model, i.e. the policy with its adapters off (the
        # same base arrays; no second copy of the weights).
        graphdef = policy.graphdef
        ref_params = jax.lax.stop_gradient(lora.without_adapters(policy.params))
    else:
        raise ValueError("reference='params' needs the frozen reference model Frozen['ref']")
    logps_B2, _ = pair_sequence_logps(graphdef, ref_params, batch, cfg.logits_chunk_size)
    return jax.lax.stop_gradient(logps_B2)


def _loss_kwargs(hp: DPOHParams) -> dict:
    return dict(
        beta=hp.beta,
        label_smoothing=hp.label_smoothing,
        gamma=hp.gamma,
        tau=hp.tau,
        orpo_lambda=hp.orpo_lambda,
        bco_delta=hp.bco_delta,
    )


def pair_loss_sums(
    logps_B2: jax.Array,
    ref_B2: jax.Array | None,
    lengths_B2: jax.Array,
    valid_B: jax.Array,
    hp: DPOHParams,
    cfg: DPOConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Loss summed over valid pairs, and summed statistics (with their count `pairs`).

    Sums rather than means, so micro-batches and eval batches add up exactly; divide by
    `pairs` at the end. Implicit rewards are beta * (log pi - log ref) summed over the
    completion, or beta * (average log pi) when every loss type is reference-free (as in
    `preference_loss`); `kl/implicit` is the mean of the chosen and rejected log-ratios.
    """
    ref_c, ref_r = (None, None) if ref_B2 is None else (ref_B2[:, 0], ref_B2[:, 1])
    common = dict(
        chosen_lengths_B=lengths_B2[:, 0], rejected_lengths_B=lengths_B2[:, 1], **_loss_kwargs(hp)
    )
    loss_B, _ = preference_loss(
        logps_B2[:, 0], logps_B2[:, 1], ref_c, ref_r, loss_type=cfg.loss_type,
        loss_weights=hp.loss_weights, rpo_alpha=hp.rpo_alpha if cfg.rpo else None, **common,
    )  # fmt: skip
    sg_logps = jax.lax.stop_gradient(logps_B2)
    if ref_B2 is not None:
        rewards_B2 = hp.beta * (sg_logps - ref_B2)
    else:
        rewards_B2 = hp.beta * sg_logps / jnp.maximum(lengths_B2, 1.0)
    valid = valid_B.astype(jnp.float32)
    per_pair = {
        "rewards/chosen": rewards_B2[:, 0],
        "rewards/rejected": rewards_B2[:, 1],
        "rewards/margins": rewards_B2[:, 0] - rewards_B2[:, 1],
        "rewards/accuracies": (rewards_B2[:, 0] > rewards_B2[:, 1]).astype(jnp.float32),
        "logps/chosen": sg_logps[:, 0],
        "logps/rejected": sg_logps[:, 1],
        "lengths/chosen": lengths_B2[:, 0],
        "lengths/rejected": lengths_B2[:, 1],
    }
    if ref_B2 is not None:
        per_pair["kl/implicit"] = jnp.mean(sg_logps - ref_B2, axis=1)
    if cfg.rpo:
        per_pair["rpo/nll"] = -sg_logps[:, 0] / jnp.maximum(lengths_B2[:, 0], 1.0)
    if len(cfg.loss_types) > 1:  # the unweighted components of a mix
        for name in cfg.loss_types:
            term_B, _ = preference_loss(
                sg_logps[:, 0], sg_logps[:, 1], ref_c, ref_r, loss_type=name, **common
            )
            per_pair[f"loss/{name}"] = term_B
    sums = {k: jnp.sum(v * valid) for k, v in per_pair.items()}
    sums["pairs"] = jnp.sum(valid)
    return jnp.sum(loss_B * valid), sums


def _valid(batch: Batch) -> jax.Array:
    if "valid" in batch:
        return batch["valid"]
    return jnp.ones(batch["chosen_input_ids"].shape[:1], jnp.int32)


def dpo_loss_sums(
    state: TrainState,
    frozen: Frozen,
    params: nnx.State,
    batch: Batch,
    hp: DPOHParams,
    cfg: DPOConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Policy forward (differentiable in `params`), reference, and `pair_loss_sums`."""
    graphdef = state.models["policy"].graphdef
    logps_B2, lengths_B2 = pair_sequence_logps(graphdef, params, batch, cfg.logits_chunk_size)
    ref_B2 = reference_logps(state, frozen, batch, cfg)
    return pair_loss_sums(logps_B2, ref_B2, lengths_B2, _valid(batch), hp, cfg)


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
    """Host-side: eval sums over all batches -> per-pair means (`loss`, `rewards/...`, ...)."""
    pairs = max(float(sums["pairs"]), 1.0)
    out = {"loss": float(sums["loss_sum"]) / pairs, "pairs": float(sums["pairs"])}
    out.update({k: float(v) / pairs for k, v in sums.items() if k not in ("loss_sum", "pairs")})
    return out
