"""The benchmark helpers that read compiled HLO and profiler traces (benchmarks/)."""
# ruff: noqa: E501

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import hlo_kernels  # noqa: E402
import trace_summary  # noqa: E402

HLO = """HloModule m, entry_computation_layout={()->f32[4]}

%fused_add (p0: f32[4], p1: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  ROOT %add.1 = f32[4]{0} add(f32[4]{0} %p0, f32[4]{0} %p1)
}

%branch_run (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %x = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %t), index=1
  %c = f32[4]{0} copy(f32[4]{0} %x)
  ROOT %r = (s32[], f32[4]{0}) tuple(s32[] %i, f32[4]{0} %c)
}

%body (t: (s32[], f32[4])) -> (s32[], f32[4]) {
  %t = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[4]{0}) %t), index=0
  %x = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %t), index=1
  %gemm = (f32[4]{0}, s8[0]{0}) custom-call(f32[4]{0} %x), custom_call_target="__cublas$gemm"
  %f = f32[4]{0} fusion(f32[4]{0} %x, f32[4]{0} %x), kind=kLoop, calls=%fused_add
  %f2 = f32[4]{0} fusion(f32[4]{0} %f, f32[4]{0} %x), kind=kLoop, calls=%fused_add
  %p = pred[] constant(true)
  %cd = (s32[], f32[4]{0}) conditional(pred[] %p, (s32[], f32[4]{0}) %t, (s32[], f32[4]{0}) %t), true_computation=%branch_run, false_computation=%branch_run
  ROOT %out = (s32[], f32[4]{0}) tuple(s32[] %i, f32[4]{0} %f2)
}

%cond (t: (s32[], f32[4])) -> pred[] {
  %t = (s32[], f32[4]{0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main () -> f32[4] {
  %init = (s32[], f32[4]{0}) constant(...)
  %while.7 = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init), condition=%cond, body=%body
  ROOT %res = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %while.7), index=1
}
"""


def test_loop_kernel_counts_reads_a_while_body():
    (loop,) = hlo_kernels.loop_kernel_counts(HLO)
    assert loop["while"] == "while.7" and loop["body"] == "body"
    # 2 fusions + 1 cuBLAS call + the copy in the conditional (one branch runs per iteration).
    assert loop["by_op"] == {"fusion": 2, "custom-call:__cublas$gemm": 1, "copy": 1}
    assert loop["kernels"] == 4


NESTED = """HloModule n

%gemm_comp (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %g = f32[4]{0} custom-call(f32[4]{0} %x), custom_call_target="__cublas$gemm"
}

%inner_body (t: f32[4]) -> f32[4] {
  %t = f32[4]{0} parameter(0)
  ROOT %c = f32[4]{0} copy(f32[4]{0} %t)
}

%inner_cond (t: f32[4]) -> pred[] {
  %t = f32[4]{0} parameter(0)
  ROOT %p = pred[] constant(true)
}

%outer_body (t: f32[4]) -> f32[4] {
  %t = f32[4]{0} parameter(0)
  %s = ((f32[4]{0}), f32[4]{0}) async-start(f32[4]{0} %t), calls=%gemm_comp
  %d = f32[4]{0} async-done(((f32[4]{0}), f32[4]{0}) %s), calls=%gemm_comp
  %cs = (f32[4]{0}, f32[4]{0}, u32[]) copy-start(f32[4]{0} %d)
  %cd = f32[4]{0} copy-done((f32[4]{0}, f32[4]{0}, u32[]) %cs)
  %w = f32[4]{0} while(f32[4]{0} %cd), condition=%inner_cond, body=%inner_body
  ROOT %f = f32[4]{0} fusion(f32[4]{0} %w), kind=kLoop, calls=%inner_body
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  ROOT %outer = f32[4]{0} while(f32[4]{0} %a), condition=%inner_cond, body=%outer_body
}
"""


def test_async_work_counts_once_and_nested_loops_are_listed_not_added():
    loops = {loop["while"]: loop for loop in hlo_kernels.loop_kernel_counts(NESTED)}
    outer = loops["outer"]
    assert outer["by_op"] == {"custom-call:__cublas$gemm": 1, "fusion": 1, "copy-start": 1}
    assert outer["kernels"] == 3 and outer["nested"] == [1]
    assert loops["w"]["kernels"] == 1 and loops["w"]["nested"] == []


def _trace(tmp_path, events) -> Path:
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
    ]
    path = tmp_path / "x.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)
    return path


def test_trace_summary_counts_stream_kernels_only(tmp_path):
    def ev(name, ts, dur, tid=7, pid=1):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}

    events = [
        ev("gemm", 0, 4),
        ev("fusion", 6, 2),  # gap 4..6
        ev("gemm", 8, 4),
        ev("fusion.op", 0, 12, tid=8),  # the derived "XLA Ops" line repeats the kernels
        ev("host work", 0, 100, tid=1, pid=2),
    ]
    path = _trace(tmp_path, events)
    s = trace_summary.summarize(trace_summary.load_events(path), steps=2)
    assert s["kernels"] == 3 and s["kernel_us"] == 10
    assert s["span_us"] == 12 and s["busy_share"] == pytest.approx(10 / 12)
    assert s["kernels_per_step"] == 1.5 and s["kernel_us_per_step"] == 5
    assert [r["name"] for r in s["top"]] == ["gemm", "fusion"]
    assert s["top"][0]["count"] == 2 and s["top"][0]["share"] == pytest.approx(0.8)
    assert trace_summary.find_trace(str(tmp_path)) == path
