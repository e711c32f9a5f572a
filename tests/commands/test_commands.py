"""End-to-end tests of `rlhf-jax generate` and `rlhf-jax make-preferences` on a tiny SFT policy
of the reviews task, the policy sampling helpers behind them (KL to itself, determinism), and
the commands' user errors (exit code 2, one clear message)."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from command_helpers import REPO, run_cli

from rlhf_jax.commands import evaluate_policies
from rlhf_jax.data import DataError, make_preference_iterator
from rlhf_jax.data.prompts import read_prompts
from rlhf_jax.data.tasks import TASKS
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.rundir import samples_path

# One sampler shape for every test (8 rows, prompt bucket 8, 8 new tokens): after the first
# compile, the persistent cache serves every later sampler of the session.
SAMPLING = ("max_new_tokens=8", "batch_size=8")


def _cmd_bindings(fn: str, *bindings: str) -> list[str]:
    return [f"--gin.{fn}.{b}" for b in (*SAMPLING, *bindings)]


def test_generate_writes_jsonl_with_judge_scores(sft_run, reviews_task, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    code = run_cli(
        "generate",
        f"--gin.CHECKPOINT='{sft_run}'",
        f"--gin.PROMPTS='{reviews_task.eval_prompts_path}'",
        f"--gin.OUTPUT='{out}'",
        *_cmd_bindings("generate_command", "limit=12", "num_samples=2"),
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = read_prompts(reviews_task.eval_prompts_path, limit=12)
    assert len(rows) == 24
    assert [r["prompt"] for r in rows] == [p for p in prompts for _ in range(2)]
    assert [r["sample"] for r in rows] == [0, 1] * 12
    for r in rows:
        assert {"completion", "text", "length", "logprob", "sentiment", "offensiveness"} <= set(r)
        assert -1 <= r["sentiment"] <= 1 and 0 <= r["offensiveness"] <= 1
        assert 1 <= r["length"] <= 8 and r["logprob"] < 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 24 and "sentiment" in summary and "length" in summary


def test_segment_len_reaches_the_sampler(sft_run, reviews_task, tmp_path, monkeypatch):
    """The commands' `segment_len` gin knob ends up in the `SamplingConfig` they sample with."""
    seen = []
    real = policy_eval.SamplingConfig

    def spy(**kw):
        seen.append(kw.get("segment_len"))
        return real(**kw)

    monkeypatch.setattr(policy_eval, "SamplingConfig", spy)
    prompts = f"--gin.PROMPTS='{reviews_task.prompts_path}'"
    code = run_cli(
        "generate",
        f"--gin.CHECKPOINT='{sft_run}'",
        prompts,
        f"--gin.OUTPUT='{tmp_path / 'gen.jsonl'}'",
        *_cmd_bindings("generate_command", "limit=2", "judge=None", "segment_len=5"),
    )
    assert code == 0 and seen == [5]
    code = run_cli(
        "make-preferences",
        f"--gin.CHECKPOINT='{sft_run}'",
        prompts,
        f"--gin.PREFERENCES='{tmp_path / 'prefs'}'",
        *_cmd_bindings("make_preferences_command", "limit=4", "segment_len=7"),
    )
    assert code == 0 and seen == [5, 7]


def test_generate_segment_len_gives_the_same_samples(sft_run, reviews_task, tmp_path):
    """`generate_command.segment_len` changes the decode loop, not the samples."""
    rows = {}
    for seg in (0, 3):
        out = tmp_path / f"gen{seg}.jsonl"
        code = run_cli(
            "generate",
            f"--gin.CHECKPOINT='{sft_run}'",
            f"--gin.PROMPTS='{reviews_task.eval_prompts_path}'",
            f"--gin.OUTPUT='{out}'",
            *_cmd_bindings("generate_command", "limit=8", "judge=None", f"segment_len={seg}"),
        )
        assert code == 0
        rows[seg] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completion"] for r in rows[3]] == [r["completion"] for r in rows[0]]
    assert any(r["length"] > 3 for r in rows[0])  # some rows ran past the first segment
    np.testing.assert_allclose(
        [r["logprob"] for r in rows[3]], [r["logprob"] for r in rows[0]], atol=1e-4
    )


def test_generate_without_judge(sft_run, reviews_task, tmp_path):
    out = tmp_path / "gen.jsonl"
    code = run_cli(
        "generate",
        f"--gin.CHECKPOINT='{sft_run}'",
        f"--gin.PROMPTS='{reviews_task.eval_prompts_path}'",
        f"--gin.OUTPUT='{out}'",
        *_cmd_bindings("generate_command", "limit=3", "judge=None"),
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    assert all("sentiment" not in r and "offensiveness" not in r for r in rows)


def test_make_preferences_parquet_loads_through_the_pipeline(sft_run, reviews_task, tmp_path):
    out = tmp_path / "prefs"
    code = run_cli(
        "make-preferences",
        f"--gin.CHECKPOINT='{sft_run}'",
        f"--gin.PROMPTS='{reviews_task.prompts_path}'",
        f"--gin.PREFERENCES='{out}'",
        "--gin.LABEL_TEMPERATURE=0.0",
        *_cmd_bindings(
            "make_preferences_command", "limit=48", "num_samples=4", "eval_fraction=0.25"
        ),
    )
    assert code == 0
    meta = json.loads((out / "preferences.json").read_text())
    train, ev = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "eval.parquet")
    assert meta["num_prompts"] == 48 and meta["eval_prompts"] == 12
    assert (meta["train_pairs"], meta["eval_pairs"]) == (len(train), len(ev))
    assert meta["pairs"] + meta["dropped_pairs"] == 48 * 2 and len(train) > 40
    assert not set(train["prompt"]) & set(ev["prompt"])  # split by prompt
    assert len(set(ev["prompt"])) <= 12
    for col in ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "label_prob"):
        assert col in train.columns
    both = pd.concat([train, ev])
    assert (both["chosen"] != both["rejected"]).all()
    # T = 0: every label follows the gold judge (ties, if any, are coin flips at p = 1/2).
    decided = both["chosen_score"] != both["rejected_score"]
    assert (both["chosen_score"][decided] > both["rejected_score"][decided]).all()
    assert (both["label_prob"][decided] == 1.0).all() and meta["label_gold_agreement"] == 1.0
    # The reward-model and DPO stages read the folder this way.
    it, eval_it, _ = make_preference_iterator(
        source=str(out), tokenizer=reviews_task.tokenizer_path, batch_size=8, buckets=(32, 48)
    )
    assert eval_it is not None and len(it.examples) == len(train)
    assert len(eval_it.examples) == len(ev)
    batch = next(it)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["chosen_loss_mask"].sum() > 0 and batch["rejected_loss_mask"].sum() > 0


class _ToyTask:
    """A task whose one judge counts characters: the commands must score with it."""

    JUDGE_NAMES = ("chars",)

    @staticmethod
    def judge(texts):
        return {"chars": np.asarray([len(t) for t in texts], dtype=np.float32)}

    @staticmethod
    def gold_reward(scores, kind="sentiment", weights=None):
        return np.asarray(scores["chars"], dtype=np.float32)


def test_judges_come_from_the_task(sft_run, reviews_task, tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "toy", _ToyTask)
    gen, prefs = tmp_path / "gen.jsonl", tmp_path / "prefs"
    common = [f"--gin.CHECKPOINT='{sft_run}'", f"--gin.PROMPTS='{reviews_task.prompts_path}'"]
    code = run_cli(
        "generate",
        *common,
        f"--gin.OUTPUT='{gen}'",
        *_cmd_bindings("generate_command", "limit=4", "judge='toy'"),
    )
    assert code == 0
    rows = [json.loads(line) for line in gen.read_text().splitlines()]
    assert all(r["chars"] == len(r["text"]) and "sentiment" not in r for r in rows)
    code = run_cli(
        "make-preferences",
        *common,
        f"--gin.PREFERENCES='{prefs}'",
        "--gin.LABEL_TEMPERATURE=0.0",
        *_cmd_bindings("make_preferences_command", "limit=8", "eval_fraction=0.0", "task='toy'"),
    )
    assert code == 0
    train = pd.read_parquet(prefs / "train.parquet")
    assert (train["chosen_chars"] == train["chosen_score"]).all()
    assert (train["chosen_score"] >= train["rejected_score"]).all()  # T = 0: the toy gold wins
    assert "chosen_sentiment" not in train.columns


@pytest.fixture(scope="module")
def policy(sft_run):
    return policy_eval.load_policy(sft_run)


def test_kl_to_itself_is_zero_and_sampling_is_deterministic(policy, sft_run, reviews_task):
    prompts = read_prompts(reviews_task.eval_prompts_path, limit=8)
    ref = policy_eval.load_policy(sft_run, policy.mesh, policy.rules)
    kw = dict(max_new_tokens=8, num_samples=2, batch_size=8, progress=False)
    rows = policy_eval.sample(policy, prompts, seed=3, ref=ref, **kw)
    assert len(rows) == 16
    kl = np.array([r["kl"] for r in rows])
    assert np.all(np.abs(kl) < 1e-3)
    # The teacher-forced log-probs agree with the sampler's own (cached decode).
    plain = policy_eval.sample(policy, prompts, seed=3, **kw)
    assert [r["completion"] for r in plain] == [r["completion"] for r in rows]
    np.testing.assert_allclose(
        [r["logprob"] for r in plain], [r["logprob"] for r in rows], atol=1e-3
    )
    again = policy_eval.sample(policy, prompts, seed=3, **kw)
    assert again == plain
    other = policy_eval.sample(policy, prompts, seed=4, **kw)
    assert [r["completion"] for r in other] != [r["completion"] for r in plain]
    with pytest.raises(ValueError, match="temperature=1"):
        policy_eval.sample(policy, prompts, temperature=0.7, ref=ref, **kw)


def test_evaluate_policies_reports_kl_and_writes_samples(sft_run, reviews_task):
    prompts = read_prompts(reviews_task.eval_prompts_path, limit=8)
    results = evaluate_policies(
        {"SFT": str(sft_run)}, reference=str(sft_run), prompts=prompts, max_new_tokens=8,
        batch_size=8,
    )  # fmt: skip
    r = results["SFT"]
    assert r["samples"] == 8 and abs(r["kl"]) < 1e-3
    assert {"sentiment", "offensiveness", "length", "kl/sem"} <= set(r)
    rows = [json.loads(line) for line in samples_path(sft_run).read_text().splitlines()]
    assert len(rows) == 8 and all("kl" in row and "sentiment" in row for row in rows)


# ----------------------------------------------------------------------------- user errors


def _assert_exit_2(capsys, argv, *needles):
    code = run_cli(*argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_missing_checkpoint_exits_2(reviews_task, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    prompts = f"--gin.PROMPTS='{reviews_task.eval_prompts_path}'"
    for argv in (
        ["generate", f"--gin.CHECKPOINT='{missing}'", prompts],
        [
            "make-preferences",
            f"--gin.CHECKPOINT='{missing}'",
            prompts,
            f"--gin.PREFERENCES='{tmp_path / 'prefs'}'",
        ],
    ):
        _assert_exit_2(capsys, argv, "CHECKPOINT", str(missing), "does not exist")
    # The same through `python -m rlhf_jax.cli` (where the CLI module is `__main__`).
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "generate", f"--gin.CHECKPOINT={missing}", prompts],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    # An existing folder that is not a run directory.
    _assert_exit_2(
        capsys,
        ["generate", f"--gin.CHECKPOINT='{tmp_path}'", prompts],
        "neither a run directory",
    )
    # CHECKPOINT not set at all.
    _assert_exit_2(capsys, ["generate", prompts], "CHECKPOINT")


def test_prompts_without_prompt_column_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n')
    _assert_exit_2(
        capsys,
        ["generate", f"--gin.CHECKPOINT='{tmp_path}'", f"--gin.PROMPTS='{bad}'"],
        "PROMPTS",
        "no column 'prompt'",
        str(bad),
    )
    _assert_exit_2(
        capsys,
        [
            "generate",
            f"--gin.CHECKPOINT='{tmp_path}'",
            f"--gin.PROMPTS='{tmp_path / 'nope.jsonl'}'",
        ],
        "not found",
    )
    empty = tmp_path / "empty_prompt.jsonl"
    empty.write_text('{"prompt": "fine"}\n{"prompt": "  "}\n')
    with pytest.raises(DataError, match="row 1"):
        read_prompts(empty)


def test_bad_command_settings_exit_2(tmp_path, capsys):
    _assert_exit_2(
        capsys,
        [
            "make-preferences",
            f"--gin.CHECKPOINT='{tmp_path}'",
            f"--gin.PROMPTS='{tmp_path}'",
            f"--gin.PREFERENCES='{tmp_path / 'out'}'",
            "--gin.make_preferences_command.num_samples=1",
        ],
        "num_samples=1",
        "K >= 2",
    )
    _assert_exit_2(
        capsys,
        [
            "make-preferences",
            f"--gin.CHECKPOINT='{tmp_path}'",
            f"--gin.PROMPTS='{tmp_path}'",
            f"--gin.PREFERENCES='{tmp_path / 'out'}'",
            "--gin.GOLD_REWARD='helpful'",
        ],
        "unknown gold reward kind 'helpful'",
    )
    _assert_exit_2(
        capsys,
        [
            "generate",
            f"--gin.CHECKPOINT='{tmp_path}'",
            f"--gin.PROMPTS='{tmp_path}'",
            "--gin.generate_command.judge='nope'",
        ],
        "unknown judge",
    )
    for command, knob in (("generate", "segment_len"), ("make-preferences", "top_k")):
        name = "generate_command" if command == "generate" else "make_preferences_command"
        _assert_exit_2(
            capsys,
            [
                command,
                f"--gin.CHECKPOINT='{tmp_path}'",
                f"--gin.PROMPTS='{tmp_path}'",
                *([f"--gin.PREFERENCES='{tmp_path / 'out'}'"] if command != "generate" else []),
                f"--gin.{name}.{knob}=-1",
            ],
            f"{name}.{knob}=-1 must be an integer >= 0",
        )


def test_commands_in_two_processes_match_one_process(
    sft_run, reviews_task, tmp_path, run_workers, free_port
):
    """generate and make-preferences in a 2-process job (gloo, 2 fake devices each) write the
    same files as a 1-process job; every process returns only once the files exist."""
    port, worker = str(free_port()), str(REPO / "tests/commands/multiprocess_worker.py")
    prompts = str(reviews_task.prompts_path)

    def argv(pid: int, nproc: int, out) -> list[str]:
        return [worker, str(pid), str(nproc), port, str(sft_run), prompts, str(out)]

    run_workers(
        [argv(0, 2, tmp_path / "two"), argv(1, 2, tmp_path / "two"), argv(0, 1, tmp_path / "one")],
        timeout=600,
    )
    one, two = tmp_path / "one", tmp_path / "two"
    rows_one, rows_two = (
        [json.loads(line) for line in (d / "gen.jsonl").read_text().splitlines()]
        for d in (one, two)
    )
    assert len(rows_one) == 12
    # Same completions and judge scores; log-probs up to the summation order of the sharding.
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["logprob"] == pytest.approx(a["logprob"], abs=1e-4)
        assert {k: v for k, v in a.items() if k != "logprob"} == {
            k: v for k, v in b.items() if k != "logprob"
        }
    pd.testing.assert_frame_equal(
        pd.read_parquet(two / "prefs/train.parquet"), pd.read_parquet(one / "prefs/train.parquet")
    )
    meta = [json.loads((d / "prefs/preferences.json").read_text()) for d in (one, two)]
    assert meta[0]["pairs"] == meta[1]["pairs"] > 0
