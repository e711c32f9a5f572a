"""Every experiment's sweep spec under experiments/ imports and every one of its points parses
with its gin files (macros defined, nothing REQUIRED left unset), and each experiment has a
README with its command."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_jax.sweep.launch import validate
from rlhf_jax.sweep.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
SPECS = sorted((REPO / "experiments").glob("*/sweep.py"))


def test_the_experiments_exist():
    assert {p.parent.name for p in SPECS} >= {"beta_sweep", "loss_zoo"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.parent.name)
def test_experiment_spec_parses(spec, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_spec(spec)
    validate(sweep)
    seeds = {p.get("SEED") for p in sweep.points}
    assert seeds == {0, 1, 2}
    readme = (spec.parent / "README.md").read_text()
    assert f"rlhf-jax sweep experiments/{spec.parent.name}/sweep.py" in readme


def _fake_cli(tmp_path, sweep_rc: int) -> tuple[dict, Path]:
    """An environment whose `rlhf-jax` records its arguments and exits `sweep_rc` for `sweep`."""
    import os

    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "rlhf-jax"
    fake.write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {log}\nif [ "$1" = sweep ]; then exit {sweep_rc}; fi\n'
    )
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


@pytest.mark.parametrize("sweep_rc", [0, 101, 2])
def test_run_sh_is_the_readme_commands_in_one(tmp_path, sweep_rc):
    """`bash experiments/run.sh NAME` runs the README's three commands; the report follows a
    sweep with failed points (exit 100 + N, kept) but not a crash or bad input."""
    import subprocess

    env, log = _fake_cli(tmp_path, sweep_rc)
    res = subprocess.run(["bash", str(REPO / "experiments/run.sh"), "algorithm_frontier"],
                         env=env, capture_output=True, text=True)  # fmt: skip
    assert res.returncode == sweep_rc, res.stderr
    calls = log.read_text().splitlines()
    expected = [
        "quickstart --out_dir runs/quickstart",
        "sweep experiments/algorithm_frontier/sweep.py --out_dir runs/algorithm_frontier",
        "report runs/algorithm_frontier --gold_prompts runs/quickstart/task/eval_prompts.jsonl "
        "--reference runs/quickstart/sft",
    ]
    assert calls == (expected if sweep_rc != 2 else expected[:2])
    readme = (REPO / "experiments/algorithm_frontier/README.md").read_text()
    for line in expected:  # the README's commands are the script's
        assert "rlhf-jax " + line.split(" --gold_prompts")[0] in readme
    bad = subprocess.run(["bash", str(REPO / "experiments/run.sh"), "no_such"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "no experiment 'no_such'" in bad.stderr
