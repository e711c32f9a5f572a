"""`rlhf-jax sweep` from the command line: the grid form builds the product of its --grid
flags, bad input exits 2 with one message and writes nothing, a spec re-run exits with 100 +
the number of failed points, and the slurm launcher runs points through submitit's local
executor with the same bookkeeping."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import BAD, DPO_GIN, GOOD, tiny_sweep_spec

from rlhf_jax import cli
from rlhf_jax.sweep import commands
from rlhf_jax.sweep.launch import run_sweep
from rlhf_jax.sweep.spec import binding_lines, point_name

REQUIRED = ["--gin.SFT_RUN=runs/sft", "--gin.PREFERENCES=runs/prefs"]


def _sweep(argv, capsys):
    rc = cli.main(["sweep", *argv])
    return rc, capsys.readouterr().err


def test_grid_form_builds_the_product():
    argv = ["sweep", "--gin_file", DPO_GIN, "--grid", "BETA=0.05,0.1", "--grid", "SEED=0,1",
            "--out_dir", "x", *REQUIRED]  # fmt: skip
    args, bindings = cli.parse_args(argv)
    s = commands.build_sweep(args, bindings)
    assert s.gin_files == [DPO_GIN]
    assert s.points == [{"BETA": 0.05, "SEED": 0}, {"BETA": 0.05, "SEED": 1},
                        {"BETA": 0.1, "SEED": 0}, {"BETA": 0.1, "SEED": 1}]  # fmt: skip
    assert binding_lines(s.bindings) == ["SFT_RUN = 'runs/sft'", "PREFERENCES = 'runs/prefs'"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gin_file", DPO_GIN, "--grid", "BEETA=0.1,0.2", *REQUIRED], "unknown macro BEETA"),
        (["--gin_file", DPO_GIN, "--grid", "BETA=", *REQUIRED], "no values"),
        (["--gin_file", DPO_GIN, *REQUIRED], "grid is empty"),
        (["--gin_file", DPO_GIN, "--grid", "LoopConfig.nope=1,2", *REQUIRED], "nope"),
        (["--gin_file", DPO_GIN, "--grid", "BETA=0.1"], "REQUIRED macro(s) not set"),
        (["--gin_file", "gin/no_such.gin", "--grid", "BETA=0.1"], "not found"),
        (["--gin_file", DPO_GIN, "--grid", "BETA=0.1", *REQUIRED, "--slurm", "mem"], "--slurm"),
        (["--gin_file", DPO_GIN, "--grid", "BETA=0.1", "--gin_bindings", "X"], "binding"),
    ],
)
def test_bad_grid_exits_2_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, err = _sweep([*argv, "--out_dir", str(out)], capsys)
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_spec_exits_2(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("from rlhf_jax.sweep.spec import Sweep\nSWEEP = Sweep(\n")
    rc, err = _sweep([str(broken), "--out_dir", str(tmp_path / "s")], capsys)
    assert rc == 2 and "does not import" in err and not (tmp_path / "s").exists()


def test_out_dir_of_another_sweep_exits_2_untouched(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"fingerprint": "another sweep", "points": []}))
    before = (out / "sweep.json").read_bytes()
    argv = ["--gin_file", DPO_GIN, "--grid", "BETA=0.1", *REQUIRED, "--out_dir", str(out)]
    rc, err = _sweep(argv, capsys)
    assert rc == 2 and "different sweep" in err
    assert (out / "sweep.json").read_bytes() == before and sorted(out.iterdir()) == [
        out / "sweep.json"]  # fmt: skip
    (out / "sweep.json").unlink()
    (out / "notes.txt").write_text("mine")
    rc, err = _sweep(argv, capsys)
    assert rc == 2 and "not a sweep directory" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_spec_rerun_skips_finished_resumes_unfinished_retries_failed(tiny_sweep, tmp_path, capsys):
    out, sweep, _ = tiny_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    unfinished = point_name(GOOD[2])
    (copy / unfinished / "summary.json").unlink()
    spec_file = tmp_path / "tiny_spec.py"
    spec_file.write_text(
        "from rlhf_jax.sweep.spec import Sweep\n"
        f"SWEEP = Sweep(gin_files={sweep.gin_files!r}, points={sweep.points!r}, "
        f"bindings={sweep.bindings!r}, name='tiny')\n"
    )
    rc = cli.main(["sweep", str(spec_file), "--out_dir", str(copy)])
    text = capsys.readouterr().out
    assert rc == 101, text  # 100 + the number of failed points (never 2, a user error)
    assert "2 point(s) already finished" in text and f"FAILED  {point_name(BAD)}" in text
    state = json.loads((copy / "sweep.json").read_text())
    # (Resuming compiles the restore path's programs, which the first sweep never ran.)
    assert f"compiles this invocation: {state['compile']['new_cache_entries']} " in text
    attempts = {p["name"]: p["attempts"] for p in state["points"]}
    assert attempts == {point_name(GOOD[0]): 1, point_name(GOOD[1]): 1, unfinished: 2,
                        point_name(BAD): 2}  # fmt: skip
    assert state["counts"] == {"done": 3, "failed": 1, "running": 0, "queued": 0}
    # The unfinished point continued from its checkpoint instead of starting over.
    assert "resumed from the checkpoint of step 4" in (copy / unfinished / "sweep.log").read_text()


def test_slurm_launcher_through_submitit_local_executor(tiny_sweep, reviews, sft_run, tmp_path):
    import submitit  # noqa: F401

    out, _, _ = tiny_sweep
    sweep = tiny_sweep_spec(sft_run, reviews[1], out.parent / "sweep_ref_cache", [GOOD[0], BAD])
    lines = []

    class Stream:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass

    result = run_sweep(sweep, tmp_path / "s", launcher="slurm", parallel=2,
                       cache_dir=out / "jax_cache", slurm={"cluster": "local", "timeout_min": 10},
                       stream=Stream(), poll_s=0.5)  # fmt: skip
    assert (result.done, result.failed) == (1, 1)
    state = json.loads((tmp_path / "s" / "sweep.json").read_text())
    by_name = {p["name"]: p for p in state["points"]}
    assert by_name[point_name(GOOD[0])]["status"] == "done"
    assert (tmp_path / "s" / point_name(GOOD[0]) / "summary.json").exists()
    assert "no_such_loss" in by_name[point_name(BAD)]["error"]
    text = "".join(lines)
    assert "2 running" in text and "1 failed" in text
    assert state["compile"]["new_cache_entries"] == 0


def test_a_second_sweep_process_on_the_same_directory_is_refused(tmp_path):
    import fcntl

    from rlhf_jax.sweep.spec import Sweep, SweepError

    sweep = Sweep([DPO_GIN], [{"BETA": 0.1}])
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"fingerprint": sweep.fingerprint()}))
    with open(out / ".sweep.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(SweepError, match="another sweep process"):
            run_sweep(sweep, out, validate_first=False, stream=None)
