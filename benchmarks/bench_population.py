"""Populations vs sequential runs (issue 15): the wall clock of N DPO runs of the tiny experiment
(gin/experiments/dpo_reviews_tiny.gin, 2 β-like values per seed) trained as separate runs one
after another (`rlhf-jax sweep`, the points mode) against the same N runs as one population
(`rlhf-jax sweep --mode population`), in ONE invocation on the same machine, same steps on both
sides. Each side is a fresh sweep directory with its own compilation cache, so both pay their
compiles as a user's first sweep would (the points mode then compiles once for all points).

    python benchmarks/bench_population.py --train_steps 40 \\
        --quickstart /work/main/runs/quickstart --out_dir /work/main/runs/bench_population

Needs the quickstart's outputs (sft, preferences, ref_cache: `rlhf-jax quickstart`), read only:
the reference cache is copied into OUT_DIR. Prints a Markdown table and writes OUT_DIR/bench.json.
Also reported: the training throughput inside each loop (perf/steps_per_s of the last logged
interval, times N for the population), which leaves out process start, data loading and compile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _points(n: int) -> list[dict]:
    betas = [0.03, 0.1, 0.3, 1.0, 0.05, 0.2, 0.5, 2.0]
    seeds = 2 if n % 2 == 0 else 1
    per_seed = n // seeds
    if per_seed > len(betas):
        raise SystemExit(f"--members up to {2 * len(betas)}")
    return [{"BETA": b, "SEED": s} for b in betas[:per_seed] for s in range(seeds)]


def _steps_per_s(run_dir: Path) -> float | None:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/steps_per_s"] for r in rows if "perf/steps_per_s" in r]
    return rates[-1] if rates else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quickstart", default="runs/quickstart")
    p.add_argument("--out_dir", default="runs/bench_population")
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--train_steps", type=int, default=40)
    p.add_argument("--order", choices=("sequential-first", "population-first"),
                   default="sequential-first")  # fmt: skip
    args = p.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x
    )
    import jax

    from rlhf_jax.sweep.launch import run_sweep
    from rlhf_jax.sweep.spec import Sweep

    qs, out = Path(args.quickstart).absolute(), Path(args.out_dir).absolute()
    for sub in ("sequential", "population", "ref_cache"):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(qs / "ref_cache", out / "ref_cache")
    bindings = {
        "SFT_RUN": str(qs / "sft"),
        "PREFERENCES": str(qs / "preferences"),
        "REF_CACHE_DIR": str(out / "ref_cache"),
        "TRAIN_STEPS": args.train_steps,
        "LoopConfig.progress_bar": False,
        "LoopConfig.tensorboard": False,
    }
    points = _points(args.members)
    spec = Sweep(["gin/experiments/dpo_reviews_tiny.gin"], points, bindings, name="bench")
    os.chdir(REPO)
    sides = ["sequential", "population"]
    if args.order == "population-first":
        sides.reverse()
    load_before = os.getloadavg()
    walls, rates = {}, {}
    for side in sides:
        mode = "population" if side == "population" else "points"
        t0 = time.perf_counter()
        result = run_sweep(spec, out / side, mode=mode, stream=sys.stdout, poll_s=0.2)
        walls[side] = time.perf_counter() - t0
        if result.failed:
            raise SystemExit(f"{side}: {result.failed} point(s) failed; see {out / side}")
        state = json.loads((out / side / "sweep.json").read_text())
        rates[side] = [_steps_per_s(out / side / q["run_dir"]) for q in state["points"]]
    load_after = os.getloadavg()
    seq_rate = statistics.median(r for r in rates["sequential"] if r)
    pop_rate = statistics.median(r for r in rates["population"] if r)
    n = len(points)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "load_before": load_before,
        "load_after": load_after,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "members": n,
        "train_steps": args.train_steps,
        "order": args.order,
        "wall_s": walls,
        "ratio": walls["sequential"] / walls["population"],
        "loop_run_steps_per_s": {"sequential": seq_rate, "population": pop_rate * n},
        "loop_ratio": pop_rate * n / seq_rate,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print()
    print(f"| {n} DPO runs × {args.train_steps} steps | wall (s) | run-steps/s in the loop |")
    print("|---|---:|---:|")
    print(f"| sequential runs (`rlhf-jax sweep`) | {walls['sequential']:.0f} | {seq_rate:.2f} |")
    print(f"| one population (`--mode population`) | {walls['population']:.0f} | "
          f"{pop_rate * n:.2f} |")  # fmt: skip
    print(f"| **ratio** | **{report['ratio']:.2f}×** | {report['loop_ratio']:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
