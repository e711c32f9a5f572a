"""Per-kernel time from a `jax.profiler` trace: where a decode step's time goes on the device.

Reads the Chrome-format `*.trace.json.gz` that `jax.profiler.trace` writes, keeps the events
on the device's stream lines (GPU kernels and memcpys, not the derived "XLA Ops"/"XLA Modules"
lines, which repeat them), and prints the kernels by total time, with counts and time per
step when the number of steps in the trace is given. Busy share = time covered by at least one
kernel ÷ the span from the first kernel to the last: a low share means the device waits between
kernels (launch-bound), a high one that the kernels themselves are slow.

Note: XLA records no command buffers (CUDA graphs) while profiling unless
`--xla_enable_command_buffers_during_profiling=true`, so a trace shows every kernel launched
on its own.

Usage:
  python benchmarks/trace_summary.py TRACE_DIR [--steps 255] [--top 25] [--host]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path


def find_trace(path: str) -> Path:
    """The trace file itself, or the newest `*.trace.json.gz` under a directory."""
    p = Path(path)
    if p.is_file():
        return p
    found = sorted(p.rglob("*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise SystemExit(f"no *.trace.json.gz under {path}")
    return found[-1]


def load_events(trace: Path, host: bool = False) -> list[dict]:
    """Complete ("X") events on the device stream lines (or on every host line with `host`)."""
    with gzip.open(trace, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]

    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if host:
        return [e for e in complete if procs.get(e.get("pid"), "").startswith("/host")]
    device = [e for e in complete if procs.get(e.get("pid"), "").startswith("/device")]
    lines = {(e["pid"], e.get("tid")): threads.get((e["pid"], e.get("tid")), "") for e in device}
    # Kernels sit on the "Stream #..." lines; without such names, drop only the derived lines.
    streams = {k for k, name in lines.items() if "stream" in name.lower()}
    if not streams:
        streams = {k for k, name in lines.items() if not name.lower().startswith(("xla", "steps"))}
    return [e for e in device if (e["pid"], e.get("tid")) in streams]


def summarize(events: list[dict], steps: int = 0, top: int = 25) -> dict:
    """Totals, busy share, and the `top` kernel names by total time."""
    if not events:
        return {"kernels": 0}
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        by_name[e["name"]].append(float(e["dur"]))
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    busy, cur_start, cur_end = 0.0, *spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = spans[-1][1] - spans[0][0]
    total = sum(sum(d) for d in by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    per = max(steps, 1)
    return {
        "kernels": len(events),
        "kernel_us": total,
        "span_us": span,
        "busy_share": busy / span if span else None,
        "steps": steps,
        "kernels_per_step": len(events) / per if steps else None,
        "kernel_us_per_step": total / per if steps else None,
        "top": [
            {
                "name": name,
                "count": len(d),
                "total_us": sum(d),
                "mean_us": sum(d) / len(d),
                "share": sum(d) / total,
            }
            for name, d in rows
        ],
    }


def format_summary(s: dict) -> str:
    if not s.get("kernels"):
        return "no device kernels in the trace"
    lines = [
        f"{s['kernels']} kernels, {s['kernel_us'] / 1e3:.2f} ms of kernel time over a "
        f"{s['span_us'] / 1e3:.2f} ms span (busy {s['busy_share']:.0%})"
    ]
    if s["steps"]:
        lines.append(
            f"per step ({s['steps']} steps): {s['kernels_per_step']:.1f} kernels, "
            f"{s['kernel_us_per_step']:.1f} us of kernel time"
        )
    lines.append(f"{'total us':>10} {'count':>7} {'mean us':>8} {'share':>6}  kernel")
    for r in s["top"]:
        lines.append(
            f"{r['total_us']:10.1f} {r['count']:7d} {r['mean_us']:8.2f} {r['share']:6.1%}  "
            f"{r['name'][:110]}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a trace directory (searched) or a *.trace.json.gz file")
    p.add_argument("--steps", type=int, default=0, help="decode steps in the traced call")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--host", action="store_true", help="host lines instead of device streams")
    args = p.parse_args(argv)
    trace = find_trace(args.trace)
    summary = summarize(load_events(trace, host=args.host), args.steps, args.top)
    print(trace)
    print(format_summary(summary))
    return summary


if __name__ == "__main__":
    main()
