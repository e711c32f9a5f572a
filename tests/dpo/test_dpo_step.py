"""The DPO step on the tiny model: loss moves the right way, reference modes agree, reference-free
types need no reference, mixes report their components. (Accumulation, one trace, NaN skip, mesh
independence and padding rows: tests/train/test_algorithm_contract.py.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dpo_helpers import cached_dpo_step, make_pair_batch, mesh, tiny_state

from rlhf_jax import partitioning
from rlhf_jax.data.examples import TokenizedDataset
from rlhf_jax.steps.algorithm import HParams
from rlhf_jax.steps.dpo import DPOConfig, DPOHParams, interleave_pairs
from rlhf_jax.train.ref_cache import compute_reference_logps

RNG = jax.random.key(0)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "kl/implicit", "lengths/chosen", "lengths/rejected", "logps/chosen", "loss")  # fmt: skip
DEFAULT = DPOConfig()


def _run(cfg, batches, hp=None, *, mesh_name="1", with_ref=True):
    """Steps from the shared initial state; returns the final state and per-step metrics."""
    state, frozen = tiny_state(mesh_name, with_ref=with_ref)
    step, _ = cached_dpo_step(cfg, mesh_name)
    hp = HParams.create(hp or DPOHParams.create(num_loss_types=len(cfg.loss_types)))
    history = []
    for batch in batches:
        state, metrics = step(state, frozen, batch, hp, RNG)
        history.append(jax.device_get(metrics))
    return state, history


def _close_trees(a, b, **tol):
    # atol covers Adam's first step on gradients that are float noise (g / |g| ~ +-1).
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_interleave_pairs_keeps_pairs_together():
    batch = {k: jnp.asarray(v) for k, v in make_pair_batch(0, rows=3).items()}
    batch["valid"] = jnp.asarray([1, 0, 1])
    ids, attn, mask = interleave_pairs(batch)
    np.testing.assert_array_equal(ids[0::2], batch["chosen_input_ids"])
    np.testing.assert_array_equal(ids[1::2], batch["rejected_input_ids"])
    np.testing.assert_array_equal(attn[3], batch["rejected_attention_mask"][1])
    assert mask[2].sum() == 0 and mask[3].sum() == 0  # padding row: no completion tokens


def test_loss_decreases_on_repeated_batch():
    batch = make_pair_batch(1)
    _, hist = _run(DEFAULT, [batch] * 6)
    first, last = hist[0], hist[-1]
    np.testing.assert_allclose(first["loss"], np.log(2.0), rtol=1e-5)  # policy == reference
    assert abs(first["kl/implicit"]) < 1e-6 and first["rewards/margins"] == 0.0
    assert last["loss"] < first["loss"] - 0.05
    assert last["rewards/margins"] > 0.1 and last["rewards/accuracies"] == 1.0
    assert last["rewards/chosen"] > last["rewards/rejected"]
    for k in (*METRICS, "grad_norm", "lr", "nonfinite/skipped", "pairs"):
        assert np.isfinite(last[k]), k
    mask = batch["chosen_loss_mask"]
    np.testing.assert_allclose(first["lengths/chosen"], mask.sum() / len(mask))


def _as_examples(batch) -> TokenizedDataset:
    rows = []
    for b in range(len(batch["margin"])):
        row = {"margin": 0.0}
        for side in ("chosen", "rejected"):
            n = int(batch[f"{side}_attention_mask"][b].sum())
            row[f"{side}_input_ids"] = batch[f"{side}_input_ids"][b, :n]
            row[f"{side}_completion_start"] = int(np.argmax(batch[f"{side}_loss_mask"][b]))
        rows.append(row)
    return TokenizedDataset("preference", rows, {}, pad_id=0)


def test_precomputed_reference_equals_params_reference():
    batch = make_pair_batch(2)
    _, frozen = tiny_state("1")
    # Computed with another batching (3 rows, padded last batch, a longer bucket).
    chosen, rejected = compute_reference_logps(
        frozen.graphdefs["ref"], frozen.params["ref"], _as_examples(batch), batch_size=3,
        buckets=(32,), mesh=mesh("1"), rules=partitioning.logical_rules(),
    )  # fmt: skip
    pre = dict(batch, ref_chosen_logps=chosen, ref_rejected_logps=rejected)
    s_par, h_par = _run(DEFAULT, [batch] * 3)
    s_pre, h_pre = _run(DPOConfig(reference="precomputed"), [pre] * 3, with_ref=False)
    for i, (a, b) in enumerate(zip(h_par, h_pre, strict=True)):
        for k in METRICS:
            if k == "rewards/accuracies" and i == 0:
                continue  # at step 0 every reward is 0 up to rounding: accuracy is noise
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-5, err_msg=k)
    _close_trees(s_par.policy.params, s_pre.policy.params, rtol=1e-4, atol=5e-5)


def test_precomputed_mode_requires_the_fields():
    with pytest.raises(KeyError, match="ref_chosen_logps"):
        _run(DPOConfig(reference="precomputed"), [make_pair_batch(0)], with_ref=False)


def test_reference_free_types_run_without_reference():
    # A SimPO + ORPO mix: both reference-free; no reference fields, no frozen reference.
    cfg = DPOConfig(loss_type=("simpo", "orpo"), reference="precomputed")
    assert not cfg.needs_reference and not cfg.uses_ref_params
    hp = DPOHParams.create(num_loss_types=2, beta=2.0, gamma=0.5, orpo_lambda=0.5)
    _, hist = _run(cfg, [make_pair_batch(3)] * 4, hp, with_ref=False)
    assert "kl/implicit" not in hist[0]
    for h in hist:
        assert np.isfinite(h["loss/simpo"]) and np.isfinite(h["loss/orpo"])
        np.testing.assert_allclose(h["loss"], h["loss/simpo"] + h["loss/orpo"], rtol=1e-5)
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"]


def test_mixture_and_rpo_report_components():
    cfg = DPOConfig(loss_type=("sigmoid", "bco_pair", "ipo"), rpo=True)
    hp = DPOHParams.create(num_loss_types=3, loss_weights=[0.8, 0.2, 1.0], rpo_alpha=0.5)
    _, hist = _run(cfg, [make_pair_batch(4)], hp)
    m = hist[0]
    mix = 0.8 * m["loss/sigmoid"] + 0.2 * m["loss/bco_pair"] + m["loss/ipo"]
    assert m["rpo/nll"] > 0
    np.testing.assert_allclose(m["loss"], mix + 0.5 * m["rpo/nll"], rtol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        DPOConfig(loss_type="nope")
    with pytest.raises(ValueError, match="reference"):
        DPOConfig(reference="online")
    assert DPOConfig(loss_type=["sigmoid", "ipo"]).loss_types == ("sigmoid", "ipo")
    with pytest.raises(ValueError, match="loss_weights"):
        DPOHParams.create(num_loss_types=2, loss_weights=[1.0])
