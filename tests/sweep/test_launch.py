"""The local launcher on a tiny real DPO sweep: every point is a normal run directory holding
its bindings, sweep.json records each status (a failing point with its error, the others
finished), points that differ only in traced values (β, seed) compile once per sweep, and a
re-run skips finished points, resumes an unfinished one and retries the failed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BAD, GOOD

from rlhf_jax.sweep import launch
from rlhf_jax.sweep.spec import SweepError, point_name


def _state(out):
    return json.loads((out / "sweep.json").read_text())


def test_points_are_run_directories_with_their_bindings(tiny_sweep):
    out, sweep, _ = tiny_sweep
    state = _state(out)
    by_name = {p["name"]: p for p in state["points"]}
    assert [p["name"] for p in state["points"]] == [point_name(p) for p in [*GOOD, BAD]]
    for p in GOOD:
        entry = by_name[point_name(p)]
        assert entry["status"] == "done" and entry["error"] is None, entry
        run = out / entry["run_dir"]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "done" and summary["step"] == 4
        gin_text = (run / "bindings.gin").read_text()
        assert f"BETA = {p['BETA']!r}" in gin_text and f"SEED = {p['SEED']!r}" in gin_text
        assert f"RUN_DIR = {str(run)!r}" in gin_text
        # The operative config of the run shows the point's β and seed took effect.
        config = (run / "config.gin").read_text()
        assert f"BETA = {p['BETA']!r}" in config and f"SEED = {p['SEED']!r}" in config
    bad = by_name[point_name(BAD)]
    assert bad["status"] == "failed" and bad["returncode"] not in (0, None)
    assert "no_such_loss" in bad["error"]
    assert state["counts"] == {"done": 3, "failed": 1, "running": 0, "queued": 0}


def test_traced_values_compile_once_per_sweep(tiny_sweep):
    out, _, _ = tiny_sweep
    points = _state(out)["points"]
    first, *others = [p for p in points if p["status"] == "done"]
    # The first point fills the shared cache; β and seed are traced values, so the other
    # points find every program there (a compile is a cache miss, which writes an entry).
    assert first["new_cache_entries"] > 0
    assert [p["new_cache_entries"] for p in others] == [0, 0]
    compile_info = _state(out)["compile"]
    assert compile_info["new_cache_entries"] >= first["new_cache_entries"]


class _FakeLauncher(launch.Launcher):
    """Finishes a point on its second poll: even A writes summary.json, odd A exits 3; records
    how many points run at once. A = 99 cannot start."""

    def __init__(self):
        self.running, self.peak = set(), 0

    def start(self, task):
        if "A = 99" in (task.run_dir / "bindings.gin").read_text():
            raise OSError("no slot")
        self.running.add(task.name)
        self.peak = max(self.peak, len(self.running))
        return {"task": task, "polls": 0}

    def poll(self, handle):
        handle["polls"] += 1
        if handle["polls"] < 2:
            return "running", None, None
        task = handle["task"]
        self.running.discard(task.name)
        if task.name.endswith(("0", "2", "4")):
            (task.run_dir / "summary.json").write_text(json.dumps({"status": "done"}))
            return "finished", 0, None
        task.log_path.write_text("Traceback (most recent call last):\nKeyError: 'boom'\n")
        return "finished", 3, None


def test_scheduling_and_bookkeeping_without_real_runs(tmp_path):
    from rlhf_jax.sweep.spec import Sweep, sweep

    s = Sweep(["base.gin"], sweep("A", [0, 1, 2, 3, 4, 99]))
    fake = _FakeLauncher()
    result = launch.run_sweep(s, tmp_path / "s", launcher=fake, parallel=2, poll_s=0,
                              validate_first=False, stream=None)  # fmt: skip
    assert fake.peak == 2
    assert (result.done, result.failed) == (3, 3)
    state = _state(tmp_path / "s")
    errors = {p["name"]: p["error"] for p in state["points"]}
    assert errors["A=0"] is None and errors["A=1"] == "exit code 3: KeyError: 'boom'"
    assert errors["A=99"] == "could not start: OSError: no slot"
    assert [p["returncode"] for p in state["points"]] == [0, 3, 0, 3, 0, None]


def test_points_with_their_own_gin_files_mix_stages(tmp_path, monkeypatch):
    """A DPO point and an RLOO point in one sweep: each is validated against its own files
    (a macro only the other stage defines is refused by name) and runs with them."""
    from rlhf_jax.sweep.spec import Sweep, gin_files, product, sweep

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    d = {"GIN_FILE": "gin/experiments/dpo_reviews_tiny.gin", "SFT_RUN": "s", "PREFERENCES": "p"}
    r = {"GIN_FILE": "gin/experiments/rloo_reviews_tiny.gin", "SFT_RUN": "s", "REWARD_RUN": "r"}
    launch.validate(Sweep([], [{**d, "BETA": 0.3}, {**r, "KL_COEF": 0.1}]))
    with pytest.raises(SweepError, match=r"unknown macro BETA in point GIN_FILE=rloo_reviews_tiny"):
        launch.validate(Sweep([], [d, {**r, "BETA": 0.3}]))
    with pytest.raises(SweepError, match="do not parse"):
        launch.validate(Sweep([], gin_files("no/such.gin")))

    fake = _FakeLauncher()
    s = Sweep(["base.gin"], product(gin_files("one.gin", "two.gin"), sweep("A", [0])))
    launch.run_sweep(s, tmp_path / "s", launcher=fake, parallel=1, poll_s=0,
                     validate_first=False, stream=None)  # fmt: skip
    for stem in ("one", "two"):
        run_dir = tmp_path / "s" / f"GIN_FILE={stem},A=0"
        point = json.loads((run_dir / "point.json").read_text())
        assert point["gin_files"] == ["base.gin", f"{stem}.gin"]
        assert point["argv"][:5] == ["train", "--gin_file", "base.gin", "--gin_file", f"{stem}.gin"]
        lines = (run_dir / "bindings.gin").read_text().splitlines()
        assert [x for x in lines if not x.startswith("#")] == ["A = 0", f"RUN_DIR = '{run_dir}'"]
