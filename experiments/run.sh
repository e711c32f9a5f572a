#!/usr/bin/env bash
# One command per experiment: the quickstart's outputs it starts from (finished stages are
# skipped), the sweep (finished points are skipped, interrupted ones resume), then the report
# with the gold evaluation, from the repository root:
#
#   bash experiments/run.sh algorithm_frontier      # or beta_sweep, loss_zoo
#
# Outputs: runs/quickstart, runs/NAME (sweep.json, one run directory per point, report.md,
# report.html, results.csv, plots/). Exit code: the sweep's (0, or 100 + failed points) unless
# an earlier step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:?usage: bash experiments/run.sh EXPERIMENT (a folder of experiments/ with a sweep.py)}"
spec="experiments/${name}/sweep.py"
if [ ! -f "$spec" ]; then
  echo "no experiment '${name}': ${spec} does not exist" >&2
  exit 2
fi
rlhf-jax quickstart --out_dir runs/quickstart
rc=0
rlhf-jax sweep "$spec" --out_dir "runs/${name}" || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -lt 100 ]; then
  exit "$rc"  # a crash or bad input: nothing to report
fi
rlhf-jax report "runs/${name}" --gold_prompts runs/quickstart/task/eval_prompts.jsonl \
  --reference runs/quickstart/sft
exit "$rc"
