"""gin and CLI tests: every gin file parses, bad configuration exits 2 with one clear message,
help texts, `info`, and the config dump."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax import cli, commands, gin_utils, rundir
from rlhf_jax.models import model_config

REPO = Path(__file__).resolve().parent.parent
GIN_FILES = sorted(str(p.relative_to(REPO)) for p in (REPO / "gin").rglob("*.gin"))


def test_there_are_gin_files():
    assert len(GIN_FILES) >= 8


@pytest.mark.parametrize("path", GIN_FILES)
def test_every_gin_file_parses(path):
    """Through the CLI's own parsing: unknown names, syntax errors and macros used but never
    defined (a misspelt `%MACRO`) fail, and so does a macro an experiment file sets that
    nothing uses (a misspelt `MACRO = ...`); REQUIRED macros are left for the command line."""
    commands.parse_gin([str(REPO / path)], [], allow_required=True)
    if path.startswith("gin/experiments/"):
        # An experiment file only includes and sets macros: one that nothing uses is misspelt.
        assert not gin_utils.unused_macros(), f"{path} sets unused macros (misspelt?)"


def _run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_name_in_file(tmp_path, capsys):
    f = tmp_path / "bad.gin"
    f.write_text("model_config.preset = 'tiny'\nno_such_thing.x = 3\n")
    code, _, err = _run(["info", "--gin_file", str(f)], capsys)
    assert code == 2
    assert "no_such_thing" in err and str(f) in err and "line 2" in err


def test_syntax_error_in_file(tmp_path, capsys):
    f = tmp_path / "syntax.gin"
    f.write_text("model_config.preset = 'tiny'\nmodel_config.d_model = (64,\n")
    code, _, err = _run(["info", "--gin_file", str(f)], capsys)
    assert code == 2 and "syntax error" in err and str(f) in err


def test_unknown_parameter_binding(capsys):
    code, _, err = _run(["info", "--gin.make_mesh.shap=(1,1,1)"], capsys)
    assert code == 2 and "make_mesh.shap" in err and "shap" in err


def test_missing_required_macro(tmp_path, capsys):
    f = tmp_path / "req.gin"
    f.write_text(
        "RUN_DIR = %gin.REQUIRED\ninfo.seq_len = 8\nmake_mesh.shape = (1, 1, %N)\n"
        "N = 1\nlogical_rules.overrides = [('x', %RUN_DIR)]\n"
    )
    code, _, err = _run(["info", "--gin_file", str(f)], capsys)
    assert code == 2 and "REQUIRED macro(s) not set: RUN_DIR" in err and "--gin.RUN_DIR" in err


def test_undefined_macro(tmp_path, capsys):
    f = tmp_path / "undef.gin"
    f.write_text("info.seq_len = %SEQ\n")
    code, _, err = _run(["info", "--gin_file", str(f)], capsys)
    assert code == 2 and "SEQ" in err


def test_missing_gin_file(capsys):
    code, _, err = _run(["info", "--gin_file", "nope/missing.gin"], capsys)
    assert code == 2 and "nope/missing.gin" in err


def test_bad_config_in_subprocess_has_no_traceback(tmp_path):
    f = tmp_path / "bad.gin"
    f.write_text("nope.x = 1\n")
    r = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "info", "--gin_file", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "nope" in r.stderr


def test_help_texts():
    r = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "train" in r.stdout and "quickstart" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0
    for flag in ("--gin_file", "--gin.KEY=VALUE", "--gin_bindings", "RUN_DIR", "--process_id"):
        assert flag in r.stdout


def test_info_prints_params_flops_and_shardings(capsys):
    code, out, _ = _run(
        ["info", "--gin_file", "gin/experiments/info_tiny.gin", "--gin.MESH_SHAPE=(2, 2, 2)"],
        capsys,
    )
    assert code == 0
    assert f"parameters: {model_config('tiny').num_params():,}" in out
    assert "FLOPs per token" in out
    assert "P('fsdp', 'tensor', None)" in out  # e.g. the attention projections


def test_later_files_and_bindings_win(tmp_path):
    a, b = tmp_path / "a.gin", tmp_path / "b.gin"
    a.write_text("SEED = 1\nRUN_DIR = 'x'\n")
    b.write_text("SEED = 2\n")
    gin_utils.parse([str(a), str(b)], ["RUN_DIR='y'"])
    assert gin_utils.macro_value("SEED") == 2 and gin_utils.macro_value("RUN_DIR") == "y"
    path = rundir.write_config(tmp_path / "run")
    assert "SEED = 2" in path.read_text()


def test_bare_string_bindings_are_quoted():
    args, bindings = cli.parse_args(
        ["train", "--gin.RUN_DIR=runs/x", "--gin.TRAIN_STEPS=5", "--gin_bindings", "SEED=3"]
    )
    assert args.command == "train"
    assert bindings == ["SEED=3", "RUN_DIR='runs/x'", "TRAIN_STEPS=5"]
