"""SFT and reward-model runs that start from a Hugging Face directory (gin/models/hf.gin;
DPO's is tests/dpo/test_dpo_from_hf.py): the SFT run is exported with `rlhf-jax export`, a
few SFT steps and a few reward-model steps train from it with the exported tokenizer, and
`rlhf-jax export` of the reward run gives a one-label `*ForSequenceClassification` that scores
like the ensemble's mean head. LoRA settings in the reward-model stage are refused with one
message (exit code 2)."""

from __future__ import annotations

import json

import gin
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from support import QUIET_RUN

from rlhf_jax import cli
from rlhf_jax.rundir import load_params, read_model_info


def _argv(experiment, run, hf_dir, imports, *extra):
    return [
        "train",
        "--gin_file", f"gin/experiments/{experiment}.gin",
        "--gin_file", "gin/models/hf.gin",
        *extra,
        f"--gin.HF_PATH={hf_dir}",
        f"--gin.HF_IMPORT_DIR={imports}",
        f"--gin.RUN_DIR={run}",
        "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=16",
        *QUIET_RUN,
    ]  # fmt: skip


def test_reward_model_from_exported_checkpoint(sft_run, reviews, tmp_path):
    _, prefs, _ = reviews
    hf_dir = tmp_path / "sft_hf"
    assert cli.main(["export", str(sft_run), str(hf_dir), "--log_level=WARNING"]) == 0
    gin.clear_config()
    run, imports = tmp_path / "rm", tmp_path / "imports"
    try:
        argv = _argv("reward_reviews_tiny", run, hf_dir, imports, "--gin.NUM_HEADS=2",
                     f"--gin.PREFERENCES={prefs}")  # fmt: skip
        assert cli.main(argv) == 0
    finally:
        gin.clear_config()
    assert json.loads((run / "summary.json").read_text())["step"] == 2
    info = read_model_info(run)
    assert info["tokenizer"] == str((hf_dir / "tokenizer.json").absolute())
    assert info["model_config"] == read_model_info(sft_run)["model_config"]
    # The trunk started from the import, which is the SFT policy bit for bit.
    (imported,) = imports.iterdir()
    sft = nnx.to_flat_state(load_params(sft_run).params)
    got = dict(nnx.to_flat_state(load_params(imported).params))
    for path, var in sft:
        np.testing.assert_array_equal(
            np.asarray(got[path].get_value()), np.asarray(var.get_value()), err_msg=str(path)
        )

    out = tmp_path / "rm_hf"
    assert cli.main(["export", str(run), str(out), "--log_level=WARNING"]) == 0
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out).float().eval()
    assert theirs.config.num_labels == 1 and (out / "reward_heads.safetensors").is_file()
    loaded = load_params(run)
    ours = nnx.merge(loaded.graphdef, loaded.params)
    ids = np.random.default_rng(0).integers(4, 200, (2, 12))
    mask = np.ones_like(ids)
    mine = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)))  # [B, 2]
    bias = np.asarray(ours.head_b.get_value()).mean()
    with torch.no_grad():
        score = theirs(input_ids=torch.as_tensor(ids)).logits[:, 0].numpy()
    np.testing.assert_allclose(score, mine.mean(-1) - bias, atol=1e-4, rtol=0)


def test_sft_from_exported_checkpoint(sft_run, reviews, tmp_path):
    """SFT from HF_PATH: the policy starts from the import and the data is tokenized with the
    HF directory's tokenizer (recorded in model.json for the later stages)."""
    task = reviews[0]
    hf_dir = tmp_path / "sft_hf"
    assert cli.main(["export", str(sft_run), str(hf_dir), "--log_level=WARNING"]) == 0
    gin.clear_config()
    run, imports = tmp_path / "sft2", tmp_path / "imports"
    # The fixture's reviews task (same settings, so it is reused, not rebuilt).
    task_args = [f"--gin.REVIEWS_DIR={task.out_dir!r}", "--gin.REVIEWS_NUM_TEXTS=3000",
                 "--gin.reviews_task.num_prompts=32", "--gin.reviews_task.num_eval_prompts=16",
                 "--gin.LEARNING_RATE=1e-3"]  # fmt: skip
    try:
        assert cli.main(_argv("sft_reviews_tiny", run, hf_dir, imports, *task_args)) == 0
    finally:
        gin.clear_config()
    assert json.loads((run / "summary.json").read_text())["step"] == 2
    info = read_model_info(run)
    assert info["tokenizer"] == str((hf_dir / "tokenizer.json").absolute())
    assert info["model_config"] == read_model_info(sft_run)["model_config"]
    (imported,) = imports.iterdir()
    base = dict(nnx.to_flat_state(load_params(imported).params))
    tuned = dict(nnx.to_flat_state(load_params(run).params))
    assert base.keys() == tuned.keys()
    moved = [p for p in base if not np.array_equal(base[p].get_value(), tuned[p].get_value())]
    assert moved  # it trained from the import


def test_lora_in_the_reward_stage_is_a_user_error(sft_run, reviews, tmp_path, capsys):
    _, prefs, _ = reviews
    gin.clear_config()
    argv = [
        "train",
        "--gin_file", "gin/experiments/reward_reviews_tiny.gin",
        "--gin_file", "gin/algorithms/lora.gin",
        f"--gin.SFT_RUN={sft_run}",
        f"--gin.RUN_DIR={tmp_path / 'rm'}",
        f"--gin.PREFERENCES={prefs}",
        "--log_level=WARNING",
    ]  # fmt: skip
    try:
        assert cli.main(argv) == 2
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    assert "LoRA is not supported by reward_stage" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rm").exists()  # refused before the run directory is touched
