"""The reward stage end to end: the CLI run on the experiment gin file (metrics, gold columns,
NaN skip, run-directory files), SFT initialisation mapping the trunk exactly, the preference
data source, and an interrupted + resumed run equal to the uninterrupted one."""

from __future__ import annotations

import json
import threading

import gin
import jax
import numpy as np
import pytest
from flax import nnx
from rm_helpers import RM_HEADS, RM_NAN_STEP, RM_STEPS, rm_cli_args, tiny_config

from rlhf_jax import cli
from rlhf_jax import partitioning as P
from rlhf_jax.rundir import load_params, read_model_info
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.metrics import read_metrics
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.pairs import reward_preference_data
from rlhf_jax.train.reward_init import policy_to_reward_params, reward_state_factory


def test_cli_run_reports_metrics_and_writes_the_run_dir(rm_run, rm_prefs, rm_sft_run):
    summary = json.loads((rm_run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == RM_STEPS
    assert summary["nonfinite/skipped"] == 1  # the NaN injected at RM_NAN_STEP was skipped
    assert summary["compile/step_traces"] == 1
    for key in ("loss", "accuracy", "margin", "rewards/mean", "rewards/std", "calibration/ece",
                "gold/agreement", "gold/label_agreement", "gold/ceiling"):  # fmt: skip
        assert np.isfinite(summary[f"eval/{key}"]), key
        assert np.isfinite(summary[f"train/{key if key != 'loss' else 'bt_loss'}"]), key
    assert summary["eval/pairs"] == rm_prefs[1]["eval_pairs"]
    assert summary["data/columns"] == "chosen_score,label_prob,rejected_score"
    assert summary["reward/normalized"] is True
    assert 0.5 < summary["eval/gold/ceiling"] <= 1.0
    info = read_model_info(rm_run)
    assert info["model_class"] == "ScalarModel" and info["model_kwargs"] == {"num_heads": RM_HEADS}
    assert info["tokenizer"] == read_model_info(rm_sft_run)["tokenizer"]
    records = read_metrics(rm_run)
    assert [r["step"] for r in records if "train/loss" in r] == [10, 20, RM_STEPS]
    assert f"NUM_HEADS = {RM_HEADS}" in (rm_run / "config.gin").read_text()


def test_init_from_sft_maps_trunk_params_exactly(rm_sft_run):
    mesh, rules = P.make_mesh(), P.logical_rules()
    cfg = read_model_info(rm_sft_run)["model_config"]
    optimizer = make_optimizer(schedule="constant")
    factory, _ = reward_state_factory(cfg, optimizer, mesh, rules, num_heads=2,
                                      init_from=str(rm_sft_run))  # fmt: skip
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        params = nnx.to_pure_dict(factory.init().policy.params)
    policy = nnx.to_pure_dict(load_params(rm_sft_run, mesh=mesh, rules=rules).params)
    assert set(policy) == set(params["trunk"])  # tied embeddings: no lm_head to drop
    jax.tree.map(np.testing.assert_array_equal, params["trunk"], policy)
    # The heads are freshly initialised.
    np.testing.assert_array_equal(params["head_b"], 0.0)
    assert params["head_w"].shape == (cfg.d_model, 2)
    assert 0.5 * cfg.init_std < params["head_w"].std() < 2 * cfg.init_std


def test_policy_to_reward_params_drops_lm_head_and_checks_shapes():
    from rlhf_jax.rundir import abstract_model

    cfg = tiny_config(tie_embeddings=False)
    rng = np.random.default_rng(0)

    def concrete(abstract):
        return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), abstract)

    policy = concrete(abstract_model("Transformer", cfg)[1])
    reward = concrete(abstract_model("ScalarModel", cfg, num_heads=2)[1])
    assert "lm_head" in policy
    out = nnx.to_pure_dict(policy_to_reward_params(reward, policy))
    pol = nnx.to_pure_dict(policy)
    jax.tree.map(np.testing.assert_array_equal, out["trunk"], {k: pol[k] for k in out["trunk"]})
    np.testing.assert_array_equal(out["head_w"], nnx.to_pure_dict(reward)["head_w"])
    wrong = concrete(abstract_model("Transformer", tiny_config(d_ff=32))[1])
    with pytest.raises(ValueError, match="shape"):
        policy_to_reward_params(reward, wrong)
    deeper = concrete(abstract_model("Transformer", tiny_config(n_layers=2))[1])
    with pytest.raises(ValueError, match="structure"):
        policy_to_reward_params(reward, deeper)


def test_preference_data_carries_gold_columns_and_margin(rm_task, tmp_path):
    rows = [
        {"prompt": "the pizza", "chosen": " was great!", "rejected": " was awful.",
         "chosen_score": 0.8, "rejected_score": -0.6, "temperature": 0.5, "margin": 1.5},
        {"prompt": "the staff", "chosen": " was kind.", "rejected": "",  # bad row, skipped
         "chosen_score": 0.3, "rejected_score": 0.1, "temperature": 0.5, "margin": None},
        {"prompt": "my room", "chosen": " was clean.", "rejected": " was dirty.",
         "chosen_score": None, "rejected_score": -0.2, "temperature": 0.5, "margin": None},
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = reward_preference_data(
        2, tokenizer=rm_task.tokenizer_path, source=str(path), buckets=(16,),
        split_fraction=None, on_bad_row="skip",
    )  # fmt: skip
    assert data.eval is None and data.summary["data/train_pairs"] == 2
    batch = next(iter(data.train))
    order = np.argsort(-batch["margin"])  # the shuffled rows: first pair has margin 1.5
    np.testing.assert_allclose(batch["margin"][order], [1.5, 0.0])
    np.testing.assert_allclose(batch["chosen_score"][order][0], 0.8)
    assert np.isnan(batch["chosen_score"][order][1])
    p = 1 / (1 + np.exp(-(0.8 + 0.6) / 0.5))  # label_prob from the temperature column
    np.testing.assert_allclose(batch["label_prob"][order][0], p, rtol=1e-6)
    assert set(batch) >= {"chosen_input_ids", "rejected_attention_mask", "valid"}


def test_interrupted_and_resumed_run_equals_uninterrupted(rm_run, rm_prefs, rm_sft_run, tmp_path):
    """Stopped after step 10 (SIGTERM: checkpoint and exit 0), then resumed to the end: the
    same parameters and eval metrics as the uninterrupted run, NaN step skipped in both."""
    run = tmp_path / "rm_resumed"
    # No eval in these runs (saves compiling it): the parameters are what must match.
    args = [*rm_cli_args(run, rm_prefs[0], rm_sft_run), "--gin.LoopConfig.eval_batches=0"]
    if threading.current_thread() is threading.main_thread():
        stop = ["--gin.LoopConfig.fault_signal='SIGTERM'", "--gin.LoopConfig.fault_signal_step=9"]
    else:  # signal handlers need the main thread: end a shorter run with the same schedule
        args.append(f"--gin.make_optimizer.total_steps={RM_STEPS}")
        stop = ["--gin.TRAIN_STEPS=10"]
    assert cli.main(args + stop) == 0
    gin.clear_config()
    assert Checkpointer(run / "checkpoints").steps == [10]
    (run / "summary.json").unlink(missing_ok=True)
    assert cli.main(args) == 0
    gin.clear_config()
    resumed, straight = (json.loads((r / "summary.json").read_text()) for r in (run, rm_run))
    assert RM_NAN_STEP < 10
    assert resumed["nonfinite/skipped"] == straight["nonfinite/skipped"] == 1
    assert resumed["train/loss"] == straight["train/loss"]
    a, b = load_params(run).params, load_params(rm_run).params
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(a), nnx.to_pure_dict(b))


def test_truncated_rows_are_counted_in_the_summary(rm_task, tmp_path):
    """Long inputs are cut to max_len; how many were cut goes into summary.json."""
    long = " and it was good" * 30
    rows = [{"prompt": f"the pasta {i}", "chosen": long, "rejected": " bad."} for i in range(8)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = reward_preference_data(
        2, tokenizer=rm_task.tokenizer_path, source=str(path), buckets=(16,), split_fraction=None
    )
    assert data.summary["data/train/completion_truncated"] == 8
    assert data.summary["data/train/long_prompt_truncated"] == 0
