"""A DPO run that starts from a Hugging Face directory: the SFT run is exported with
`rlhf-jax export`, then DPO runs with gin/models/hf.gin and HF_PATH on it; the imported
starting point equals the SFT policy and the run uses the exported tokenizer."""

from __future__ import annotations

import json

import gin
import numpy as np
import transformers  # noqa: F401  (test extra: a missing install fails, never skips)
from flax import nnx
from support import QUIET_RUN

from rlhf_jax import cli
from rlhf_jax.rundir import load_params, read_model_info


def _params(path):
    loaded = load_params(path)
    flat = {}
    for p, v in nnx.to_flat_state(loaded.params):
        flat["/".join(map(str, p))] = np.asarray(v.get_value())
    return flat


def test_dpo_from_exported_checkpoint(sft_run, reviews, tmp_path, capsys):
    _, prefs, _ = reviews
    out = tmp_path / "sft_hf"
    assert cli.main(["export", str(sft_run), str(out), "--log_level=WARNING"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    # A second export onto the same folder is refused with one message, leaving it intact.
    assert cli.main(["export", str(sft_run), str(out), "--log_level=WARNING"]) == 2
    assert "not empty" in capsys.readouterr().err
    gin.clear_config()
    run = tmp_path / "dpo"
    argv = [
        "train",
        "--gin_file", "gin/experiments/dpo_reviews_tiny.gin",
        "--gin_file", "gin/models/hf.gin",
        f"--gin.HF_PATH={out}",
        f"--gin.HF_IMPORT_DIR={tmp_path / 'imports'}",
        f"--gin.RUN_DIR={run}",
        f"--gin.PREFERENCES={prefs}",
        "--gin.REFERENCE='params'",
        "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=16",
        "--gin.BUCKETS=(48,)",
        *QUIET_RUN,
    ]  # fmt: skip
    assert cli.main(argv) == 0
    gin.clear_config()
    assert (run / "summary.json").is_file()
    (imported,) = (tmp_path / "imports").iterdir()
    assert read_model_info(run)["tokenizer"] == str((out / "tokenizer.json").absolute())
    want, got = _params(sft_run), _params(imported)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_export_of_a_non_run_is_a_user_error(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "run directory" in capsys.readouterr().err
