"""The user-error contract, as a table: every bad input to `train`, `generate`,
`make-preferences`, `quickstart` and `info` (settings, gin, data files, run directories) exits
with code 2 and one message without a traceback, before anything is written: the run
directories, output folders and data the command was pointed at are byte-for-byte unchanged,
and a run directory that did not exist is not created.

Most rows run the CLI in this process (`cli.main`); `test_real_process_*` run a few through a
real `python -m rlhf_jax.cli` to check the exit status and the absence of tracebacks there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gin
import pandas as pd
import pytest
from command_helpers import REPO, SFT_BINDINGS

from rlhf_jax import cli
from rlhf_jax.train.faults import RunLock

SFT_GIN = str(REPO / "gin/experiments/sft_reviews_tiny.gin")
RM_GIN = str(REPO / "gin/experiments/reward_reviews_tiny.gin")
INFO_GIN = str(REPO / "gin/experiments/info_tiny.gin")
SAMPLING = ("max_new_tokens=4", "batch_size=8", "limit=4")


@dataclasses.dataclass
class Ctx:
    """The paths a case's argv is built from (all in the test's tmp_path)."""

    tmp: Path
    run: Path  # a copy of a finished tiny SFT run
    new_run: Path  # a RUN_DIR that does not exist yet
    task: object  # the reviews task
    reward_run: Path  # a folder whose model.json says "reward model"
    prefs: Path  # a complete preferences folder (train/eval parquet + manifest)
    plain_dir: Path  # a folder with an unrelated file in it
    plain_file: Path  # a file

    @property
    def prompts(self) -> str:
        return str(self.task.eval_prompts_path)


def _sft(ctx: Ctx, *extra: str, run_dir: Path | None = None) -> list[str]:
    run_dir = ctx.new_run if run_dir is None else run_dir
    return [
        "train",
        "--gin_file",
        SFT_GIN,
        f"--gin.RUN_DIR='{run_dir}'",
        f"--gin.REVIEWS_DIR='{ctx.task.out_dir}'",
        *(f"--gin.{b}" for b in SFT_BINDINGS),
        *extra,
    ]


def _gen(ctx: Ctx, *extra: str, checkpoint=None, prompts=None) -> list[str]:
    return [
        "generate",
        f"--gin.CHECKPOINT='{ctx.run if checkpoint is None else checkpoint}'",
        f"--gin.PROMPTS='{ctx.prompts if prompts is None else prompts}'",
        f"--gin.OUTPUT='{ctx.tmp / 'out' / 'gen.jsonl'}'",
        *(f"--gin.generate_command.{b}" for b in SAMPLING),
        *extra,
    ]


def _prefs(ctx: Ctx, *extra: str, checkpoint=None, prompts=None, output=None) -> list[str]:
    return [
        "make-preferences",
        f"--gin.CHECKPOINT='{ctx.run if checkpoint is None else checkpoint}'",
        f"--gin.PROMPTS='{ctx.prompts if prompts is None else prompts}'",
        f"--gin.PREFERENCES='{ctx.tmp / 'new_prefs' if output is None else output}'",
        *(f"--gin.make_preferences_command.{b}" for b in SAMPLING),
        *extra,
    ]


def _rm(ctx: Ctx, prefs: Path, *extra: str, run_dir: Path | None = None) -> list[str]:
    return [
        "train",
        "--gin_file",
        RM_GIN,
        f"--gin.RUN_DIR='{ctx.new_run if run_dir is None else run_dir}'",
        f"--gin.PREFERENCES='{prefs}'",
        f"--gin.SFT_RUN='{ctx.run}'",
        "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=8",
        "--gin.NUM_HEADS=1",
        "--gin.LoopConfig.progress_bar=False",
        *extra,
    ]


DPO_GIN = str(REPO / "gin/experiments/dpo_reviews_tiny.gin")


def _dpo(
    ctx: Ctx, *extra: str, run_dir: Path | None = None, prefs: Path | None = None
) -> list[str]:
    return [
        "train",
        "--gin_file",
        DPO_GIN,
        f"--gin.RUN_DIR='{ctx.new_run if run_dir is None else run_dir}'",
        f"--gin.PREFERENCES='{ctx.prefs if prefs is None else prefs}'",
        f"--gin.SFT_RUN='{ctx.run}'",
        f"--gin.REF_CACHE_DIR='{ctx.tmp / 'ref_cache'}'",
        "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=8",
        "--gin.LoopConfig.progress_bar=False",
        *extra,
    ]


RLOO_GIN = str(REPO / "gin/experiments/rloo_reviews_tiny.gin")


def _rl(ctx: Ctx, *extra: str, reward_run: Path | None = None) -> list[str]:
    """The online-RL stage (RLOO) from the tiny SFT run, scored by `reward_run`."""
    return [
        "train",
        "--gin_file",
        RLOO_GIN,
        f"--gin.RUN_DIR='{ctx.new_run}'",
        f"--gin.SFT_RUN='{ctx.run}'",
        f"--gin.REWARD_RUN='{ctx.reward_run if reward_run is None else reward_run}'",
        f"--gin.REVIEWS_DIR='{ctx.task.out_dir}'",
        "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=8",
        "--gin.SAMPLES_PER_PROMPT=2",
        "--gin.MAX_NEW_TOKENS=4",
        "--gin.LoopConfig.progress_bar=False",
        *extra,
    ]


def _rl_other_tokenizer(ctx: Ctx) -> list[str]:
    """A reward model whose tokenizer has one more token than the policy's."""
    import tokenizers

    info = json.loads((ctx.reward_run / "model.json").read_text())
    tok = tokenizers.Tokenizer.from_file(info["tokenizer"])
    tok.add_tokens(["zzz-another-token"])
    other = ctx.tmp / "other_reward_run"
    other.mkdir()
    tok.save(str(other / "tokenizer.json"))
    info["tokenizer"] = str(other / "tokenizer.json")
    (other / "model.json").write_text(json.dumps(info))
    return _rl(ctx, reward_run=other)


def _write_prefs(folder: Path, train_rows: list[dict], eval_rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    pd.DataFrame(train_rows).to_parquet(folder / "train.parquet")
    pd.DataFrame(eval_rows).to_parquet(folder / "eval.parquet")
    files = {"train.parquet": len(train_rows), "eval.parquet": len(eval_rows)}
    (folder / "preferences.json").write_text(json.dumps({"files": files}))
    return folder


def _pairs(n: int, margin=None) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"prompt": f"the pasta {i}", "chosen": " was great", "rejected": " was awful"}
        if margin is not None:
            row["margin"] = margin
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- builders
# Each builder prepares whatever bad input its case needs under ctx.tmp and returns the argv.


def _make_bad_prefs(ctx: Ctx, kind: str) -> Path:
    """A preferences folder with one defect (`kind`) under ctx.tmp."""
    folder = ctx.tmp / f"prefs_{kind}"
    if kind == "no_train":  # what a kill of the old make-preferences could leave
        _write_prefs(folder, _pairs(16), _pairs(8))
        (folder / "train.parquet").unlink()
    elif kind == "count":
        _write_prefs(folder, _pairs(16), _pairs(8))
        (folder / "preferences.json").write_text(
            json.dumps({"files": {"train.parquet": 20, "eval.parquet": 8}})
        )
    elif kind.startswith("margin_"):
        margin = {"margin_abc": "abc", "margin_str": "2.0", "margin_nan": float("nan")}[kind]
        rows = _pairs(16, margin=1.0)
        rows[5]["margin"] = margin
        folder.mkdir()  # JSONL: a column of mixed types, as a user's file may have
        for split, split_rows in (("train", rows), ("eval", _pairs(8, margin=1.0))):
            lines = "".join(json.dumps(r) + "\n" for r in split_rows)
            (folder / f"{split}.jsonl").write_text(lines)
    elif kind == "no_column":
        _write_prefs(folder, [{"prompt": "a", "chosen": "b"}] * 16, _pairs(8))
    elif kind == "empty_chosen":
        rows = _pairs(16)
        rows[3]["chosen"] = "  "
        _write_prefs(folder, rows, _pairs(8))
    elif kind == "missing":
        pass
    return folder


def _bad_prefs(kind: str) -> Callable[[Ctx], list[str]]:
    return lambda ctx: _rm(ctx, _make_bad_prefs(ctx, kind))


def _prompts_file(text: str, name: str = "prompts.jsonl") -> Callable[[Ctx], str]:
    def make(ctx: Ctx) -> str:
        path = ctx.tmp / name
        path.write_text(text)
        return str(path)

    return make


def _gen_prompts(text: str, name: str = "prompts.jsonl"):
    return lambda ctx: _gen(ctx, prompts=_prompts_file(text, name)(ctx))


def _prefs_prompts(text: str):
    return lambda ctx: _prefs(ctx, prompts=_prompts_file(text)(ctx))


def _busy(build: Callable[[Ctx], list[str]]):
    """The case runs while another holder has the run directory's lock."""
    return ("busy", build)


CASES: dict[str, tuple[Callable[[Ctx], list[str]], str]] = {
    # ---- train: settings (type and range), checked before anything is created
    "train_steps_not_int": (lambda c: _sft(c, "--gin.TRAIN_STEPS=abc"), "train_steps"),
    "train_steps_negative": (lambda c: _sft(c, "--gin.TRAIN_STEPS=-5"), "positive integer"),
    "train_steps_zero": (lambda c: _sft(c, "--gin.TRAIN_STEPS=0"), "train_steps"),
    "train_steps_float": (lambda c: _sft(c, "--gin.TRAIN_STEPS=2.5"), "train_steps"),
    "misspelt_macro": (lambda c: _sft(c, "--gin.TRAIN_STPES=3"), "did you mean TRAIN_STEPS"),
    "batch_size_zero": (lambda c: _sft(c, "--gin.BATCH_SIZE=0"), "batch_size"),
    "batch_size_negative": (lambda c: _sft(c, "--gin.BATCH_SIZE=-8"), "batch_size"),
    "batch_size_indivisible": (lambda c: _sft(c, "--gin.BATCH_SIZE=12"), "not divisible"),
    "seed_string": (lambda c: _sft(c, "--gin.SEED='x'"), "seed"),
    "nonfinite_policy": (lambda c: _sft(c, "--gin.NONFINITE_POLICY='explode'"), "nonfinite"),
    "log_every_zero": (lambda c: _sft(c, "--gin.LOG_EVERY=0"), "log_every"),
    "keep_last_zero": (lambda c: _sft(c, "--gin.KEEP_LAST=0"), "keep_last"),
    "progress_bar_string": (
        lambda c: _sft(c, "--gin.LoopConfig.progress_bar='no'"),
        "progress_bar",
    ),
    "best_metric_number": (lambda c: _sft(c, "--gin.LoopConfig.best_metric=3"), "best_metric"),
    "best_mode": (lambda c: _sft(c, "--gin.LoopConfig.best_mode='median'"), "best_mode"),
    "eval_every_negative": (lambda c: _sft(c, "--gin.EVAL_EVERY=-1"), "eval_every"),
    "checkpoint_every_negative": (
        lambda c: _sft(c, "--gin.CHECKPOINT_EVERY=-2"),
        "checkpoint_every",
    ),
    "eval_batches_zero": (lambda c: _sft(c, "--gin.LoopConfig.eval_batches=-1"), "eval_batches"),
    "grad_accum_zero": (lambda c: _sft(c, "--gin.GRAD_ACCUM_STEPS=0"), "grad_accum_steps"),
    "grad_accum_indivisible": (lambda c: _sft(c, "--gin.GRAD_ACCUM_STEPS=3"), "divisible"),
    "unknown_schedule": (lambda c: _sft(c, "--gin.LR_SCHEDULE='zigzag'"), "zigzag"),
    "mesh_too_big": (lambda c: _sft(c, "--gin.MESH_SHAPE=(3, 1, 1)"), "devices"),
    "mesh_two_minus_one": (lambda c: _sft(c, "--gin.MESH_SHAPE=(-1, -1, 1)"), "-1"),
    "mesh_two_axes": (lambda c: _sft(c, "--gin.MESH_SHAPE=(2, 2)"), "3 integers"),
    "mesh_zero": (lambda c: _sft(c, "--gin.MESH_SHAPE=(0, 1, 1)"), "positive size"),
    "model_d_model_zero": (lambda c: _sft(c, "--gin.model_config.d_model=0"), "d_model"),
    "model_heads_indivisible": (
        lambda c: _sft(c, "--gin.model_config.n_heads=3"),
        "not divisible",
    ),
    "model_unknown_preset": (lambda c: _sft(c, "--gin.model_config.preset='huge'"), "huge"),
    "seq_len_too_long": (lambda c: _sft(c, "--gin.model_config.max_seq_len=8"), "max_seq_len"),
    # ---- train: gin
    "unknown_configurable": (lambda c: _sft(c, "--gin.no_such_thing.x=1"), "no_such_thing"),
    "unknown_parameter": (lambda c: _sft(c, "--gin.sft_stage.bogus=1"), "bogus"),
    "binding_syntax": (lambda c: _sft(c, "--gin.TRAIN_STEPS=(1,"), "TRAIN_STEPS"),
    "binding_without_value": (lambda c: _sft(c, "--gin_bindings", "FOO"), "FOO"),
    "missing_gin_file": (lambda c: _sft(c, "--gin_file", "nope/missing.gin"), "missing.gin"),
    "required_macro_unset": (
        lambda c: ["train", "--gin_file", RM_GIN, f"--gin.RUN_DIR='{c.new_run}'"],
        "REQUIRED",
    ),
    # ---- train: run directories and paths
    "run_dir_under_file": (
        lambda c: _sft(c, run_dir=c.plain_file / "run"),
        "is a file",
    ),
    "init_from_missing": (
        lambda c: _sft(c, f"--gin.INIT_FROM='{c.tmp / 'nope'}'"),
        "no such file",
    ),
    "init_from_reward_run": (
        lambda c: _sft(c, f"--gin.INIT_FROM='{c.reward_run}'"),
        "reward-model run",
    ),
    "init_from_not_a_run": (
        lambda c: _sft(c, f"--gin.INIT_FROM='{c.plain_dir}'"),
        "run directory",
    ),
    "rerun_other_d_model": (
        lambda c: _sft(c, "--gin.model_config.d_model=48", run_dir=c.run),
        "d_model",
    ),
    "rerun_other_layers": (
        lambda c: _sft(c, "--gin.model_config.n_layers=2", run_dir=c.run),
        "n_layers",
    ),
    "rerun_other_stage": (lambda c: _rm(c, c.prefs, run_dir=c.run), "model_class"),
    "rerun_other_batch_size": (
        lambda c: _sft(c, "--gin.BATCH_SIZE=16", run_dir=c.run),
        "batch_size=8 but this iterator has 16",
    ),
    "rerun_other_data": (  # shorter rows: the same run directory over different data
        lambda c: _sft(c, "--gin.sft_data.max_len=32", run_dir=c.run),
        "different data",
    ),
    "reviews_dir_is_file": (
        lambda c: _sft(c, f"--gin.REVIEWS_DIR='{c.plain_file}'"),
        "REVIEWS_DIR",
    ),
    "reviews_num_texts_zero": (lambda c: _sft(c, "--gin.REVIEWS_NUM_TEXTS=0"), "num_texts"),
    "run_dir_is_preferences": (lambda c: _sft(c, run_dir=c.prefs), "preferences folder"),
    "run_dir_is_task": (lambda c: _sft(c, run_dir=c.task.out_dir), "not a run directory"),
    "run_dir_in_use": (_busy(lambda c: _sft(c, run_dir=c.run)), "in use"),
    # ---- train: data files (reward model on a preferences folder)
    "prefs_missing_train_file": (_bad_prefs("no_train"), "no train file"),
    "prefs_manifest_mismatch": (_bad_prefs("count"), "do not match"),
    "prefs_margin_abc": (_bad_prefs("margin_abc"), "'margin'"),
    "prefs_margin_string_number": (_bad_prefs("margin_str"), "'margin'"),
    "prefs_margin_nan": (_bad_prefs("margin_nan"), "'margin'"),
    "prefs_no_rejected_column": (_bad_prefs("no_column"), "rejected"),
    "prefs_empty_chosen": (_bad_prefs("empty_chosen"), "'chosen'"),
    "prefs_folder_missing": (_bad_prefs("missing"), "not found"),
    # ---- train: DPO-family settings
    "dpo_beta_zero": (lambda c: _dpo(c, "--gin.BETA=0.0"), "beta"),
    "dpo_beta_negative": (lambda c: _dpo(c, "--gin.BETA=-0.1"), "beta"),
    "dpo_beta_nan": (lambda c: _dpo(c, "--gin.BETA=float('nan')"), "beta"),
    "dpo_label_smoothing_half": (lambda c: _dpo(c, "--gin.LABEL_SMOOTHING=0.5"), "smoothing"),
    "dpo_label_smoothing_negative": (
        lambda c: _dpo(c, "--gin.LABEL_SMOOTHING=-0.1"),
        "smoothing",
    ),
    "dpo_simpo_gamma_string": (
        lambda c: _dpo(c, "--gin.DPO_LOSS_TYPE='simpo'", "--gin.SIMPO_GAMMA='x'"),
        "gamma",
    ),
    "dpo_discopop_tau_zero": (
        lambda c: _dpo(c, "--gin.DPO_LOSS_TYPE='discopop'", "--gin.DISCOPOP_TAU=0.0"),
        "tau",
    ),
    "dpo_orpo_lambda_negative": (
        lambda c: _dpo(c, "--gin.DPO_LOSS_TYPE='orpo'", "--gin.ORPO_LAMBDA=-1.0"),
        "orpo_lambda",
    ),
    "dpo_bco_delta_inf": (
        lambda c: _dpo(c, "--gin.DPO_LOSS_TYPE='bco_pair'", "--gin.BCO_DELTA=float('inf')"),
        "bco_delta",
    ),
    "dpo_rpo_alpha_negative": (lambda c: _dpo(c, "--gin.RPO_ALPHA=-1.0"), "rpo_alpha"),
    "dpo_unknown_loss_type": (lambda c: _dpo(c, "--gin.DPO_LOSS_TYPE='dpo++'"), "dpo++"),
    "dpo_loss_weights_length": (
        lambda c: _dpo(c, "--gin.DPO_LOSS_TYPE=('sigmoid', 'ipo')", "--gin.LOSS_WEIGHTS=[1.0]"),
        "weights",
    ),
    "dpo_unknown_reference": (lambda c: _dpo(c, "--gin.REFERENCE='cached'"), "cached"),
    "dpo_buckets_empty": (lambda c: _dpo(c, "--gin.BUCKETS=()"), "buckets"),
    "dpo_buckets_zero": (lambda c: _dpo(c, "--gin.BUCKETS=(0,)"), "buckets"),
    "dpo_buckets_decreasing": (lambda c: _dpo(c, "--gin.BUCKETS=(64, 32)"), "buckets"),
    "dpo_buckets_too_long": (lambda c: _dpo(c, "--gin.BUCKETS=(64, 4096)"), "max_seq_len"),
    "dpo_max_len_zero": (lambda c: _dpo(c, "--gin.MAX_LEN=0"), "max_len"),
    "dpo_max_prompt_len_negative": (
        lambda c: _dpo(c, "--gin.MAX_PROMPT_LEN=-4"),
        "max_prompt_len",
    ),
    "dpo_on_long_prompt": (lambda c: _dpo(c, "--gin.ON_LONG_PROMPT='skip'"), "skip"),
    "dpo_preference_format": (lambda c: _dpo(c, "--gin.PREFERENCE_FORMAT='xml'"), "xml"),
    "dpo_eval_fraction_one": (lambda c: _dpo(c, "--gin.EVAL_FRACTION=1.0"), "fraction"),
    "dpo_logits_chunk_zero": (lambda c: _dpo(c, "--gin.LOGITS_CHUNK_SIZE=0"), "chunk"),
    "dpo_sft_run_missing": (lambda c: _dpo(c, f"--gin.SFT_RUN='{c.tmp / 'nope'}'"), "nope"),
    "dpo_sft_run_is_reward_run": (
        lambda c: _dpo(c, f"--gin.SFT_RUN='{c.reward_run}'"),
        "reward-model",
    ),
    "dpo_prefs_missing_train_file": (
        lambda c: _dpo(c, prefs=_make_bad_prefs(c, "no_train")),
        "no train file",
    ),
    "dpo_rerun_sft_run_dir": (lambda c: _dpo(c, run_dir=c.run), "stage"),
    # ---- train: reward-model settings
    "rm_num_heads_zero": (lambda c: _rm(c, c.prefs, "--gin.NUM_HEADS=0"), "num_heads"),
    "rm_buckets_decreasing": (
        lambda c: _rm(c, c.prefs, "--gin.RM_BUCKETS=(64, 32)"),
        "buckets",
    ),
    "rm_max_len_zero": (lambda c: _rm(c, c.prefs, "--gin.RM_MAX_LEN=0"), "max_len"),
    "rm_eval_fraction_negative": (
        lambda c: _rm(c, c.prefs, "--gin.RM_EVAL_FRACTION=-0.1"),
        "fraction",
    ),
    "rm_label_smoothing_one": (
        lambda c: _rm(c, c.prefs, "--gin.LABEL_SMOOTHING=1.0"),
        "smoothing",
    ),
    "rm_margin_scale_nan": (
        lambda c: _rm(c, c.prefs, "--gin.MARGIN_SCALE=float('nan')"),
        "margin_scale",
    ),
    "rm_center_coef_negative": (
        lambda c: _rm(c, c.prefs, "--gin.CENTER_COEF=-1.0"),
        "center_coef",
    ),
    # ---- train: online RL (gin/experiments/rloo_reviews_tiny.gin)
    "rl_rloo_one_sample": (lambda c: _rl(c, "--gin.SAMPLES_PER_PROMPT=1"), "samples_per_prompt"),
    "rl_grpo_one_sample": (
        lambda c: _rl(c, "--gin.ESTIMATOR='grpo'", "--gin.SAMPLES_PER_PROMPT=1"),
        "samples_per_prompt",
    ),
    "rl_dr_grpo_one_sample": (
        lambda c: _rl(c, "--gin.ESTIMATOR='dr_grpo'", "--gin.SAMPLES_PER_PROMPT=1"),
        "samples_per_prompt",
    ),
    "rl_minibatches_indivisible": (lambda c: _rl(c, "--gin.NUM_MINIBATCHES=3"), "num_minibatches"),
    "rl_reward_tokenizer_differs": (_rl_other_tokenizer, "tokenizer"),
    "rl_reward_run_unset": (lambda c: _rl(c, "--gin.REWARD_RUN=None"), "REWARD_RUN"),
    "rl_reward_run_missing": (lambda c: _rl(c, reward_run=c.tmp / "nope"), "REWARD_RUN"),
    "rl_reward_run_is_policy": (lambda c: _rl(c, reward_run=c.run), "REWARD_RUN"),
    "rl_unknown_estimator": (lambda c: _rl(c, "--gin.ESTIMATOR='vtrace'"), "vtrace"),
    "rl_kl_coef_negative": (lambda c: _rl(c, "--gin.KL_COEF=-0.1"), "kl_coef"),
    "rl_eps_low_zero": (lambda c: _rl(c, "--gin.EPS_LOW=0.0"), "eps_low"),
    "rl_eps_low_negative": (lambda c: _rl(c, "--gin.EPS_LOW=-0.2"), "eps_low"),
    "rl_temperature_zero": (lambda c: _rl(c, "--gin.TEMPERATURE=0.0"), "temperature"),
    "rl_gamma_above_one": (lambda c: _rl(c, "--gin.GAMMA=1.5"), "gamma"),
    "rl_unknown_reward_source": (lambda c: _rl(c, "--gin.REWARD_SOURCE='human'"), "human"),
    "rl_unknown_host_judge": (
        lambda c: _rl(c, "--gin.rl_stage.host_judge='thread'"),
        "host_judge",
    ),
    # ---- generate
    "gen_checkpoint_missing": (lambda c: _gen(c, checkpoint=c.tmp / "nope"), "nope"),
    "gen_checkpoint_reward_run": (lambda c: _gen(c, checkpoint=c.reward_run), "reward-model"),
    "gen_checkpoint_plain_dir": (lambda c: _gen(c, checkpoint=c.plain_dir), "run directory"),
    "gen_checkpoint_unset": (
        lambda c: ["generate", f"--gin.PROMPTS='{c.prompts}'"],
        "CHECKPOINT",
    ),
    "gen_prompts_missing": (lambda c: _gen(c, prompts=c.tmp / "nope.jsonl"), "nope.jsonl"),
    "gen_prompts_no_column": (_gen_prompts('{"text": "hi"}\n'), "prompt"),
    "gen_prompts_not_string": (_gen_prompts('{"prompt": "a"}\n{"prompt": 3}\n'), "row 1"),
    "gen_prompts_empty_string": (_gen_prompts('{"prompt": "a"}\n{"prompt": " "}\n'), "empty"),
    "gen_prompts_bad_json": (_gen_prompts('{"prompt": "a"}\n{"prompt": \n'), "prompts"),
    "gen_prompts_empty_file": (_gen_prompts(""), "prompts"),
    "gen_num_samples_zero": (lambda c: _gen(c, "--gin.generate_command.num_samples=0"), "num"),
    "gen_max_new_tokens_zero": (
        lambda c: _gen(c, "--gin.generate_command.max_new_tokens=0"),
        "max_new_tokens",
    ),
    "gen_temperature_negative": (
        lambda c: _gen(c, "--gin.generate_command.temperature=-1.0"),
        "temperature",
    ),
    "gen_top_p_zero": (lambda c: _gen(c, "--gin.generate_command.top_p=0.0"), "top_p"),
    "gen_top_p_above_one": (lambda c: _gen(c, "--gin.generate_command.top_p=1.5"), "top_p"),
    "gen_top_k_negative": (lambda c: _gen(c, "--gin.generate_command.top_k=-1"), "top_k"),
    "gen_batch_size_zero": (
        lambda c: _gen(c, "--gin.generate_command.batch_size=0"),
        "batch_size",
    ),
    "gen_limit_zero": (lambda c: _gen(c, "--gin.generate_command.limit=0"), "limit"),
    "gen_segment_len_negative": (
        lambda c: _gen(c, "--gin.generate_command.segment_len=-1"),
        "segment_len",
    ),
    "gen_unknown_judge": (lambda c: _gen(c, "--gin.generate_command.judge='oracle'"), "oracle"),
    "gen_unknown_split": (lambda c: _gen(c, "--gin.generate_command.split='nope'"), "nope"),
    "gen_output_is_folder": (lambda c: _gen(c, f"--gin.OUTPUT='{c.plain_dir}'"), "folder"),
    "gen_output_is_run_metrics": (
        lambda c: _gen(c, f"--gin.OUTPUT='{c.run / 'metrics.jsonl'}'"),
        "would overwrite metrics.jsonl",
    ),
    "gen_output_in_checkpoints": (
        lambda c: _gen(c, f"--gin.OUTPUT='{c.run / 'checkpoints' / 'x.jsonl'}'"),
        "would overwrite checkpoints",
    ),
    "gen_misspelt_macro": (lambda c: _gen(c, "--gin.OUTPTU='x.jsonl'"), "did you mean OUTPUT"),
    "gen_run_dir_in_use": (
        _busy(lambda c: _gen(c, "--gin.OUTPUT=None", "--gin.generate_command.limit=2")),
        "in use",
    ),
    # ---- make-preferences
    "prefs_num_samples_one": (
        lambda c: _prefs(c, "--gin.make_preferences_command.num_samples=1"),
        "K >= 2",
    ),
    "prefs_label_temperature_negative": (
        lambda c: _prefs(c, "--gin.make_preferences_command.label_temperature=-0.5"),
        "label_temperature",
    ),
    "prefs_eval_fraction_one": (
        lambda c: _prefs(c, "--gin.make_preferences_command.eval_fraction=1.0"),
        "eval_fraction",
    ),
    "prefs_unknown_gold": (
        lambda c: _prefs(c, "--gin.make_preferences_command.gold='truth'"),
        "truth",
    ),
    "prefs_output_holds_other_files": (
        lambda c: _prefs(c, output=c.plain_dir),
        "other files",
    ),
    "prefs_output_is_file": (lambda c: _prefs(c, output=c.plain_file), "is a file"),
    "prefs_checkpoint_reward_run": (
        lambda c: _prefs(c, checkpoint=c.reward_run),
        "reward-model",
    ),
    "prefs_prompts_missing": (lambda c: _prefs(c, prompts=c.tmp / "nope.jsonl"), "nope"),
    "prefs_prompts_not_string": (_prefs_prompts('{"prompt": 1}\n'), "row 0"),
    "prefs_top_p_negative": (
        lambda c: _prefs(c, "--gin.make_preferences_command.top_p=-0.1"),
        "top_p",
    ),
    # ---- export
    "export_onto_itself": (lambda c: ["export", str(c.run), str(c.run), "--overwrite"], "overlaps"),
    "export_into_its_run": (lambda c: ["export", str(c.run), str(c.run / "hf")], "overlaps"),
    "export_onto_other_run": (
        lambda c: ["export", str(c.run), str(c.reward_run), "--overwrite"],
        "run directory",
    ),
    "export_not_a_run": (lambda c: ["export", str(c.plain_dir), str(c.tmp / "hf")], "run dir"),
    # ---- quickstart, info, the command line itself
    "quickstart_out_dir_is_file": (
        lambda c: ["quickstart", "--fast", "--out_dir", str(c.plain_file)],
        "is a file",
    ),
    "quickstart_out_dir_is_run": (
        lambda c: ["quickstart", "--fast", "--out_dir", str(c.run)],
        "model.json",
    ),
    "quickstart_out_dir_is_prefs": (
        lambda c: ["quickstart", "--fast", "--out_dir", str(c.prefs)],
        "preferences.json",
    ),
    "quickstart_unused_macro": (lambda c: ["quickstart", "--fast", "--gin.STEPS=3"], "STEPS"),
    "info_mesh_too_big": (
        lambda c: [
            "info",
            "--gin_file",
            "gin/experiments/info_tiny.gin",
            "--gin.MESH_SHAPE=(16,1,1)",
        ],
        "devices",
    ),
    "info_unknown_preset": (
        lambda c: [
            "info",
            "--gin_file",
            INFO_GIN,
            "--gin.model_config.preset='nope'",
        ],
        "nope",
    ),
    "no_command": (lambda c: [], "no command"),
    "unknown_command": (lambda c: ["frobnicate"], "invalid choice"),
    "num_processes_alone": (lambda c: ["info", "--num_processes", "2"], "multi-host"),
    "num_processes_not_int": (lambda c: ["info", "--num_processes", "two"], "invalid int"),
    "coordinator_without_port": (
        lambda c: [
            "info",
            "--coordinator_address",
            "localhost",
            "--num_processes",
            "2",
            "--process_id",
            "0",
        ],
        "HOST:PORT",
    ),
    "process_id_out_of_range": (
        lambda c: [
            "info",
            "--coordinator_address",
            "localhost:1234",
            "--num_processes",
            "2",
            "--process_id",
            "2",
        ],
        "process_id",
    ),
}


def _snapshot(root: Path) -> dict[str, str] | None:
    """Every file under `root` with its content hash (None: `root` does not exist)."""
    if not root.exists():
        return None
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture
def ctx(tmp_path, sft_run, reviews_task) -> Ctx:
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    reward_run = tmp_path / "reward_run"
    reward_run.mkdir()
    info = json.loads((run / "model.json").read_text())
    info["model_class"], info["model_kwargs"] = "ScalarModel", {"num_heads": 1}
    (reward_run / "model.json").write_text(json.dumps(info))
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    (plain_dir / "notes.txt").write_text("not a run\n")
    plain_file = tmp_path / "file.txt"
    plain_file.write_text("a file\n")
    prefs = _write_prefs(tmp_path / "prefs", _pairs(16), _pairs(8))
    return Ctx(
        tmp=tmp_path,
        run=run,
        new_run=tmp_path / "new_run",
        task=reviews_task,
        reward_run=reward_run,
        prefs=prefs,
        plain_dir=plain_dir,
        plain_file=plain_file,
    )


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    gin.clear_config()
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    finally:
        gin.clear_config()
    return code, capsys.readouterr().err


def test_the_table_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_message_and_changes_nothing(name, ctx, capsys):
    build, expected = CASES[name]
    busy = isinstance(build, tuple)
    if busy:
        build = build[1]
    argv = build(ctx)
    watched = [ctx.run, ctx.new_run, ctx.plain_dir, ctx.plain_file, ctx.prefs, ctx.tmp / "out"]
    watched += [ctx.tmp / "new_prefs", ctx.reward_run]
    if name == "run_dir_is_task":  # the session's shared task folder
        watched.append(Path(ctx.task.out_dir))
    before = {str(p): _snapshot(p) for p in watched}
    if busy:
        with RunLock(ctx.run):
            code, err = _run_in_process(argv, capsys)
    else:
        code, err = _run_in_process(argv, capsys)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    messages = [line for line in err.splitlines() if "error:" in line]
    assert len(messages) == 1, err[-3000:]
    assert expected.lower() in err.lower(), err[-3000:]
    after = {str(p): _snapshot(p) for p in watched}
    assert after == before


# ------------------------------------------------------------------ through a real process


def _subprocess(argv: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


@pytest.mark.parametrize(
    "name",
    [
        "train_steps_negative",
        "rerun_other_d_model",
        "rerun_other_batch_size",  # a failed restore: no "Event loop is closed" noise
        "gen_checkpoint_reward_run",
    ],
)
def test_real_process_exit_2_without_traceback(name, ctx):
    build, expected = CASES[name]
    before = _snapshot(ctx.run)
    r = _subprocess(build(ctx), cwd=ctx.tmp)  # outside the repository root
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and expected.lower() in r.stderr.lower()
    assert "Path not found" not in r.stderr and "Event loop is closed" not in r.stderr
    assert [line for line in r.stderr.splitlines() if "error:" in line] == [
        r.stderr.strip().splitlines()[-1]
    ]
    assert _snapshot(ctx.run) == before
    assert not ctx.new_run.exists()


def test_real_process_no_command():
    r = _subprocess([])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no command" in r.stderr


def test_malformed_multi_host_environment_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("RLHF_JAX_NUM_PROCESSES", "two")
    code, err = _run_in_process(["info", "--gin_file", INFO_GIN], capsys)
    assert code == 2 and "RLHF_JAX_NUM_PROCESSES='two'" in err and "Traceback" not in err


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """Only user errors become exit 2: a bug is not hidden behind a one-line message."""
    from rlhf_jax import registry

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(registry, "info", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info", "--gin_file", INFO_GIN])


# --------------------------------------------------------------- read-only run directories


def _without_root_override() -> list[str]:
    """A command prefix under which file permissions apply even to root: root keeps its uid
    (so the interpreter under a root-only folder still runs) but loses the capabilities that
    let it write anywhere (`setpriv`, util-linux). Empty when the tests do not run as root."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root, this test needs setpriv (util-linux) to drop DAC override"
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.parametrize("which", ["existing_run", "parent_of_new_run"])
def test_read_only_run_directory_exits_2(which, sft_run, tmp_path):
    """A run directory the user cannot write: one message, exit 2, nothing changed."""
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    target = run if which == "existing_run" else run / "child_run"
    for p in [run, *run.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        before = _snapshot(run)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        argv = ["train", "--gin_file", SFT_GIN, f"--gin.RUN_DIR='{target}'",
                *(f"--gin.{b}" for b in SFT_BINDINGS)]  # fmt: skip
        r = subprocess.run(
            [*_without_root_override(), sys.executable, "-m", "rlhf_jax.cli", *argv],
            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "not writable" in r.stderr, r.stderr[-3000:]
        assert [line for line in r.stderr.splitlines() if "error:" in line] == [
            r.stderr.strip().splitlines()[-1]
        ]
        assert _snapshot(run) == before
        assert not (run / "child_run").exists()
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
