"""Metric writers, MFU accounting, atomic summaries, and the unigram baseline."""

import json
import math
import types

import numpy as np
import pytest

from rlhf_jax.train import metrics as M
from rlhf_jax.train.sft_data import unigram_baseline


def test_peak_flops_table():
    def dev(kind, platform="gpu"):
        return types.SimpleNamespace(device_kind=kind, platform=platform)

    assert M.peak_flops_per_device(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert M.peak_flops_per_device(dev("NVIDIA H100 PCIe")) == 756e12
    assert M.peak_flops_per_device(dev("NVIDIA H200")) == 989e12
    assert M.peak_flops_per_device(dev("NVIDIA A100-SXM4-40GB")) == 312e12
    assert M.peak_flops_per_device(dev("TPU v5 lite", "tpu")) == 197e12
    assert M.peak_flops_per_device(dev("TPU v4", "tpu")) == 275e12
    assert M.peak_flops_per_device(dev("cpu", "cpu")) is None
    assert M.peak_flops_per_device(dev("Some future GPU")) is None
    assert M.peak_flops_per_device() is None  # the test machine's CPU


def test_throughput_and_mfu():
    clock = iter([0.0, 2.0, 2.0])
    thr = M.Throughput(num_devices=2, peak_flops=1e12, clock=lambda: next(clock))
    thr.add(tokens=1000, flops=1e12)
    thr.add(tokens=1000, flops=1e12)
    out = thr.report()
    assert out["perf/tokens_per_s"] == 1000 and out["perf/steps_per_s"] == 1
    assert out["perf/mfu"] == pytest.approx(2e12 / 2.0 / 2e12)
    cpu = M.Throughput(num_devices=1, peak_flops=None)
    cpu.add(10, 1e9)
    assert "perf/mfu" not in cpu.report()


def test_writer_records_truncation_and_dedup(tmp_path):
    w = M.MetricsWriter(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        w.write(step, {"train/loss": np.float32(step), "train/tokens": np.int32(5)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/lo')  # a line torn by a crash
    assert [r["step"] for r in M.read_metrics(tmp_path)] == [1, 2, 3]
    r = M.read_metrics(tmp_path)[0]
    assert set(r) == {"step", "time", "train/loss", "train/tokens"}
    assert isinstance(r["train/tokens"], int)
    w = M.MetricsWriter(tmp_path, tensorboard=False)
    w.truncate_after(2)  # a resume from the checkpoint of step 2
    w.write(3, {"train/loss": 30.0})
    w.close()
    recs = M.read_metrics(tmp_path, dedup=False)
    assert [(r["step"], r["train/loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="scalars"):
        M.to_python(np.zeros(3))


def test_summary_is_written_atomically(tmp_path):
    path = tmp_path / "summary.json"
    M.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        M.write_json_atomic(path, {"a": object()})  # fails while writing the temporary file
    assert json.loads(path.read_text()) == {"a": 1}  # never half-written


def test_unigram_baseline_closed_form():
    def batch(ids, loss, valid=None):
        b = {"input_ids": np.array(ids), "loss_mask": np.array(loss)}
        if valid is not None:
            b["valid"] = np.array(valid)
        return b

    train = [batch([[0, 1, 1, 2]], [[0, 1, 1, 1]])]  # targets: 1, 1, 2
    evals = [batch([[0, 2, 3, 3], [0, 1, 1, 1]], [[0, 1, 0, 1], [1, 1, 1, 1]], valid=[1, 0])]
    out = unigram_baseline(train, evals, vocab_size=4)
    p = np.array([1, 3, 2, 1]) / 7.0  # add-one counts over 4 ids
    assert out["baseline/unigram_eval_loss"] == pytest.approx(
        -(math.log(p[2]) + math.log(p[3])) / 2
    )
    assert out["baseline/unigram_train_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))
