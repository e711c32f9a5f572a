"""Reward scoring: the batched, padded, sharded scorer equals a direct forward (right- and
left-padded inputs, one trace per variant whatever k), the pure function inside another jitted
program, the conservative score formula, and the normalisation round trip through a run
directory (statistics recorded at the end of training map the eval split to mean 0, std 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx
from rm_helpers import RM_HEADS, tiny_config

from rlhf_jax import partitioning as P
from rlhf_jax.reward_scoring import (
    NORM_FILE,
    RewardNormalization,
    RewardScorer,
    load_reward_model,
)
from rlhf_jax.steps.reward import ensemble_rewards, make_reward_fn
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.pairs import reward_preference_data
from rlhf_jax.train.reward_init import reward_state_factory

K, V = 3, 64


@pytest.fixture(scope="module")
def sharded_model():
    """A K-head reward model on a 2x2x2 mesh, plus its params copied to one device."""
    mesh, rules = P.make_mesh((2, 2, 2)), P.logical_rules()
    factory, graphdef = reward_state_factory(
        tiny_config(), make_optimizer(schedule="constant"), mesh, rules, seed=3, num_heads=K
    )
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        params = factory.init().policy.params
    single = jax.device_put(jax.tree.map(np.asarray, params), jax.devices()[0])
    return mesh, graphdef, params, single


def _direct(graphdef, params, ids, mask) -> np.ndarray:
    fwd = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m))
    return np.asarray(fwd(params, ids, mask))


def test_scorer_batched_padded_sharded_equals_direct_forward(sharded_model):
    mesh, graphdef, params, single = sharded_model
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, V, size=int(n)) for n in rng.integers(3, 21, size=11)]
    ids = np.zeros((11, 20), np.int32)
    mask = np.zeros((11, 20), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    expected = _direct(graphdef, single, ids, mask)  # [11, K], one device, no padding tricks

    scorer = RewardScorer(graphdef, params, mesh=mesh, batch_size=6, buckets=(32,), std_coef=1.5)
    assert scorer.rows == 8  # rounded up to a multiple of data x fsdp = 4
    out = scorer.score_tokens(seqs)  # two chunks (8 + 3 padded to 8), bucket 32
    np.testing.assert_allclose(out["heads"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["mean"], expected.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["std"], expected.std(1), rtol=1e-4, atol=1e-6)
    cons = expected.mean(1) - 1.5 * expected.std(1)
    np.testing.assert_allclose(out["conservative"], cons, rtol=1e-4, atol=1e-5)

    # Left-padded arrays score the same (positions follow the mask).
    left_ids, left_mask = np.zeros((11, 24), np.int32), np.zeros((11, 24), np.int32)
    for i, s in enumerate(seqs):
        left_ids[i, 24 - len(s) :], left_mask[i, 24 - len(s) :] = s, 1
    left = scorer.score_tokens(left_ids, left_mask, std_coef=0.0)
    np.testing.assert_allclose(left["heads"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(left["conservative"], left["mean"], rtol=1e-6)
    again = scorer.score_tokens(seqs, std_coef=3.0)  # k is traced: no new compile
    np.testing.assert_allclose(again["heads"], out["heads"])
    assert scorer.num_traces == 2  # one right-padded and one left-padded variant


def test_reward_fn_inside_another_jitted_program(sharded_model):
    _, graphdef, _, single = sharded_model
    norm_mean, norm_std = np.array([0.1, -0.2, 0.3]), np.array([2.0, 0.5, 1.0])
    reward_fn = make_reward_fn(graphdef, norm_mean=norm_mean, norm_std=norm_std)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, V, size=(4, 10)), jnp.int32)
    mask = jnp.ones((4, 10), jnp.int32).at[0, 7:].set(0)

    @jax.jit
    def program(params, ids, mask, k):  # e.g. a PPO step scoring its rollouts
        out = reward_fn(params, ids, mask, std_coef=k)
        return out["conservative"] - 0.01 * mask.sum(-1), out

    shaped, out = program(single, ids, mask, jnp.float32(2.0))
    raw = _direct(graphdef, single, ids, mask)
    heads = (raw - norm_mean) / norm_std
    np.testing.assert_allclose(out["heads"], heads, rtol=1e-5, atol=1e-6)
    expected = heads.mean(1) - 2.0 * heads.std(1) - 0.01 * np.asarray(mask.sum(-1))
    np.testing.assert_allclose(shaped, expected, rtol=1e-5, atol=1e-5)


def test_conservative_score_formula():
    scores = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    mean_k, std_k = np.array([0.5, 0, -1, 2], np.float32), np.array([1, 2, 0.5, 4], np.float32)
    out = jax.device_get(ensemble_rewards(scores, mean_k, std_k, std_coef=0.7))
    heads = (scores - mean_k) / std_k
    np.testing.assert_allclose(out["heads"], heads, rtol=1e-6)
    np.testing.assert_allclose(out["mean"], heads.mean(1), rtol=1e-6)
    np.testing.assert_allclose(out["std"], np.sqrt(((heads - heads.mean(1, keepdims=True)) ** 2)
                                                   .mean(1)), rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(out["conservative"], heads.mean(1) - 0.7 * heads.std(1), rtol=1e-5)
    one = jax.device_get(ensemble_rewards(scores[:, :1], std_coef=5.0))
    np.testing.assert_array_equal(one["std"], 0.0)
    np.testing.assert_array_equal(one["conservative"], scores[:, 0])


def test_normalization_file_round_trip(tmp_path):
    norm = RewardNormalization.create([0.5, -1.0], [2.0, 0.0], count=10, source="test")
    assert norm.std[1] > 0  # floored
    norm.save(tmp_path)
    assert RewardNormalization.load(tmp_path) == norm
    assert RewardNormalization.load(tmp_path / "missing") is None


def test_scorer_from_run_dir_normalizes_the_reference_sample(rm_run, rm_prefs):
    norm = RewardNormalization.load(rm_run)
    assert norm is not None and len(norm.mean) == RM_HEADS and norm.count > 0
    mesh = P.make_mesh((2, 2, 2))
    scorer = RewardScorer.from_run_dir(rm_run, mesh=mesh, batch_size=64, buckets=(48,))
    assert scorer.normalization == norm
    # The reference sample: the eval split's chosen and rejected sequences, as the stage saw them.
    data = reward_preference_data(16, tokenizer=scorer.tokenizer, source=rm_prefs[0],
                                  buckets=(48,))  # fmt: skip
    seqs = []
    for batch in data.eval:
        for side in ("chosen", "rejected"):
            for ids, m, v in zip(batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
                                 batch["valid"], strict=True):  # fmt: skip
                if v:
                    seqs.append(ids[: m.sum()])
    out = scorer.score_tokens(seqs)
    np.testing.assert_allclose(out["heads"].mean(0), 0.0, atol=2e-3)
    np.testing.assert_allclose(out["heads"].std(0), 1.0, rtol=2e-3)
    # Text in: tokenised exactly like the preference pipeline.
    df = pd.read_parquet(rm_prefs[0] / "eval.parquet")
    texts = scorer.score_texts(list(df["prompt"][:5]), list(df["chosen"][:5]))
    np.testing.assert_allclose(texts["heads"], out["heads"][:5], rtol=1e-5, atol=1e-5)
    assert (rm_run / NORM_FILE).exists()


def test_a_policy_run_is_refused_where_a_reward_model_is_expected(rm_sft_run):
    from rlhf_jax.errors import UserError

    with pytest.raises(UserError, match="policy run, but a reward-model run is expected"):
        load_reward_model(rm_sft_run)
