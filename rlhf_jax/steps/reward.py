"""Reward-model training and scoring as pure functions: the Bradley-Terry step, its eval step, the
bootstrap weights of a K-head ensemble, and the pure scoring function other jitted programs call.

Batch format (preference batches from the data pipeline, global `jax.Array`s here):
`chosen_input_ids`, `chosen_attention_mask`, `rejected_input_ids`, `rejected_attention_mask`
[B, T] int32, right-padded to one bucket; `margin` [B] float32; `valid` [B] (0 on padding rows of
the last eval batch). Optional gold columns [B] float32 (NaN where unknown): `chosen_score`,
`rejected_score` (the gold judge's scores) and `label_prob` (the labeller's probability of
preferring the chosen side); their statistics are computed only when the batch has them.

One forward per step. Chosen and rejected sequences are concatenated along the batch axis, but
interleaved (`stack(axis=1).reshape(2B, T)`, row 2b = chosen b, row 2b+1 = rejected b) rather
than stacked end to end: with rows sharded over (data, fsdp) in contiguous blocks, each device's
block of B/n pairs becomes its block of 2B/n sequences, so nothing moves between devices.

Ensembles and the bootstrap. A `ScalarModel` with K heads shares one trunk. Head k sees pair i
with weight w_ik ~ Poisson(1) (the "Poisson bootstrap" of Oza & Russell 2001; as used for
Bootstrapped DQN, Osband et al. 2016), a deterministic function of the pair's identity: a hash of
its chosen and rejected token ids (real tokens only, so the bucket length does not matter),
mixed with k and a (traced) seed and pushed through the Poisson(1) inverse CDF. A pair therefore
keeps its weight for head k in every epoch and on every host, which makes each head's training
set one fixed bootstrap resample of the data, rather than a fresh reweighting per step (which
would average out and leave the heads nearly identical). The hash is our own (murmur3's 32-bit
finaliser over position-salted token ids), so it does not change with jax's PRNG. Each head's
loss is its weighted mean over the batch (the weights' total is computed from the whole batch
before micro-batching, so gradient accumulation stays exact), and the objective is the mean over
heads. With K = 1 every weight is 1.

Reported statistics are those of the ensemble: the mean reward over heads decides accuracy and
margin; the preference probability used for calibration is the mean over heads of
sigmoid(r_c - r_r).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from rlhf_jax import settings
from rlhf_jax.losses.reward import bradley_terry_loss
from rlhf_jax.partitioning import with_logical_constraint
from rlhf_jax.steps.algorithm import Algorithm
from rlhf_jax.steps.common import Batch

GOLD_FIELDS = ("chosen_score", "rejected_score")
LABEL_PROB_FIELD = "label_prob"
# Poisson(1) CDF P(X <= j), j = 0..11 (P(X > 11) < 1e-9, beyond the uniform's resolution).
_POISSON1_CDF = np.cumsum([math.exp(-1.0) / math.factorial(j) for j in range(12)])


@dataclasses.dataclass(frozen=True)
class RewardConfig(Algorithm):
    """The Bradley-Terry reward model as an `Algorithm` (static settings, bound before `jit`).

    It trains the model "reward" of the state (a `ScalarModel`).

    Attributes:
      grad_accum_steps: micro-batches per step.
      num_heads: K, the ensemble size (heads of the `ScalarModel`).
      bootstrap: with K > 1, weight pairs per head by their Poisson(1) bootstrap counts (the
        seed is traced: `RewardHParams.bootstrap_seed`).
      freeze_trunk: stop gradients at the trunk (the stage pairs it with an optimiser that
        freezes `^trunk/`, so the trunk gets no update and keeps no optimiser state).
      ece_bins: bins of the expected calibration error.
    """

    model: ClassVar[str] = "reward"

    num_heads: int = 1
    bootstrap: bool = True
    freeze_trunk: bool = False
    ece_bins: int = 10

    def prepare(self, batch, hp):
        # Each head's weight total over the whole batch, so every micro-batch divides by the same.
        return jnp.maximum(pair_weights(batch, self, hp.bootstrap_seed).sum(0), 1.0)

    def loss_sums(self, state, frozen, params, batch, rng, hp, prepared):
        """The objective (already a weighted mean: denominator 1) and `pair_statistics` sums."""
        del frozen, rng
        return reward_objective(state.models["reward"].graphdef, params, batch, hp, prepared, self)

    def train_metrics(self, sums, denom):
        return summarize_statistics(sums)

    def eval_sums(self, state, frozen, batch, hp):
        """The eval loss is the plain Bradley-Terry NLL (no margin, smoothing or centering), so
        runs with different training hyperparameters compare on one scale."""
        r_c, r_r = pair_rewards(state.models["reward"].module(), batch)
        loss_BK, _ = bradley_terry_loss(r_c, r_r)
        return pair_statistics(r_c, r_r, loss_BK, batch, self.ece_bins, per_head=True)

    def summarize_eval(self, sums):
        return summarize_eval(sums)


@struct.dataclass
class RewardHParams:
    """Traced reward-model hyperparameters: changing them does not recompile the step.

    Attributes:
      label_smoothing: probability that a label is flipped (conservative BT loss).
      center_coef: weight of the reward-centering term (r_c + r_r)^2.
      margin_scale: multiplies the batch's per-pair `margin` (0 ignores it).
      bootstrap_seed: seed folded into the bootstrap hash (a different resample per seed);
        traced, so a population over seeds compiles once.
    """

    label_smoothing: jax.Array
    center_coef: jax.Array
    margin_scale: jax.Array
    bootstrap_seed: jax.Array

    @classmethod
    def create(
        cls,
        label_smoothing: float = 0.0,
        center_coef: float = 0.0,
        margin_scale: float = 1.0,
        bootstrap_seed: int = 0,
    ) -> RewardHParams:
        """The pytree, after checking each value's type and range.

        Raises:
          errors.SettingsError: naming the gin macro (0 <= LABEL_SMOOTHING < 1,
            CENTER_COEF >= 0, MARGIN_SCALE finite, an integer seed).
        """
        settings.in_range("reward_hparams.label_smoothing (LABEL_SMOOTHING)", label_smoothing,
                          0.0, 1.0, high_open=True)  # fmt: skip
        settings.nonneg_float("reward_hparams.center_coef (CENTER_COEF)", center_coef)
        settings.finite("reward_hparams.margin_scale (MARGIN_SCALE)", margin_scale)
        settings.integer("reward_hparams.bootstrap_seed", bootstrap_seed)
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return cls(
            label_smoothing=f32(label_smoothing),
            center_coef=f32(center_coef),
            margin_scale=f32(margin_scale),
            bootstrap_seed=jnp.asarray(bootstrap_seed & 0xFFFFFFFF, jnp.uint32),
        )


# ----------------------------------------------------------------------------- bootstrap


def _mix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: an invertible mix of uint32 values (wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def sequence_hash(ids_BT: jax.Array, mask_BT: jax.Array, salt: int = 0) -> jax.Array:
    """uint32 [B] hash of each row's real tokens and their positions (padding is ignored)."""
    pos_T = jnp.arange(ids_BT.shape[1], dtype=jnp.uint32)
    token_BT = _mix32(ids_BT.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + _mix32(pos_T + salt))
    return jnp.sum(jnp.where(mask_BT.astype(bool), token_BT, jnp.uint32(0)), axis=1)


def pair_hash(batch: Batch) -> jax.Array:
    """uint32 [B] identity of each preference pair (prompt, chosen and rejected tokens)."""
    h_c = sequence_hash(batch["chosen_input_ids"], batch["chosen_attention_mask"], salt=1)
    h_r = sequence_hash(batch["rejected_input_ids"], batch["rejected_attention_mask"], salt=2)
    return _mix32(h_c ^ _mix32(h_r + jnp.uint32(0x27D4EB2F)))


def bootstrap_counts(
    hash_B: jax.Array, num_heads: int, seed: jax.typing.ArrayLike = 0
) -> jax.Array:
    """Poisson(1) counts [B, K] (float32), a deterministic function of (hash, head, seed).

    `seed` may be traced (a uint32 scalar, or a Python int taken modulo 2^32)."""
    if isinstance(seed, int):
        seed = seed & 0xFFFFFFFF
    head_K = jnp.arange(1, num_heads + 1, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
    seed = jnp.asarray(seed).astype(jnp.uint32)
    key_B = _mix32(hash_B ^ _mix32(seed + jnp.uint32(0x165667B1)))
    bits_BK = _mix32(_mix32(key_B[:, None] + head_K[None, :]))
    u_BK = (bits_BK >> 8).astype(jnp.float32) * (1.0 / (1 << 24))  # uniform on [0, 1)
    cdf = jnp.asarray(_POISSON1_CDF, jnp.float32)
    return jnp.sum(u_BK[..., None] >= cdf, axis=-1).astype(jnp.float32)


def pair_weights(batch: Batch, cfg: RewardConfig, seed: jax.typing.ArrayLike = 0) -> jax.Array:
    """[B, K] loss weights: `valid` times the bootstrap counts (all ones when K = 1)."""
    B = batch["chosen_input_ids"].shape[0]
    valid_B = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones((B,))
    if not cfg.bootstrap or cfg.num_heads == 1:
        return jnp.broadcast_to(valid_B[:, None], (B, cfg.num_heads))
    counts = bootstrap_counts(pair_hash(batch), cfg.num_heads, seed)
    return counts * valid_B[:, None]


# ----------------------------------------------------------------------------- forward


def pair_rewards(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Rewards [B, K] of the chosen and the rejected sequences, from one forward pass."""
    B, T = batch["chosen_input_ids"].shape

    def interleave(name: str) -> jax.Array:
        both = jnp.stack([batch[f"chosen_{name}"], batch[f"rejected_{name}"]], axis=1)
        return with_logical_constraint(both.reshape(2 * B, T), ("batch", "length"))

    scores = model(interleave("input_ids"), interleave("attention_mask"), right_padded=True)
    scores_B2K = scores.reshape(B, 2, -1)
    return scores_B2K[:, 0], scores_B2K[:, 1]


def _stop_trunk_gradient(params: nnx.State) -> nnx.State:
    return nnx.State({**params, "trunk": jax.lax.stop_gradient(params["trunk"])})


# ----------------------------------------------------------------------------- statistics


def pair_statistics(
    r_c_BK: jax.Array,
    r_r_BK: jax.Array,
    loss_BK: jax.Array,
    batch: Batch,
    num_bins: int,
    per_head: bool = False,
) -> dict[str, jax.Array]:
    """Sums over the valid pairs of a batch, from which `summarize_statistics` makes metrics.

    Sums (not means) so that micro-batches and eval batches add up exactly. Keys under `gold/`
    appear only when the batch has the gold columns; `heads/` ones only with `per_head`.
    """
    B, K = r_c_BK.shape
    v_B = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones((B,))
    # Select rather than multiply: a padding row's outputs may be NaN (e.g. a fused attention
    # kernel over zero tokens), and NaN * 0 is NaN.
    keep = v_B[:, None] > 0
    r_c_BK, r_r_BK, loss_BK = (
        jnp.where(keep, jax.lax.stop_gradient(x), 0.0) for x in (r_c_BK, r_r_BK, loss_BK)
    )
    rc_B, rr_B = r_c_BK.mean(-1), r_r_BK.mean(-1)
    diff_B = rc_B - rr_B
    s = {
        "pairs": v_B.sum(),
        "loss": (loss_BK.mean(-1) * v_B).sum(),
        "correct": ((diff_B > 0) * v_B).sum(),
        "correct_heads": ((r_c_BK > r_r_BK).mean(-1) * v_B).sum(),
        "margin": (diff_B * v_B).sum(),
        "chosen": (rc_B * v_B).sum(),
        "rejected": (rr_B * v_B).sum(),
        "sq": ((rc_B**2 + rr_B**2) * v_B).sum(),
        "head_std": ((r_c_BK.std(-1) + r_r_BK.std(-1)) * v_B).sum(),
    }
    # Calibration of p = P(chosen wins): both orientations of each pair, (p, 1) and (1 - p, 0),
    # so that a bin's label frequency is the observed win rate at that confidence.
    p_B = jax.nn.sigmoid(r_c_BK - r_r_BK).mean(-1)
    probs, labels = jnp.concatenate([p_B, 1 - p_B]), jnp.concatenate([v_B, 0 * v_B])
    bins = jnp.clip(jnp.floor(probs * num_bins).astype(jnp.int32), 0, num_bins - 1)
    weights = jnp.concatenate([v_B, v_B])
    for name, vals in (("n", weights), ("p", probs * weights), ("y", labels)):
        per_bin = jax.ops.segment_sum(vals, bins, num_segments=num_bins)
        s.update({f"ece/{name}{i}": per_bin[i] for i in range(num_bins)})
    if all(f in batch for f in GOLD_FIELDS):
        gold_B = batch["chosen_score"] - batch["rejected_score"]
        decided_B = v_B * (jnp.isfinite(gold_B) & (gold_B != 0))
        gold_B = jnp.where(decided_B > 0, gold_B, 0.0)
        s["gold/pairs"] = decided_B.sum()
        s["gold/agree"] = ((jnp.sign(diff_B) == jnp.sign(gold_B)) * decided_B).sum()
        s["gold/label_agree"] = ((gold_B > 0) * decided_B).sum()
    if LABEL_PROB_FIELD in batch:
        p_label_B = batch[LABEL_PROB_FIELD]
        known_B = v_B * jnp.isfinite(p_label_B)
        p_label_B = jnp.where(known_B > 0, p_label_B, 0.5)
        s["gold/prob_pairs"] = known_B.sum()
        s["gold/ceiling"] = (jnp.maximum(p_label_B, 1 - p_label_B) * known_B).sum()
    if per_head:
        for k in range(K):
            s[f"heads/sum{k}"] = ((r_c_BK[:, k] + r_r_BK[:, k]) * v_B).sum()
            s[f"heads/sq{k}"] = ((r_c_BK[:, k] ** 2 + r_r_BK[:, k] ** 2) * v_B).sum()
    return s


def summarize_statistics(sums: Mapping[str, Any], xp: Any = jnp) -> dict[str, Any]:
    """Metrics from `pair_statistics` sums: `xp=jnp` inside a step, `xp=np` on host floats.

    Returns:
      `bt_loss` (plain BT loss, mean over heads and pairs), `accuracy`, `accuracy/heads`,
      `margin`, `rewards/chosen`, `rewards/rejected`, `rewards/mean`, `rewards/std`,
      `rewards/head_std`, `calibration/ece`, `pairs`; with gold columns `gold/agreement` (RM
      preference agrees with the gold judge), `gold/label_agreement` (the labels do) and
      `gold/ceiling` (mean max(p, 1 - p) of the labeller); with per-head sums
      `rewards/head{k}_mean` and `rewards/head{k}_std`.
    """
    n = xp.maximum(sums["pairs"], 1.0)
    mean = (sums["chosen"] + sums["rejected"]) / (2 * n)
    out = {
        "bt_loss": sums["loss"] / n,
        "accuracy": sums["correct"] / n,
        "accuracy/heads": sums["correct_heads"] / n,
        "margin": sums["margin"] / n,
        "rewards/chosen": sums["chosen"] / n,
        "rewards/rejected": sums["rejected"] / n,
        "rewards/mean": mean,
        "rewards/std": xp.sqrt(xp.maximum(sums["sq"] / (2 * n) - mean**2, 0.0)),
        "rewards/head_std": sums["head_std"] / (2 * n),
        "pairs": sums["pairs"],
    }
    num_bins = sum(1 for k in sums if k.startswith("ece/n"))
    gap = sum(abs(sums[f"ece/y{i}"] - sums[f"ece/p{i}"]) for i in range(num_bins))
    out["calibration/ece"] = gap / xp.maximum(sum(sums[f"ece/n{i}"] for i in range(num_bins)), 1)
    if "gold/pairs" in sums:
        g = xp.maximum(sums["gold/pairs"], 1.0)
        out["gold/agreement"] = sums["gold/agree"] / g
        out["gold/label_agreement"] = sums["gold/label_agree"] / g
    if "gold/prob_pairs" in sums:
        out["gold/ceiling"] = sums["gold/ceiling"] / xp.maximum(sums["gold/prob_pairs"], 1.0)
    for k in range(sum(1 for key in sums if key.startswith("heads/sum"))):
        m = sums[f"heads/sum{k}"] / (2 * n)
        out[f"rewards/head{k}_mean"] = m
        var = sums[f"heads/sq{k}"] / (2 * n) - m**2
        out[f"rewards/head{k}_std"] = xp.sqrt(xp.maximum(var, 0.0))
    return out


# ----------------------------------------------------------------------------- steps


def reward_objective(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: Batch,
    hp: RewardHParams,
    totals_K: jax.Array,
    cfg: RewardConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Bradley-Terry objective of one (micro-)batch and its `pair_statistics` sums.

    Objective: mean over heads k of sum_i w_ik * BT(r_c,ik, r_r,ik; margin_scale * margin_i)
    / totals_K[k], with `losses.bradley_terry_loss` (label smoothing and centering traced) and
    `totals_K` the heads' weight totals over the whole batch (so micro-batches add up exactly).
    """
    if cfg.freeze_trunk:
        params = _stop_trunk_gradient(params)
    r_c, r_r = pair_rewards(nnx.merge(graphdef, params), batch)
    margin_B = batch["margin"] if "margin" in batch else jnp.zeros(r_c.shape[:1])
    loss_BK, _ = bradley_terry_loss(
        r_c,
        r_r,
        margin_B=hp.margin_scale * margin_B.astype(jnp.float32)[:, None],
        label_smoothing=hp.label_smoothing,
        center_coef=hp.center_coef,
    )
    w_BK = pair_weights(batch, cfg, hp.bootstrap_seed)
    weighted_BK = jnp.where(w_BK > 0, loss_BK * w_BK, 0.0)  # padding rows: 0, never NaN
    objective = jnp.sum(weighted_BK / totals_K) / cfg.num_heads
    return objective, pair_statistics(r_c, r_r, loss_BK, batch, cfg.ece_bins)


def summarize_eval(sums: Mapping[str, float]) -> dict[str, float]:
    """Host-side: eval sums over all batches -> metrics (`loss` = the plain BT loss)."""
    out = {k: float(v) for k, v in summarize_statistics(sums, xp=np).items()}
    out["loss"] = out.pop("bt_loss")
    return out


# ----------------------------------------------------------------------------- scoring


def ensemble_rewards(
    scores_BK: jax.Array,
    norm_mean_K: jax.Array | None = None,
    norm_std_K: jax.Array | None = None,
    std_coef: jax.typing.ArrayLike = 1.0,
) -> dict[str, jax.Array]:
    """Per-head rewards (normalised when stats are given) and their ensemble summaries.

    Each head is normalised on its own, (r_k - mean_k) / std_k: a Bradley-Terry reward's offset
    and scale are unidentified per head, so raw heads would disagree by constants and inflate
    the spread across heads.

    Returns:
      `heads` [B, K], `mean` [B], `std` [B] (population std over heads; 0 when K = 1) and
      `conservative` [B] = mean - std_coef * std (Coste et al. 2024, "Reward Model Ensembles
      Help Mitigate Overoptimization", uncertainty-weighted optimisation).
    """
    r = scores_BK.astype(jnp.float32)
    if norm_mean_K is not None:
        r = r - jnp.asarray(norm_mean_K, jnp.float32)
    if norm_std_K is not None:
        r = r / jnp.asarray(norm_std_K, jnp.float32)
    mean_B, std_B = r.mean(-1), r.std(-1)
    conservative_B = mean_B - jnp.asarray(std_coef, jnp.float32) * std_B
    return {"heads": r, "mean": mean_B, "std": std_B, "conservative": conservative_B}


RewardFn = Callable[..., dict[str, jax.Array]]


def make_reward_fn(
    graphdef: nnx.GraphDef,
    *,
    norm_mean: Any = None,
    norm_std: Any = None,
    right_padded: bool = False,
) -> RewardFn:
    """A pure `reward_fn(params, input_ids, attention_mask, std_coef=1.0) -> dict`.

    Usable inside any jitted program (a PPO step, a sampler): no host round trips; padding may
    be on either side (positions follow the mask) unless `right_padded` promises the right side.
    The normalisation statistics, when given, are baked in as constants.

    Returns:
      The function; its dict is `ensemble_rewards`'s (`heads`, `mean`, `std`, `conservative`).
    """
    mean_K = None if norm_mean is None else np.asarray(norm_mean, np.float32)
    std_K = None if norm_std is None else np.asarray(norm_std, np.float32)

    def reward_fn(params, input_ids, attention_mask, std_coef=1.0) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        scores_BK = model(input_ids, attention_mask, right_padded=right_padded)
        return ensemble_rewards(scores_BK, mean_K, std_K, std_coef)

    return reward_fn
