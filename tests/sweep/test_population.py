"""`rlhf-jax sweep --mode population`: 4 DPO members (2 β × 2 seeds) trained as one vmapped
program give the metrics of the 4 separate runs, and each member's run directory is a normal run
(the same summary keys, read by `rlhf-jax report`, its checkpoint resumed by a plain `train`);
points that differ in static settings form separate populations; bad input exits 2.

Tolerance. Both sides run float32 on the 8 fake CPU devices. The population's matmuls carry a
leading member axis, so XLA may pick other loop orders and reductions than a single run's: the
same numbers summed in another order, ~1e-7 relative per op, grown by four Adam steps (whose
first steps divide by the gradients' own magnitude). Observed: at most 2.4e-6 relative (the
implicit KL); we allow a relative 1e-4 plus an absolute 1e-6 (the implicit rewards of step 1,
where the policy is still the reference, are float32 rounding noise of ~1e-8 on both sides).
The reward accuracies count pairs whose margin is positive; a pair whose margin is within that
noise could flip, so they may differ by one pair.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from conftest import BAD, DPO_GIN, GOOD, subprocess_env, tiny_sweep_spec
from support import file_lock

from rlhf_jax import cli
from rlhf_jax.sweep.launch import run_sweep
from rlhf_jax.sweep.spec import Sweep, point_name, product, sweep

RTOL, ATOL, ACCURACY_PAIRS = 1e-4, 1e-6, 1
POP_POINTS = product(sweep("BETA", [0.1, 0.3]), sweep("SEED", [0, 1]))
EXTRA = [p for p in POP_POINTS if p not in GOOD]  # the one the tiny sweep does not run


@pytest.fixture(scope="module")
def population(shared_dir, reviews, sft_run, tiny_sweep):
    """(population sweep dir, its result, {point name: separate run dir}) for POP_POINTS."""
    subprocess_env()
    _, prefs, _ = reviews
    cache = shared_dir / "sweep_ref_cache"
    out, single = shared_dir / "pop_sweep", shared_dir / "pop_single"
    with file_lock(shared_dir / "pop_sweep.lock"):
        result = None
        if not (out / "sweep.json").exists():
            spec = tiny_sweep_spec(sft_run, prefs, cache, POP_POINTS)
            result = run_sweep(spec, out, mode="population", stream=sys.stdout, poll_s=0.2)
        if not (single / "sweep.json").exists():
            run_sweep(tiny_sweep_spec(sft_run, prefs, cache, EXTRA), single, stream=sys.stdout)
    separate = {point_name(p): tiny_sweep[0] / point_name(p) for p in GOOD}
    separate.update({point_name(p): single / point_name(p) for p in EXTRA})
    return out, result, separate


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_population_runs_as_one_program_with_normal_statuses(population):
    out, result, _ = population
    state = json.loads((out / "sweep.json").read_text())
    assert state["mode"] == "population"
    assert state["populations"] == [[point_name(p) for p in POP_POINTS]]
    assert state["counts"] == {"done": 4, "running": 0, "failed": 0, "queued": 0}
    for p in state["points"]:
        summary = json.loads((out / p["run_dir"] / "summary.json").read_text())
        # One trace of the vmapped step serves every member.
        assert summary["step"] == 4 and summary["compile/step_traces"] == 1
        assert p["population"] == 0 and (out / p["run_dir"] / "bindings.gin").exists()
    if result is not None:
        assert result.done == 4 and result.failed == 0


def test_population_metrics_equal_the_separate_runs(population):
    out, _, separate = population
    for name, single in separate.items():
        pop, ref = _records(out / name), _records(single)
        assert [r["step"] for r in pop] == [r["step"] for r in ref] == [1, 2, 3, 4]
        compared = 0
        for a, b in zip(pop, ref, strict=True):
            keys = {k for k in b if k.startswith(("train/", "eval/"))}
            assert keys == {k for k in a if k.startswith(("train/", "eval/"))}, name
            for k in sorted(keys):
                if k.endswith("rewards/accuracies"):
                    pairs = b["eval/pairs" if k.startswith("eval/") else "train/pairs"]
                    assert abs(a[k] - b[k]) * pairs <= ACCURACY_PAIRS + 1e-6, (name, k)
                else:
                    assert a[k] == pytest.approx(b[k], rel=RTOL, abs=ATOL), (name, a["step"], k)
                compared += 1
        assert compared > 40
        # The members really differ (β and the data order): not one run copied four times.
    finals = {n: _records(out / n)[-1]["train/loss"] for n in separate}
    assert len(set(finals.values())) == 4


def test_member_run_directories_are_normal_runs(population, tmp_path):
    from rlhf_jax import commands
    from rlhf_jax.sweep.report import write_report

    out, _, separate = population
    for name, single in separate.items():
        a = json.loads((out / name / "summary.json").read_text())
        b = json.loads((single / "summary.json").read_text())
        assert set(a) == set(b), set(a) ^ set(b)
        assert sorted(p.name for p in (out / name).iterdir() if p.name != "sweep.log") == sorted(
            p.name for p in single.iterdir() if p.name != "sweep.log"
        )
        config = (out / name / "config.gin").read_text()
        beta, seed = name.split(",")
        assert f"BETA = {beta.split('=')[1]}" in config and f"SEED = {seed.split('=')[1]}" in config
    report = tmp_path / "report"
    shutil.copytree(out, report, ignore=shutil.ignore_patterns("jax_cache", "checkpoints"))
    write_report(report)
    rows = (report / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(",done," in r for r in rows[1:]), rows
    # A plain `rlhf-jax train` resumes a member's checkpoint (step 4) and trains on to step 6.
    name = point_name(POP_POINTS[-1])
    run = tmp_path / "resumed"
    shutil.copytree(out / name, run)
    (run / "summary.json").unlink()
    commands.parse_gin([DPO_GIN, str(run / "bindings.gin")],
                       [f"RUN_DIR = '{run}'", "TRAIN_STEPS = 6"])  # fmt: skip
    commands.train_command()
    steps = [r["step"] for r in _records(run)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "summary.json").read_text())["step"] == 6


def _grid(points):
    return Sweep(
        gin_files=[DPO_GIN],
        points=points,
        bindings={"SFT_RUN": "runs/sft", "PREFERENCES": "runs/prefs"},
    )


def test_static_differences_form_separate_populations():
    from rlhf_jax.sweep.population import group_points

    points = [
        {"BETA": 0.1, "SEED": 0, "LEARNING_RATE": 1e-3},
        {"BETA": 0.3, "SEED": 1, "LEARNING_RATE": 1e-3, "LABEL_SMOOTHING": 0.1},
        {"BETA": 0.1, "SEED": 0, "LEARNING_RATE": 3e-4},  # the learning rate is static
        {"BETA": 0.1, "SEED": 0, "LEARNING_RATE": 1e-3, "RPO_ALPHA": 0.5},  # switches RPO on
        {"BETA": 0.1, "SEED": 1, "LEARNING_RATE": 1e-3, "DPO_LOSS_TYPE": "ipo"},
        {"BETA": 0.1, "SEED": 2, "LEARNING_RATE": 1e-3, "BATCH_SIZE": 8},
        {"BETA": 0.5, "SEED": 3, "LEARNING_RATE": 3e-4},
        BAD,
    ]
    groups = group_points(_grid(points))
    assert [idx for idx, _ in groups] == [[0, 1], [2, 6], [3], [4], [5], [7]]
    assert [err for _, err in groups[:-1]] == [None] * 5
    assert "no_such_loss" in groups[-1][1] and "In call to" not in groups[-1][1]


def test_unknown_mode_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--gin_file", DPO_GIN, "--grid", "BETA=0.1", "--gin.SFT_RUN=runs/sft",
            "--gin.PREFERENCES=runs/prefs", "--out_dir", str(out), "--mode", "swarm"]  # fmt: skip
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "unknown --mode 'swarm'" in err and "Traceback" not in err, err
    assert not out.exists()


def test_sigterm_resumes_and_a_nonfinite_member_fails_alone(population, tmp_path):
    """A SIGTERM during step 2 checkpoints both members after it; the same population re-run
    resumes them. Member 1 turns NaN in its 4th step (step index 3) under
    nonfinite_policy='halt': it is recorded as failed, with no later records, while member 0
    finishes with the metrics of its separate run."""
    from rlhf_jax.sweep.population import gin_member
    from rlhf_jax.train.population import run_population

    out, _, separate = population
    ok, nan = POP_POINTS[0], POP_POINTS[-1]

    def members(*extra):
        def member(p, more):
            run = tmp_path / point_name(p)
            lines = [*(out / point_name(p) / "bindings.gin").read_text().splitlines()]
            lines += [f"RUN_DIR = '{run}'", "NONFINITE_POLICY = 'halt'", *more, *extra]
            return gin_member(point_name(p), [DPO_GIN], lines)

        return [member(ok, []), member(nan, ["dpo_stage.debug_nan_step = 3"])]

    first = run_population(
        members("LoopConfig.fault_signal = 'SIGTERM'", "LoopConfig.fault_signal_step = 1")
    )
    assert [r.status for r in first] == ["preempted", "preempted"]
    for p in (ok, nan):
        run = tmp_path / point_name(p)
        assert not (run / "summary.json").exists() and (run / "checkpoints" / "2").is_dir()
    second = run_population(members())
    assert [r.status for r in second] == ["done", "failed"]
    assert "non-finite" in second[1].error and "step 3" in second[1].error
    bad = tmp_path / point_name(nan)
    assert not (bad / "summary.json").exists()
    assert [r["step"] for r in _records(bad)] == [1, 2, 3]
    good, ref = _records(tmp_path / point_name(ok)), _records(separate[point_name(ok)])
    assert [r["step"] for r in good] == [1, 2, 3, 4]
    for a, b in zip(good, ref, strict=True):
        for k in (k for k in b if k.startswith(("train/", "eval/")) and "accuracies" not in k):
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=ATOL), (a["step"], k)


def test_online_rl_stage_is_refused_with_exit_2(sft_run, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--gin_file", "gin/experiments/grpo_reviews_tiny.gin", "--grid", "SEED=0,1",
            f"--gin.SFT_RUN='{sft_run}'", "--gin.REWARD_RUN=None", "--gin.rl_stage.reward='gold'",
            "--out_dir", str(out), "--mode", "population"]  # fmt: skip
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "does not support the rl_stage stage" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
