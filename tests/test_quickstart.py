"""The main job end to end: `rlhf-jax quickstart --fast` (about a minute on 2 cores: SFT,
preferences, reward model, DPO, PPO, RLOO, evaluation), then a rerun that skips every finished
stage."""

import json
import math

import pytest

from rlhf_jax.quickstart import quickstart


def test_fast_quickstart_runs_every_stage_and_reruns_from_its_outputs(tmp_path, capsys):
    out = tmp_path / "qs"
    report = quickstart(out_dir=str(out), fast=True)
    for name in (
        "task/tokenizer.json",
        "sft/summary.json",
        "preferences/train.parquet",
        "reward/summary.json",
        "dpo/summary.json",
        "ppo/summary.json",
        "rloo/summary.json",
        "sft/samples.jsonl",
        "dpo/samples.jsonl",
        "ppo/samples.jsonl",
        "rloo/samples.jsonl",
        "report.json",
        "report.md",
        "report.png",
    ):
        assert (out / name).exists(), name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "![" in (out / "report.md").read_text() and "report.png" in (out / "report.md").read_text()
    )

    res = report["results"]
    assert list(res) == ["SFT", "DPO", "PPO", "RLOO"]
    for policy in res.values():
        assert policy["samples"] == 64
        assert all(math.isfinite(v) for v in policy.values())
    assert res["SFT"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is SFT itself
    assert res["DPO"]["kl"] > 0.5  # DPO moved away from it (3.1 ± 0.4 nats measured)
    table = (out / "report.md").read_text()
    for name in res:
        assert f"| {name} |" in table, name
    # The online stages trained the SFT policy against the quickstart's own reward model (PPO
    # with a critic initialised from it), and their policies moved away from SFT.
    for name, sub, estimator in (("PPO", "ppo", "gae"), ("RLOO", "rloo", "rloo")):
        summary = json.loads((out / sub / "summary.json").read_text())
        assert summary["step"] == 4 and summary["rl/estimator"] == estimator, summary
        assert summary["rl/reward_source"] == "model"
        assert summary["rl/reward_run"] == str(out / "reward")
        assert math.isfinite(summary["train/reward/proxy"]) and summary["train/kl/k1"] > 0
        assert res[name]["kl"] > 0.0, name
    ppo_ckpt = json.loads((out / "ppo/model.json").read_text())
    assert ppo_ckpt["model_class"] == "Transformer"
    assert sorted(json.loads((out / "report.json").read_text())["timings_s"]) == [
        "dpo", "eval", "ppo", "preferences", "reward", "rloo", "sft",
    ]  # fmt: skip
    sft = json.loads((out / "sft/summary.json").read_text())
    assert sft["eval/loss"] < sft["baseline/unigram_eval_loss"] - 0.3  # SFT learned something
    assert json.loads((out / "report.json").read_text())["results"] == res

    capsys.readouterr()
    again = quickstart(out_dir=str(out), fast=True)
    printed = capsys.readouterr().out
    assert printed.count("already done") == 6  # SFT, preferences, reward model, DPO, PPO, RLOO
    assert again["results"] == res  # the evaluation is deterministic


def test_plot_policies_draws_the_scores_present_and_rejects_none(tmp_path):
    from rlhf_jax.eval.plots import plot_policies

    results = {"SFT": {"sentiment": 0.1, "kl": 0.0}, "DPO": {"sentiment": 0.7, "kl": 12.0}}
    path = plot_policies(results, tmp_path / "p.png")  # offensiveness absent: one panel
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="none of the scores"):
        plot_policies({"SFT": {"kl": 0.0}}, tmp_path / "q.png")
