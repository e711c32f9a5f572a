"""The `rlhf-jax` command line: train | info | generate | make-preferences | quickstart | export |
sweep | report.

Every command takes `--gin_file` (repeatable; later files win), `--gin.KEY=VALUE` and
`--gin_bindings KEY=VALUE` (bindings win over files), and the multi-host flags. User errors in
the configuration exit with code 2 and one message, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import gin

from rlhf_jax import settings
from rlhf_jax.errors import UserError

log = logging.getLogger("rlhf_jax")

COMMANDS = {
    "train": "run the stage the gin files configure (`train.stage`), e.g. SFT, reward model, DPO",
    "info": "build the configured model on the configured mesh; print parameter count, FLOPs "
    "per token and parameter shardings",
    "generate": "sample completions for prompts from a policy checkpoint (JSONL out)",
    "make-preferences": "sample K completions per prompt, score them with the gold judge and "
    "label preference pairs",
    "quickstart": "SFT, preferences, reward model, DPO, PPO and RLOO on the built-in reviews "
    "task, on CPU",
    "export": "write a run's model (policy or reward model) as a Hugging Face directory: "
    "rlhf-jax export RUN_DIR OUT_DIR",
    "sweep": "run a grid of `train` runs (a spec file, or --gin_file with --grid KEY=V1,V2)",
    "report": "results.csv, report.md and report.html (CIs over seeds, plots) of a sweep",
}

EPILOG = """\
gin:
  --gin_file FILE          a gin file (repeatable; later files override earlier ones)
  --gin.KEY=VALUE          one binding, e.g. --gin.RUN_DIR="'runs/sft'" or --gin.TRAIN_STEPS=200
  --gin_bindings KEY=VALUE same as --gin.KEY=VALUE (repeatable)
  Conventional macros: RUN_DIR, TRAIN_STEPS, SEED, BATCH_SIZE. A string value may be given
  bare (--gin.RUN_DIR=runs/x): values that are not valid gin literals are quoted for you.

multi-host (or set RLHF_JAX_COORDINATOR / RLHF_JAX_NUM_PROCESSES / RLHF_JAX_PROCESS_ID):
  --coordinator_address HOST:PORT  --num_processes N  --process_id I
"""


def _quote_if_needed(binding: str) -> str:
    """`KEY=runs/x` -> `KEY='runs/x'` when the value is not a gin literal or reference."""
    key, _, value = binding.partition("=")
    v = value.strip()
    if not v:
        return binding
    looks_gin = v[0] in "'\"([{%@-0123456789." or v in ("True", "False", "None")
    if looks_gin:
        return binding
    return f"{key}={v!r}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-jax",
        description="rlhf_jax: RLHF in JAX. SFT, reward models, DPO family, generation; every "
        "stage configured with gin.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {k:<18}{v}" for k, v in COMMANDS.items())
        + "\n\nRun `rlhf-jax COMMAND --help` for a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--gin_file",
            action="append",
            default=[],
            metavar="FILE",
            help="gin file (repeatable; later files win)",
        )
        p.add_argument(
            "--gin_bindings",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="gin binding (repeatable; wins over files)",
        )
        p.add_argument("--coordinator_address", default=None, help="multi-host coordinator")
        p.add_argument("--num_processes", type=int, default=None, help="multi-host: processes")
        p.add_argument("--process_id", type=int, default=None, help="multi-host: this process")
        p.add_argument("--log_level", default="INFO", help="python logging level")
        if name == "quickstart":
            p.add_argument(
                "--out_dir",
                default="runs/quickstart",
                help="where the quickstart writes its run directories",
            )
            p.add_argument(
                "--fast", action="store_true", help="a much smaller run (for smoke tests)"
            )
        if name == "export":
            p.add_argument("run_dir", help="run directory (or checkpoints/ or a step folder)")
            p.add_argument("out_dir", help="the Hugging Face directory to write")
            p.add_argument("--step", type=int, default=None, help="checkpoint step (newest)")
            p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
            p.add_argument("--peft", action="store_true", help="LoRA run: adapters in PEFT format")
        if name in ("sweep", "report"):
            from rlhf_jax.sweep import commands as sweep_commands

            sweep_commands.add_arguments(p, name)
    return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits `--gin.KEY=VALUE` flags out before argparse sees the rest."""
    gin_flags, rest = [], []
    it = iter(argv)
    for a in it:
        if a.startswith("--gin."):
            body = a[len("--gin.") :]
            if "=" not in body:  # --gin.KEY VALUE
                body = f"{body}={next(it, '')}"
            gin_flags.append(body)
        else:
            rest.append(a)
    args = build_parser().parse_args(rest)
    bindings = [_quote_if_needed(b) for b in (*getattr(args, "gin_bindings", []), *gin_flags)]
    return args, bindings


def _strip_gin_context(msg: str) -> str:
    """Drops the `In call to configurable ...` lines gin appends to exceptions."""
    return "\n".join(
        line for line in msg.splitlines() if not line.strip().startswith("In call to configurable")
    )


def _one_message(e: BaseException) -> str:
    """The user error's message without gin's context lines (and never empty)."""
    msg = _strip_gin_context(str(e)).strip()
    return msg or type(e).__name__


def _is_gin_call_error(e: BaseException) -> bool:
    msg = str(e)
    return "Required bindings for" in msg or "No values supplied by Gin" in msg


def run_command(args: argparse.Namespace, bindings: list[str]) -> int:
    from rlhf_jax import partitioning

    if args.command in ("sweep", "report"):  # they launch or read runs; no gin of their own
        from rlhf_jax.sweep import commands as sweep_commands

        return sweep_commands.run(args, bindings)
    gin.clear_config()  # in-process calls (tests, quickstart) start from a clean registry
    coordinator, num_processes, process_id = settings.distributed(
        args.coordinator_address, args.num_processes, args.process_id
    )
    partitioning.initialize_distributed(coordinator, num_processes, process_id)
    # generate / make-preferences start from their base file (which declares CHECKPOINT etc.),
    # so they work with bindings alone.
    base = {
        "generate": "gin/base/generate.gin",
        "make-preferences": "gin/base/make_preferences.gin",
    }.get(args.command)
    gin_files = ([base] if base and base not in args.gin_file else []) + list(args.gin_file)
    from rlhf_jax import commands, registry

    commands.parse_gin(gin_files, bindings)
    if args.command == "train":
        registry.train_command()
    elif args.command == "info":
        registry.info()
    elif args.command == "generate":
        registry.generate_command()
    elif args.command == "make-preferences":
        registry.make_preferences_command()
    elif args.command == "quickstart":
        registry.quickstart(out_dir=args.out_dir, fast=args.fast)
    elif args.command == "export":
        registry.export_command(
            args.run_dir, args.out_dir, step=args.step, overwrite=args.overwrite, peft=args.peft
        )
    return 0


def _quiet_closed_event_loops(unraisable) -> None:
    """Drops the "Event loop is closed" errors that orbax's background threads leave behind
    when a failed restore shuts them down early (noise after the real message); everything
    else goes to Python's default hook."""
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.unraisablehook = _quiet_closed_event_loops
    args, bindings = parse_args(argv)
    if not args.command:
        print(
            f"rlhf-jax: error: no command given; choose one of {', '.join(COMMANDS)} "
            "(rlhf-jax --help lists them)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("jax").setLevel(logging.WARNING)
    # orbax logs through absl at WARNING for routine read-only restores.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return run_command(args, bindings)
    except UserError as e:
        print(f"rlhf-jax: error: {_one_message(e)}", file=sys.stderr)
        return 2
    except (RuntimeError, TypeError, ValueError) as e:
        if _is_gin_call_error(e):
            first = str(e).strip().split("\n")
            print(
                f"rlhf-jax: configuration error: {' / '.join(s.strip() for s in first[:3])}",
                file=sys.stderr,
            )
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
