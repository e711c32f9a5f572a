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
