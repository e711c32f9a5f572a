"""Sweep specs as data: grid builders, point names (stable, filesystem-safe, unique), spec
files and command-line grids."""

from __future__ import annotations

import re

import pytest

from rlhf_jax.sweep import spec
from rlhf_jax.sweep.spec import GinRef, Sweep, SweepError, point_name, product, seeds, sweep


def test_product_zip_sweep_seeds():
    grid = product(sweep("BETA", [0.1, 0.5]), seeds(2))
    assert grid == [{"BETA": 0.1, "SEED": 0}, {"BETA": 0.1, "SEED": 1},
                    {"BETA": 0.5, "SEED": 0}, {"BETA": 0.5, "SEED": 1}]  # fmt: skip
    pairs = spec.zip(sweep("DPO_LOSS_TYPE", ["sigmoid", "ipo"]), sweep("BETA", [0.1, 0.5]))
    assert pairs == [
        {"DPO_LOSS_TYPE": "sigmoid", "BETA": 0.1},
        {"DPO_LOSS_TYPE": "ipo", "BETA": 0.5},
    ]
    assert len(product(pairs, seeds([3, 7]))) == 4
    with pytest.raises(SweepError, match="different lengths"):
        spec.zip(sweep("A", [1, 2]), sweep("B", [1]))
    with pytest.raises(SweepError, match="two grids"):
        product(sweep("A", [1]), sweep("A", [2]))
    with pytest.raises(SweepError, match="no values"):
        sweep("A", [])
    with pytest.raises(SweepError, match="bad sweep key"):
        sweep("not a key", [1])
    with pytest.raises(SweepError, match="bad value"):
        sweep("A", [object()])


def test_point_names_are_stable_safe_and_unique():
    assert point_name({"BETA": 0.1, "SEED": 0}) == "BETA=0.1,SEED=0"
    assert point_name({"DPO_LOSS_TYPE": "ipo"}) == "DPO_LOSS_TYPE=ipo"
    tricky = [{"A": "x y"}, {"A": "x_y"}, {"A": "x/y"}, {"A": "1"}, {"A": 1}, {"A": "1.0"},
              {"A": 1.0}, {"A": (1, 2)}, {"A": [1, 2]}, {"A": GinRef("@f")}, {"A": None},
              {"A": "None"}, {"s/B.c": 1}, {"s_B.c": 1}, {"A": "a" * 300}, {"A": "a" * 301},
              {"A": "1_B=2"}, {"A": 1, "B": 2}]  # fmt: skip
    names = [point_name(p) for p in tricky]
    assert len(set(names)) == len(names), names
    for n in names:
        assert re.fullmatch(r"[A-Za-z0-9._=,+~-]+", n) and len(n) <= 130, n
    # Stable: the same bindings give the same name, whatever else is in the grid.
    assert [point_name(dict(p)) for p in tricky] == names


def test_sweep_checks_its_grid():
    with pytest.raises(SweepError, match="empty"):
        Sweep(gin_files=["a.gin"], points=[])
    with pytest.raises(SweepError, match="the same"):
        Sweep(gin_files=["a.gin"], points=[{"A": 1}, {"A": 1}])
    with pytest.raises(SweepError, match="RUN_DIR"):
        Sweep(gin_files=["a.gin"], points=[{"RUN_DIR": "x"}])
    a = Sweep(gin_files=["a.gin"], points=[{"A": 1}], bindings={"B": 2})
    assert a.fingerprint() == Sweep(["a.gin"], [{"A": 1}], {"B": 2}).fingerprint()
    assert a.fingerprint() != Sweep(["a.gin"], [{"A": 2}], {"B": 2}).fingerprint()
    assert spec.binding_lines({"A": "x", "B": (1,), "C": GinRef("@f")}) == [
        "A = 'x'", "B = (1,)", "C = @f"]  # fmt: skip


def test_load_spec(tmp_path):
    good = tmp_path / "good.py"
    good.write_text(
        "from rlhf_jax.sweep.spec import Sweep, product, seeds, sweep\n"
        "SWEEP = Sweep(gin_files=['x.gin'], points=product(sweep('BETA', [1, 2]), seeds(3)))\n"
    )
    s = spec.load_spec(good)
    assert s.name == "good" and len(s.points) == 6
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_xyz\n")
    with pytest.raises(SweepError, match="does not import.*no_such_module_xyz"):
        spec.load_spec(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("from rlhf_jax.sweep.spec import Sweep\nSWEEP = Sweep(['x.gin'], [])\n")
    with pytest.raises(SweepError, match="grid is empty"):
        spec.load_spec(empty)
    none = tmp_path / "none.py"
    none.write_text("X = 1\n")
    with pytest.raises(SweepError, match="must define SWEEP"):
        spec.load_spec(none)
    with pytest.raises(SweepError, match="not found"):
        spec.load_spec(tmp_path / "missing.py")


def test_grid_flags():
    flags = ["BETA=0.05,0.1", "DPO_LOSS_TYPE=sigmoid,'ipo'", "B=(48, 64),(32,)"]
    grid = spec.grid_from_flags(flags)
    assert len(grid) == 8
    assert grid[0] == {"BETA": 0.05, "DPO_LOSS_TYPE": "sigmoid", "B": (48, 64)}
    assert grid[-1] == {"BETA": 0.1, "DPO_LOSS_TYPE": "ipo", "B": (32,)}
    for bad in (["BETA="], ["BETA"], [], ["BETA= , "]):
        with pytest.raises(SweepError):
            spec.grid_from_flags(bad)


def test_points_with_their_own_gin_files():
    grid = product(spec.gin_files("exp/ppo.gin", ("exp/dpo.gin", "exp/long.gin")), seeds(2))
    s = Sweep(gin_files=["base.gin"], points=grid)
    assert s.names == ["GIN_FILE=ppo,SEED=0", "GIN_FILE=ppo,SEED=1",
                       "GIN_FILE=dpo+long,SEED=0", "GIN_FILE=dpo+long,SEED=1"]  # fmt: skip
    assert s.files(grid[0]) == ["base.gin", "exp/ppo.gin"]
    assert s.files(grid[2]) == ["base.gin", "exp/dpo.gin", "exp/long.gin"]
    # GIN_FILE chooses files; it is not a gin binding.
    assert spec.binding_lines(grid[2]) == ["SEED = 0"]
    # Without base files every point must bring its own.
    assert Sweep([], spec.gin_files("a.gin", "b.gin")).files({"GIN_FILE": "b.gin"}) == ["b.gin"]
    with pytest.raises(SweepError, match="at least one base gin file"):
        Sweep([], [{"GIN_FILE": "a.gin"}, {"A": 1}])
    with pytest.raises(SweepError, match="distinct names"):
        Sweep(["base.gin"], spec.gin_files("x/ppo.gin", "y/ppo.gin"))
    with pytest.raises(SweepError, match="GIN_FILE"):
        Sweep(["base.gin"], [{"A": 1}], bindings={"GIN_FILE": "a.gin"})
    for bad in ("", (), 3, ("a.gin", 1)):
        with pytest.raises(SweepError, match="bad value"):
            Sweep(["base.gin"], [{"GIN_FILE": bad}])
    assert s.fingerprint() != Sweep(["base.gin"], spec.gin_files("exp/grpo.gin")).fingerprint()
    # The same from the command line: --grid 'GIN_FILE=exp/ppo.gin,exp/dpo.gin'.
    flags = spec.grid_from_flags(["GIN_FILE=exp/ppo.gin,exp/dpo.gin", "SEED=0"])
    assert Sweep(["base.gin"], flags).names == ["GIN_FILE=ppo,SEED=0", "GIN_FILE=dpo,SEED=0"]
