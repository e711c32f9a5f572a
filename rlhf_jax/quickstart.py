"""`rlhf-jax quickstart`: the RLHF pipeline on the built-in reviews task, on CPU.

SFT → make-preferences → reward model → DPO → PPO → RLOO, each stage run from its own gin
experiment file (exactly what a researcher would run by hand; PPO and RLOO train online against
the reward model of the third stage, PPO with a critic initialised from it), then an evaluation
of the SFT, DPO, PPO and RLOO policies on held-out prompts: mean gold sentiment, offensiveness,
sequence KL to the SFT policy and completion length, printed as a table and written to
OUT_DIR/report.md and report.json. Each policy's samples go to its run directory as
samples.jsonl.

Re-running the command continues where it stopped: a finished stage (its summary.json exists)
is skipped, an interrupted one resumes from its last checkpoint. SIGTERM or SIGINT stops the
stage at its next step boundary with a checkpoint, and the quickstart then exits with status
143 without running the later stages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import gin

from rlhf_jax import atomic, settings
from rlhf_jax.errors import SettingsError

log = logging.getLogger(__name__)

# The exit status of a quickstart stopped by SIGTERM/SIGINT (128 + SIGTERM, as a shell reports
# a process killed by it): neither success nor a user error.
INTERRUPTED_EXIT_CODE = 143

# Stage sizes: (full, --fast). On a quiet 2-core CPU the whole quickstart took 297 s (SFT 86 s,
# DPO 83 s, PPO 36 s, RLOO 44 s, the rest 47 s; 2026-12-04, cold compilation cache); at load
# average 9 (the machine shared) 885 s. --fast took 4-5 minutes at that load (a smoke test: its
# reward model, DPO and RL barely train; mostly compilation).
SIZES = {
    "num_texts": (40_000, 4_000),
    "sft_steps": (1200, 60),
    "pref_prompts": (2048, 128),
    "rm_steps": (300, 20),
    "dpo_steps": (300, 20),
    "ppo_steps": (200, 4),  # RL iterations (rollout + update each)
    "rloo_steps": (200, 4),
    "eval_prompts": (512, 64),
}

# The online-RL stages: (policy name in the table, run directory, gin experiment file).
RL_STAGES = (
    ("PPO", "ppo", "gin/experiments/ppo_reviews_tiny.gin"),
    ("RLOO", "rloo", "gin/experiments/rloo_reviews_tiny.gin"),
)


def _size(name: str, fast: bool) -> int:
    return SIZES[name][1 if fast else 0]


def run_stage(
    title: str,
    gin_files: Sequence[str],
    bindings: Sequence[str],
    run_dir: Path,
    command: str = "train",
) -> float:
    """Runs one CLI stage in-process (fresh gin config); skips it if already finished."""
    from rlhf_jax.commands import make_preferences_command, parse_gin, train_command

    done = (
        (run_dir / "summary.json").exists()
        if command == "train"
        else (run_dir / "train.parquet").exists()
    )
    if done:
        print(f"== {title}: already done ({run_dir}), skipping", flush=True)
        return 0.0
    print(f"== {title} -> {run_dir}", flush=True)
    t0 = time.time()
    gin.clear_config()
    parse_gin(list(gin_files), list(bindings))
    if command == "train":
        result = train_command()
    else:
        result = make_preferences_command()
    gin.clear_config()
    if command == "train" and getattr(result, "status", "done") != "done":
        # SIGTERM/SIGINT: the stage saved a checkpoint and stopped early. The later stages must
        # not run on a half-trained model (their results would be silently wrong).
        print(
            f"== {title}: interrupted at step {result.step} (checkpoint saved); rerun the same "
            "command to resume",
            flush=True,
        )
        raise SystemExit(INTERRUPTED_EXIT_CODE)
    dt = time.time() - t0
    print(f"   {title} took {dt:.0f} s", flush=True)
    return dt


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table of the evaluation (mean ± standard error)."""
    cols = [
        ("sentiment", "gold sentiment ↑"),
        ("offensiveness", "offensiveness ↓"),
        ("kl", "KL to SFT (nats)"),
        ("length", "length (tokens)"),
    ]
    lines = ["| policy | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in results.items():
        cells = [f"{r[k]:.3f} ± {r[k + '/sem']:.3f}" if k in r else "n/a" for k, _ in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quickstart(out_dir: str = "runs/quickstart", fast: bool = False) -> dict:
    """Runs the whole pipeline (offline and online stages); returns the report.

    Args:
      out_dir: the output folder (one run directory per stage, the report).
      fast: the smoke-test sizes (`SIZES`).

    Returns:
      The report: `results` ({policy: evaluation}), `reward_model` and `preferences`
      (summaries), `timings_s` (per stage), `total_s`, `fast`.
    """
    from rlhf_jax.commands import evaluate_policies
    from rlhf_jax.data.prompts import read_prompts
    from rlhf_jax.data.tasks.reviews import build_reviews_task
    from rlhf_jax.eval.plots import plot_policies

    out = settings.writable_dir("--out_dir", out_dir)
    for marker in ("model.json", *settings.FOREIGN_MARKERS):
        if marker != "report.json" and (out / marker).exists():  # report.json: an earlier run
            raise SettingsError(
                f"--out_dir {out} holds {marker}: it is a run, data or model folder, not a "
                "quickstart output folder; choose a new one"
            )
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print(f"== reviews task -> {out / 'task'}", flush=True)
    task = build_reviews_task(out / "task", num_texts=_size("num_texts", fast))
    sft, prefs, rm, dpo = out / "sft", out / "preferences", out / "reward", out / "dpo"
    timings = {}
    timings["sft"] = run_stage(
        "[1/7] SFT",
        ["gin/experiments/sft_reviews_tiny.gin"],
        [
            f"RUN_DIR='{sft}'",
            f"REVIEWS_DIR='{out / 'task'}'",
            f"REVIEWS_NUM_TEXTS={_size('num_texts', fast)}",
            f"TRAIN_STEPS={_size('sft_steps', fast)}",
        ],
        sft,
    )
    timings["preferences"] = run_stage(
        "[2/7] make-preferences",
        ["gin/base/make_preferences.gin"],
        [
            f"CHECKPOINT='{sft}'",
            f"PROMPTS='{task.prompts_path}'",
            f"PREFERENCES='{prefs}'",
            f"make_preferences_command.limit={_size('pref_prompts', fast)}",
        ],
        prefs,
        command="make-preferences",
    )
    timings["reward"] = run_stage(
        "[3/7] reward model",
        ["gin/experiments/reward_reviews_tiny.gin"],
        [
            f"RUN_DIR='{rm}'",
            f"PREFERENCES='{prefs}'",
            f"SFT_RUN='{sft}'",
            f"TRAIN_STEPS={_size('rm_steps', fast)}",
        ],
        rm,
    )
    timings["dpo"] = run_stage(
        "[4/7] DPO",
        ["gin/experiments/dpo_reviews_tiny.gin"],
        [
            f"RUN_DIR='{dpo}'",
            f"PREFERENCES='{prefs}'",
            f"SFT_RUN='{sft}'",
            f"REF_CACHE_DIR='{out / 'ref_cache'}'",
            f"TRAIN_STEPS={_size('dpo_steps', fast)}",
        ],
        dpo,
    )
    policies = {"SFT": str(sft), "DPO": str(dpo)}
    for i, (name, sub, gin_file) in enumerate(RL_STAGES):
        run_dir = out / sub
        timings[sub] = run_stage(
            f"[{5 + i}/7] {name}",
            [gin_file],
            [
                f"RUN_DIR='{run_dir}'",
                f"SFT_RUN='{sft}'",
                f"REWARD_RUN='{rm}'",
                f"REVIEWS_DIR='{out / 'task'}'",
                f"REVIEWS_NUM_TEXTS={_size('num_texts', fast)}",
                f"TRAIN_STEPS={_size(sub + '_steps', fast)}",
                # No in-stage sampling eval: the evaluation below scores every policy alike.
                "rl_stage.eval_hook=None",
            ],
            run_dir,
        )
        policies[name] = str(run_dir)
    print("== [7/7] evaluation on held-out prompts", flush=True)
    t0 = time.time()
    prompts = read_prompts(task.eval_prompts_path, "train", limit=_size("eval_prompts", fast))
    results = evaluate_policies(policies, reference=str(sft), prompts=prompts)
    timings["eval"] = time.time() - t0
    rm_summary = json.loads((rm / "summary.json").read_text())
    pref_meta = json.loads((prefs / "preferences.json").read_text())
    table = format_table(results)
    report = {
        "results": results,
        "reward_model": rm_summary,
        "preferences": pref_meta,
        "timings_s": timings,
        "total_s": time.time() - t_start,
        "fast": fast,
    }
    atomic.write_json(out / "report.json", report, sort_keys=False)
    plot = plot_policies(
        results, out / "report.png", title=f"reviews task, {len(prompts)} held-out prompts"
    )
    atomic.write_text(
        out / "report.md",
        f"# rlhf-jax quickstart\n\n{len(prompts)} held-out prompts, samples at temperature 1; "
        "KL is the k1 estimate of KL(policy ‖ SFT) per sequence.\n\n" + table + "\n\n"
        f"![gold scores against KL to SFT]({plot.name})\n",
    )
    print("\n" + table + "\n")
    samples = ", ".join(str(Path(d) / "samples.jsonl") for d in policies.values())
    print(
        f"report: {out / 'report.md'} (plot {plot})  samples: {samples}  "
        f"total {report['total_s']:.0f} s"
    )
    return report
