"""The host loop in-process: run-directory contract, one compilation, resume, non-finite
policies, init_from, and iterators without a checkpointable position."""

import itertools
import json

import jax
import numpy as np
import pytest
from runtime_helpers import bind_tiny_sft, run_tiny_sft

from rlhf_jax.rundir import load_params
from rlhf_jax.steps.state import TrainState
from rlhf_jax.train import faults
from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.metrics import read_metrics
from rlhf_jax.train.sft import sft_stage, synthetic_sft_data
from rlhf_jax.train.stage import StageData
from rlhf_jax.train.synthetic import synthetic_sft_batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_run_directory_contract_and_single_compilation(tmp_path):
    run_dir = tmp_path / "run"
    result = run_tiny_sft(run_dir, 8)
    assert result.status == "done" and result.step == 8
    assert result.step_traces == 1  # evals and checkpoint saves in between did not retrace

    records = read_metrics(run_dir, dedup=False)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for r in records:
        assert isinstance(r["time"], float)
        assert {"train/loss", "train/tokens", "train/grad_norm", "train/lr"} <= set(r)
        assert r["perf/tokens_per_s"] > 0 and "perf/mfu" not in r  # no peak FLOP/s on CPU
    assert "eval/loss" in records[1] and "eval/loss" in records[3] and "eval/loss" not in records[0]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 8
    assert summary["compile/step_traces"] == 1
    assert summary["eval/loss"] < summary["baseline/unigram_eval_loss"]
    assert summary["nonfinite/skipped"] == 0
    config = (run_dir / "config.gin").read_text()
    assert "sft_stage" in config and "make_optimizer" in config
    model = json.loads((run_dir / "model.json").read_text())
    assert model["model_class"] == "Transformer" and model["model_config"]["vocab_size"] == 48
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [4, 8]
    assert not list(run_dir.glob("*.tmp*"))


def test_resumed_run_equals_uninterrupted(tmp_path):
    full = run_tiny_sft(tmp_path / "full", 8)
    run_tiny_sft(tmp_path / "split", 4)
    resumed = run_tiny_sft(tmp_path / "split", 8)
    assert resumed.step == 8
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split", dedup=False)
    assert [r["step"] for r in b] == [2, 4, 6, 8]  # nothing logged twice
    for ra, rb in zip(a, b, strict=True):
        for key in ("train/loss", "train/grad_norm", "eval/loss"):
            assert ra.get(key) == rb.get(key)
    for x, y in zip(
        _leaves(full.state.policy.params), _leaves(resumed.state.policy.params), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    # A finished run re-run is a no-op that keeps its summary.
    again = run_tiny_sft(tmp_path / "split", 8)
    assert again.status == "done" and again.step_traces == 0


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_nonfinite_skip_policy(tmp_path):
    result = run_tiny_sft(tmp_path / "run", 6, "sft_stage.debug_nan_step = 3")
    assert result.status == "done"
    records = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert np.isnan(records[4]["train/loss"])  # the record of step index 3
    assert records[4]["train/nonfinite/skipped"] == 1
    # On disk it is strict JSON: null with the reason beside it, readable by any parser.
    raw = [_strict_json(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [(r["train/loss"], r["train/loss/nonfinite"]) for r in raw if r["step"] == 4] == [
        (None, "nan")
    ]
    assert np.isfinite(records[6]["train/loss"])
    assert result.summary["nonfinite/skipped"] == 1
    assert np.isfinite(result.summary["eval/loss"])


def test_nonfinite_halt_policy_keeps_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    extra = "sft_stage.debug_nan_step = 5\nNONFINITE_POLICY = 'halt'\nCHECKPOINT_EVERY = 2\n"
    with pytest.raises(faults.NonFiniteError, match=r"non-finite loss and gradients at step 5"):
        run_tiny_sft(run_dir, 10, extra)
    assert not (run_dir / "summary.json").exists()
    ckpt = Checkpointer(run_dir / "checkpoints")
    assert ckpt.steps == [2, 4]  # nothing saved after the bad step
    ckpt.close()
    loaded = load_params(run_dir)
    assert loaded.step == 4
    assert all(np.isfinite(x).all() for x in _leaves(loaded.params))


def test_init_from_a_run(tmp_path):
    first = run_tiny_sft(tmp_path / "a", 4)
    extra = f"INIT_FROM = '{tmp_path / 'a'}'\nsft_stage.lr_scale = 0.0\n"
    second = run_tiny_sft(tmp_path / "b", 2, extra)
    assert isinstance(second.state, TrainState) and int(second.state.step) == 2
    for x, y in zip(
        _leaves(first.state.policy.params), _leaves(second.state.policy.params), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_iterator_without_state_dict_is_fast_forwarded(tmp_path):
    """A plain generator has no position to save: a resumed run skips what was consumed."""

    def data(batch_size, seed):
        base = synthetic_sft_data(batch_size=batch_size, seed=seed, seq_len=16, vocab_size=48)

        def gen():
            for i in itertools.count():
                yield synthetic_sft_batch(np.random.default_rng([seed, i]), batch_size, 16, 48)

        return StageData(gen(), base.eval, 48, 16, summary=base.summary)

    bind_tiny_sft(tmp_path / "full", 6)
    full = sft_stage(run_dir=str(tmp_path / "full"), data=data)
    bind_tiny_sft(tmp_path / "split", 4)
    sft_stage(run_dir=str(tmp_path / "split"), data=data)
    bind_tiny_sft(tmp_path / "split", 6)
    resumed = sft_stage(run_dir=str(tmp_path / "split"), data=data)
    for x, y in zip(
        _leaves(full.state.policy.params), _leaves(resumed.state.policy.params), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_second_run_on_a_locked_directory_refuses(tmp_path):
    run_dir = tmp_path / "run"
    with faults.RunLock(run_dir):
        with pytest.raises(faults.RunDirInUseError, match="is in use by pid"):
            run_tiny_sft(run_dir, 2)


@pytest.mark.parametrize("bad", [{"index": 10**9}, {"index": "7"}])
def test_untrustworthy_data_position_falls_back_to_the_older_checkpoint(tmp_path, bad):
    """A corrupted data-iterator position in the newest checkpoint (out of range, wrong type,
    not the position after its step, missing) is never trusted: that checkpoint is moved aside
    and the run resumes from the previous one, ending bitwise equal to an uninterrupted run."""
    full = run_tiny_sft(tmp_path / "full", 12)
    run = tmp_path / "split"
    run_tiny_sft(run, 8)  # checkpoints 4 and 8
    meta_file = run / "checkpoints/8/meta/metadata"
    meta = json.loads(meta_file.read_text())
    meta["data"] = bad
    meta_file.write_text(json.dumps(meta))
    resumed = run_tiny_sft(run, 12)
    assert resumed.step == 12
    assert [p.name.split("-")[0] for p in (run / "checkpoints.bad").iterdir()] == ["8"]
    for x, y in zip(
        _leaves(full.state.policy.params), _leaves(resumed.state.policy.params), strict=True
    ):
        np.testing.assert_array_equal(x, y)


def test_restart_without_a_checkpoint_logs_each_step_once(tmp_path):
    """A run killed before its first checkpoint left records behind; the restart starts over
    at step 0 and must not append a second record for the same steps."""
    run = tmp_path / "run"
    run.mkdir()
    stale = [{"step": s, "time": 0.0, "train/loss": 99.0} for s in (2, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    run_tiny_sft(run, 4, "CHECKPOINT_EVERY = 0\nEVAL_EVERY = 0\n")
    records = read_metrics(run, dedup=False)
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["train/loss"] != 99.0 for r in records)
