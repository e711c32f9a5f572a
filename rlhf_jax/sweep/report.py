"""Reports of a sweep: `rlhf-jax report DIR`.

Reads DIR/sweep.json (or, without one, every run directory under DIR) and each run's
summary.json and metrics.jsonl, and writes

- `results.csv`: one row per run: name, status, error, the bindings, every numeric final metric
  of its summary.json (exact values) and of its gold_eval.json when `evaluate_gold` wrote one
  (samples on held-out prompts scored by the gold judges, KL to the reference);
- `report.md` and a self-contained `report.html` (plots embedded as base64 PNG): per
  configuration (the bindings other than seeds), the mean over seeds with a 95% percentile
  bootstrap confidence interval of the mean, then the runs that failed or did not finish;
- `plots/*.png`: learning curves per metric (each run thin, the configuration's mean thick),
  the frontier (gold reward against KL to the reference, one point per configuration with its
  intervals, coloured by algorithm and labelled by β) and reward-model accuracy where runs have
  it.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.sweep.launch import write_json_strict
from rlhf_jax.sweep.plots import plot_accuracy, plot_curves, plot_frontier, slug
from rlhf_jax.sweep.spec import GIN_FILE_KEY, SweepError, gin_files_label, is_seed_key

# Default axes of the frontier plot: the first of each list that the runs report.
GOLD_METRICS = ("eval/gold/reward", "eval/gold_reward", "gold/reward", "eval/gold/sentiment",
                "eval/sentiment")  # fmt: skip
KL_METRICS = ("eval/kl/ref", "eval/kl", "kl/ref", "eval/kl/implicit", "train/kl/implicit")
RM_ACCURACY = "eval/accuracy"
# Written into each run by `evaluate_gold` (`rlhf-jax report --gold_prompts ...`).
GOLD_EVAL = "gold_eval.json"
# Tabulated by default when present (else every eval/ metric).
HEADLINE = (*GOLD_METRICS, "eval/kl/ref", "eval/kl", "eval/loss", "eval/accuracy",
            "eval/rewards/accuracies", "eval/rewards/margins", "eval/kl/implicit",
            "train/loss")  # fmt: skip


@dataclasses.dataclass
class Run:
    """One run of a sweep."""

    name: str
    run_dir: Path
    bindings: dict[str, Any]
    status: str
    error: str | None
    summary: dict[str, Any] | None

    @property
    def config(self) -> tuple[tuple[str, str], ...]:
        """The run's configuration: its bindings without the seeds (a point's own gin files by
        their stems, which the sweep keeps distinct)."""
        return tuple((k, gin_files_label(v) if k == GIN_FILE_KEY else _fmt(v))
                     for k, v in self.bindings.items() if not is_seed_key(k))  # fmt: skip

    def metric(self, key: str) -> float | None:
        v = (self.summary or {}).get(key)
        return float(v) if _is_number(v) else None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect_runs(sweep_dir: str | Path) -> list[Run]:
    """The runs of a sweep directory, in the sweep's order.

    Raises:
      SweepError: the folder has no sweep.json and no run directories.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise SweepError(f"{root} is not a directory")
    state = _read_json(root / "sweep.json")
    entries = []
    if state is not None:
        for p in state.get("points", []):
            entries.append((p["name"], root / p["run_dir"], p.get("bindings", {}),
                            p.get("status", "queued"), p.get("error")))  # fmt: skip
    else:
        for d in sorted(x for x in root.iterdir() if x.is_dir()):
            point = _read_json(d / "point.json") or {}
            if not point and not (d / "summary.json").exists() and not (d / "config.gin").exists():
                continue
            entries.append((d.name, d, point.get("bindings", {}), "unknown", None))
    if not entries:
        raise SweepError(f"{root} holds no sweep.json and no run directories")
    runs = []
    for name, run_dir, bindings, status, error in entries:
        summary = _read_json(run_dir / "summary.json")
        if summary is not None and summary.get("status", "done") == "done":
            status = "done"
        elif status in ("done", "unknown"):
            status = "unfinished"
        if status == "done":
            gold = _read_json(run_dir / GOLD_EVAL) or {}
            summary = {**summary, **{k: v for k, v in gold.items() if k not in summary}}
        runs.append(Run(name, run_dir, dict(bindings), status, error,
                        summary if status == "done" else None))  # fmt: skip
    return runs


def evaluate_gold(
    sweep_dir: str | Path,
    prompts: str | Path,
    reference: str | Path,
    *,
    limit: int | None = 512,
    max_new_tokens: int = 24,
    judge: str = "reviews",
) -> list[Path]:
    """Samples every finished run of a sweep on held-out prompts and scores the samples with
    the gold judges: RUN_DIR/gold_eval.json (`eval/gold/<judge field>`, `eval/kl/ref`,
    `eval/length`, each with `/sem`), which the report merges into the run's metrics. Runs that
    already have one are skipped.

    Args:
      sweep_dir: the sweep directory.
      prompts: a prompt file (JSONL with `prompt`, as the reviews task writes them).
      reference: the reference policy's run directory (KL is measured to it: the SFT run).
      limit: prompts used (the same first ones for every run).
      max_new_tokens, judge: as in `commands.evaluate_policies`.

    Returns:
      The gold_eval.json files written.
    """
    from rlhf_jax.commands import evaluate_policies
    from rlhf_jax.data.prompts import read_prompts

    todo = [r for r in collect_runs(sweep_dir)
            if r.status == "done" and not (r.run_dir / GOLD_EVAL).exists()]  # fmt: skip
    if not todo:
        return []
    from rlhf_jax.data.errors import DataError

    try:
        texts = read_prompts(str(prompts), None, limit=limit)
    except (DataError, FileNotFoundError) as e:
        raise SweepError(f"--gold_prompts: {e}") from None
    written = []
    for r in todo:
        res = evaluate_policies({r.name: str(r.run_dir)}, str(reference), texts,
                                max_new_tokens=max_new_tokens, judge=judge)[r.name]  # fmt: skip
        out = {}
        for k, v in res.items():
            base, _, sem = k.partition("/")
            name = {"kl": "eval/kl/ref", "length": "eval/length", "samples": "eval/samples"}.get(
                base, f"eval/gold/{base}"
            )
            out[name + ("/sem" if sem else "")] = v
        write_json_strict(r.run_dir / GOLD_EVAL, out)
        written.append(r.run_dir / GOLD_EVAL)
    return written


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile bootstrap confidence interval.

    With one value the interval is that value; with none, all three are nan. Seeded, so a report
    is reproducible.
    """
    x = np.asarray([v for v in values if v is not None], np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)


def numeric_metrics(runs: Sequence[Run]) -> list[str]:
    """Every numeric summary key of the finished runs, sorted."""
    keys = set()
    for r in runs:
        keys |= {k for k, v in (r.summary or {}).items() if _is_number(v)}
    return sorted(keys)


def default_metrics(runs: Sequence[Run]) -> list[str]:
    """The metrics tabulated when none are asked for."""
    present = numeric_metrics(runs)
    chosen = [m for m in HEADLINE if m in present]
    return chosen or [m for m in present if m.startswith("eval/")][:8] or present[:8]


def write_results_csv(runs: Sequence[Run], path: Path) -> Path:
    """One row per run: name, status, error, bindings, every numeric final metric."""
    binding_keys = list(dict.fromkeys(k for r in runs for k in r.bindings))
    metrics = numeric_metrics(runs)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "status", "error", *binding_keys, *metrics])
        for r in runs:
            row = [r.name, r.status, r.error or ""]
            row += [_fmt(r.bindings[k]) if k in r.bindings else "" for k in binding_keys]
            # repr keeps every digit: the table equals summary.json.
            row += [repr(v) if (v := r.metric(m)) is not None else "" for m in metrics]
            w.writerow(row)
    os.replace(tmp, path)
    return path


@dataclasses.dataclass
class ConfigStats:
    """A configuration's runs and, per metric, (mean, low, high) over its finished seeds."""

    config: tuple[tuple[str, str], ...]
    runs: list[Run]
    stats: dict[str, tuple[float, float, float]]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config) or "(base)"

    @property
    def n_done(self) -> int:
        return sum(r.status == "done" for r in self.runs)


def aggregate(runs: Sequence[Run], metrics: Sequence[str]) -> list[ConfigStats]:
    """Groups runs by configuration (bindings without seeds) and bootstraps each metric."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.config, []).append(r)
    out = []
    for config, members in groups.items():
        done = [r for r in members if r.status == "done"]
        stats = {m: bootstrap_ci([r.metric(m) for r in done if r.metric(m) is not None])
                 for m in metrics}  # fmt: skip
        out.append(ConfigStats(config, members, stats))
    return out


def _cell(stat: tuple[float, float, float]) -> str:
    mean, lo, hi = stat
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.4g} [{lo:.4g}, {hi:.4g}]"


# ----------------------------------------------------------------------------- the report


def _pick(present: Sequence[str], candidates: Sequence[str]) -> str | None:
    return next((m for m in candidates if m in present), None)


def write_report(
    sweep_dir: str | Path,
    metrics: Sequence[str] | None = None,
    frontier: tuple[str, str] | None = None,
) -> dict[str, Path]:
    """Writes results.csv, report.md, report.html and plots/ into the sweep directory.

    Args:
      sweep_dir: the sweep directory (or a folder of run directories).
      metrics: summary metrics to tabulate and draw curves of (default: `default_metrics`).
      frontier: (x, y) metrics of the frontier plot (default: KL to the reference and the gold
        reward, the first of `KL_METRICS` / `GOLD_METRICS` the runs report).

    Returns:
      Paths of what was written: "csv", "md", "html" and one per plot ("curve/<metric>",
      "frontier", "accuracy").

    Raises:
      SweepError: no runs, or a requested metric that no run reports.
    """
    root = Path(sweep_dir)
    runs = collect_runs(root)
    present = numeric_metrics(runs)
    metrics = list(metrics) if metrics else default_metrics(runs)
    missing = [m for m in metrics if m not in present and present]
    if missing:
        raise SweepError(f"no finished run reports {missing[0]} (they report {', '.join(present)})")
    if frontier is None:
        fx, fy = _pick(present, KL_METRICS), _pick(present, GOLD_METRICS)
        frontier = (fx, fy) if fx and fy else None
    extra = [m for m in (*(frontier or ()), RM_ACCURACY) if m in present and m not in metrics]
    configs = aggregate(runs, [*metrics, *extra])
    plots_dir = root / "plots"
    plots_dir.mkdir(exist_ok=True)
    paths: dict[str, Path] = {"csv": write_results_csv(runs, root / "results.csv")}
    notes = []
    for m in metrics:
        p = plot_curves(configs, m, plots_dir / f"curve_{slug(m)}.png")
        if p is not None:
            paths[f"curve/{m}"] = p
    if frontier is not None:
        p = plot_frontier(configs, frontier[0], frontier[1], plots_dir / "frontier.png")
        if p is not None:
            paths["frontier"] = p
            notes.append(
                f"Frontier: {frontier[1]} against {frontier[0]}, one point per configuration "
                "(mean over seeds with 95% bootstrap intervals), coloured by algorithm, "
                "labelled by β."
            )
    else:
        notes.append(
            "No frontier plot: the runs report no gold reward and KL metric "
            f"({' / '.join(GOLD_METRICS)} against {' / '.join(KL_METRICS)}); "
            "choose its axes with --frontier X,Y."
        )
    if RM_ACCURACY in present:
        p = plot_accuracy(configs, RM_ACCURACY, plots_dir / "rm_accuracy.png")
        if p is not None:
            paths["accuracy"] = p
    md, html_text = _render(root, runs, configs, metrics, paths, notes)
    for key, name, text in (("md", "report.md", md), ("html", "report.html", html_text)):
        out = root / name
        tmp = out.with_name(f".{name}.tmp.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, out)
        paths[key] = out
    return paths


def _render(
    root: Path,
    runs: Sequence[Run],
    configs: Sequence[ConfigStats],
    metrics: Sequence[str],
    paths: Mapping[str, Path],
    notes: Sequence[str],
) -> tuple[str, str]:
    counts = {s: sum(r.status == s for r in runs) for s in dict.fromkeys(r.status for r in runs)}
    title = f"Sweep report: {root.name}"
    intro = (
        f"{len(runs)} runs in {len(configs)} configurations ("
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + "). Cells: mean over the finished seeds [95% percentile bootstrap interval of the "
        "mean]; n = finished runs / runs."
    )
    header = ["configuration", "n", *metrics]
    rows = [[c.label, f"{c.n_done}/{len(c.runs)}", *(_cell(c.stats[m]) for m in metrics)]
            for c in configs]  # fmt: skip
    bad = [r for r in runs if r.status != "done"]
    plots = [(k, p) for k, p in paths.items() if k not in ("csv", "md", "html")]

    md = [f"# {title}", "", intro, "", "| " + " | ".join(header) + " |",
          "|" + "---|" * len(header)]  # fmt: skip
    md += ["| " + " | ".join(row) + " |" for row in rows]
    if bad:
        md += ["", "## Runs that did not finish", "", "| run | status | error |", "|---|---|---|"]
        md += [f"| {r.name} | {r.status} | {(r.error or '').replace('|', '/')} |" for r in bad]
    md += ["", *notes, "", "Per-run values: [results.csv](results.csv).", ""]
    md += [f"![{k}]({p.relative_to(root)})" for k, p in plots]

    e = html.escape
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
         "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
         "padding:3px 6px}.failed{color:#b00}</style></head><body>",
         f"<h1>{e(title)}</h1><p>{e(intro)}</p><table><tr>"]  # fmt: skip
    h += [f"<th>{e(x)}</th>" for x in header] + ["</tr>"]
    h += ["<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>" for row in rows]
    h += ["</table>"]
    if bad:
        h += ["<h2>Runs that did not finish</h2><table><tr><th>run</th><th>status</th>"
              "<th>error</th></tr>"]  # fmt: skip
        h += [f"<tr class='failed'><td>{e(r.name)}</td><td>{e(r.status)}</td>"
              f"<td>{e(r.error or '')}</td></tr>" for r in bad]  # fmt: skip
        h += ["</table>"]
    h += [f"<p>{e(n)}</p>" for n in notes]
    for k, p in plots:
        data = base64.b64encode(p.read_bytes()).decode()
        h += [f"<h3>{e(k)}</h3><img alt='{e(k)}' src='data:image/png;base64,{data}'>"]
    h += ["</body></html>"]
    return "\n".join(md) + "\n", "\n".join(h) + "\n"
