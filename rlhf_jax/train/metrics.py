"""Metric writers and throughput accounting for the host loop.

Owns the run directory's `metrics.jsonl` (one JSON object per logged step:
`{"step": ..., "time": ..., "train/loss": ..., "eval/loss": ...}`), the TensorBoard event files
under `tb/` (the same scalars, via tensorboardX), the atomic `summary.json`, and the table of
peak bf16 FLOP/s per accelerator that turns tokens/s into model FLOPs utilisation (MFU).

Only process 0 writes; the other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import atomic

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip, matched by substring of `device.device_kind` (first match
# wins, so more specific names come first). Vendor datasheets, without sparsity.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("V100", 125e12),  # fp16 tensor cores (no bf16)
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("TPU v2", 45e12),
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return None


def to_python(value: Any) -> Any:
    """A JSON-friendly scalar (float/int/bool/str) from numpy or jax scalars."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    arr = np.asarray(value)
    if arr.ndim:
        raise ValueError(f"metrics must be scalars, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        return int(arr)
    if arr.dtype.kind == "b":
        return bool(arr)
    return float(arr)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Writes strict JSON to `path` through a temporary file and `os.replace` (never
    half-written; a non-finite number is written as null with the reason beside it)."""
    return atomic.write_json(path, obj)


def read_metrics(run_dir: str | os.PathLike, dedup: bool = True) -> list[dict[str, Any]]:
    """The records of `RUN_DIR/metrics.jsonl`; with `dedup`, the last record of each step wins
    (a resumed run re-logs the steps after its checkpoint). Torn last lines are skipped.

    The file is strict JSON (a non-finite value is null with `KEY/nonfinite` beside it); the
    records come back with the float values ("nan", "inf", "-inf") in place."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(atomic.restore_nonfinite(json.loads(line)))
            except json.JSONDecodeError:
                continue
    if not dedup:
        return records
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def _summary_writer(logdir: Path):
    """A tensorboardX `SummaryWriter`, imported without dragging in torch.

    tensorboardX imports torch when it is installed (only to recognise torch tensors), which
    costs seconds per process; we log Python floats, so torch is hidden during that import
    unless something already imported it.
    """
    import sys

    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(str(logdir))


class MetricsWriter:
    """Appends metrics to `RUN_DIR/metrics.jsonl` and `RUN_DIR/tb/` (process 0 only)."""

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._file = None
        if not self.enabled:
            return
        self.path = self.run_dir / "metrics.jsonl"
        # Opened at the first record, not here: a run refused while starting (e.g. no
        # checkpoint restores) leaves no new event file behind.
        self._tensorboard = tensorboard

    def truncate_after(self, step: int) -> None:
        """Drops records after `step` (and any torn line) before a resumed run appends.

        The steps after a checkpoint are re-run on resume; trimming keeps one record per step.
        """
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_metrics(self.run_dir, dedup=False) if r["step"] <= step]
        tmp = self.path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(atomic.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One record `{"step", "time", **metrics}` (scalars only) and the same TB scalars."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: to_python(v) for k, v in metrics.items()})
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
            if self._tensorboard:
                self._tb = _summary_writer(self.run_dir / "tb")
        self._file.write(atomic.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Throughput:
    """Tokens/s, steps/s and MFU over the interval since the last `report()`.

    MFU = achieved model FLOP/s / (peak FLOP/s per device × devices); it is omitted when the
    peak is unknown (CPU) or the caller gave no FLOP count.
    """

    def __init__(
        self,
        num_devices: int | None = None,
        peak_flops: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.clock = clock
        self.num_devices = num_devices or jax.device_count()
        self.peak = peak_flops if peak_flops is not None else peak_flops_per_device()
        self.reset()

    def reset(self) -> None:
        self.t0 = self.clock()
        self.tokens = 0.0
        self.flops = 0.0
        self.steps = 0

    def add(self, tokens: float, flops: float | None) -> None:
        self.tokens += tokens
        self.flops += flops or 0.0
        self.steps += 1

    def report(self) -> dict[str, float]:
        dt = max(self.clock() - self.t0, 1e-9)
        out = {
            "perf/tokens_per_s": self.tokens / dt,
            "perf/steps_per_s": self.steps / dt,
        }
        if self.peak and self.flops:
            out["perf/mfu"] = self.flops / dt / (self.peak * self.num_devices)
        self.reset()
        return out


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
