"""The `rlhf-jax sweep` and `rlhf-jax report` commands (their flags and their entry points).

    rlhf-jax sweep SPEC.py --out_dir DIR [--launcher local|slurm] [--parallel N]
                   [--mode points|population]
    rlhf-jax sweep --gin_file F.gin --grid 'BETA=0.05,0.1' --grid 'SEED=0,1' --out_dir DIR
    rlhf-jax report DIR

`--gin.KEY=VALUE` flags given to `sweep` are bindings shared by every point. The exit code of
`sweep` is 0 when every point finished and `FAILED_POINTS_BASE + N` (101, 102, ..., capped at 255)
when N points failed, so that it never reads as 1 (a crash) or 2 (bad input, which exits before
anything is written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rlhf_jax.sweep.spec import (
    GinRef,
    Sweep,
    SweepError,
    grid_from_flags,
    load_spec,
    parse_grid_value,
)

FAILED_POINTS_BASE = 100  # exit code of a sweep with N failed points: 100 + N


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    """Adds the flags of `sweep` or `report` to their subparser."""
    if name == "sweep":
        p.add_argument("spec", nargs="?", help="a sweep spec file (Python, defines SWEEP)")
        p.add_argument("--out_dir", required=True, help="the sweep directory")
        p.add_argument(
            "--grid",
            action="append",
            default=[],
            metavar="KEY=V1,V2",
            help="one axis of a command-line grid (repeatable; the grid is their product)",
        )
        p.add_argument("--launcher", choices=("local", "slurm"), default="local")
        p.add_argument("--parallel", type=int, default=1, help="points running at once")
        p.add_argument(
            "--mode",
            default="points",
            help="points (default: each point its own run) or population (points that differ "
            "only in traced hyperparameters and seeds train as one vmapped program)",
        )
        p.add_argument("--cache_dir", default=None, help="shared JAX compilation cache")
        p.add_argument(
            "--slurm",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="submitit parameter, e.g. slurm_partition=gpu, timeout_min=120, nodes=2, "
            "gpus_per_node=8, cluster=local (repeatable)",
        )
    elif name == "report":
        p.add_argument("dir", help="a sweep directory (or a folder of run directories)")
        p.add_argument(
            "--metric",
            action="append",
            default=[],
            help="summary metric to tabulate and plot (repeatable; default: the eval metrics)",
        )
        p.add_argument(
            "--frontier",
            default=None,
            metavar="X_METRIC,Y_METRIC",
            help="the frontier plot's axes (default: KL to the reference, gold reward)",
        )
        p.add_argument(
            "--gold_prompts",
            default=None,
            help="first sample every finished run on these held-out prompts (JSONL) and score "
            "them with the gold judges (RUN_DIR/gold_eval.json; needs --reference)",
        )
        p.add_argument("--reference", default=None, help="the SFT run KL is measured to")
        p.add_argument("--gold_limit", type=int, default=512, help="prompts used")


def _key_values(items: Sequence[str], what: str, parse) -> dict:
    """`KEY=VALUE` strings as a dict of `parse(VALUE)`; `what` names the flag in errors."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SweepError(f"bad {what} {item!r}: expected KEY=VALUE")
        out[key.strip()] = parse(value.strip())
    return out


def _binding_dict(bindings: Sequence[str]) -> dict[str, GinRef]:
    return _key_values(bindings, "binding", GinRef)


def _parse_slurm(items: Sequence[str]) -> dict:
    return _key_values(items, "--slurm", parse_grid_value)


def build_sweep(args: argparse.Namespace, bindings: Sequence[str]) -> Sweep:
    """The sweep a `rlhf-jax sweep` command line describes.

    Raises:
      SweepError: both or neither of a spec and a grid, or a bad spec / grid.
    """
    shared = _binding_dict(bindings)
    if args.spec:
        if args.grid or args.gin_file:
            raise SweepError("give a spec file or --gin_file with --grid, not both")
        sweep = load_spec(args.spec)
        clash = sorted(set(shared) & set().union(*(set(p) for p in sweep.points)))
        if clash:
            raise SweepError(f"--gin.{clash[0]} is swept by the spec: it cannot also be fixed")
        sweep.bindings = {**sweep.bindings, **shared}
        return sweep
    if not args.gin_file:
        raise SweepError("give a sweep spec file, or --gin_file F.gin with --grid KEY=V1,V2")
    points = grid_from_flags(args.grid)
    from pathlib import Path

    return Sweep(
        gin_files=list(args.gin_file),
        points=points,
        bindings=shared,
        name=Path(args.out_dir).name,
    )


def run(args: argparse.Namespace, bindings: Sequence[str]) -> int:
    """Runs `sweep` or `report`; returns the exit code."""
    if args.command == "report":
        from rlhf_jax.sweep.report import write_report

        frontier = tuple(args.frontier.split(",")) if args.frontier else None
        if frontier is not None and len(frontier) != 2:
            raise SweepError("--frontier takes X_METRIC,Y_METRIC")
        if args.gold_prompts:
            if not args.reference:
                raise SweepError("--gold_prompts needs --reference SFT_RUN (KL is measured to it)")
            from rlhf_jax.sweep.report import evaluate_gold

            evaluate_gold(args.dir, args.gold_prompts, args.reference, limit=args.gold_limit)
        paths = write_report(args.dir, metrics=args.metric or None, frontier=frontier)
        print(f"report: {paths['md']}  {paths['html']}  {paths['csv']}")
        return 0
    from rlhf_jax.sweep.launch import run_sweep

    sweep = build_sweep(args, bindings)
    result = run_sweep(
        sweep,
        args.out_dir,
        launcher=args.launcher,
        parallel=args.parallel,
        cache_dir=args.cache_dir,
        slurm=_parse_slurm(args.slurm),
        stream=sys.stdout,
        mode=args.mode,
    )
    return min(FAILED_POINTS_BASE + result.failed, 255) if result.failed else 0
