"""The report's plots (PNG, matplotlib's Agg backend): learning curves from metrics.jsonl, the
frontier (gold reward against KL to the reference, coloured by algorithm, labelled by β) and
reward-model accuracy, each per configuration with 95% bootstrap intervals over seeds."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlhf_jax.sweep.spec import GIN_FILE_KEY

if TYPE_CHECKING:
    from rlhf_jax.sweep.report import ConfigStats, Run

# Bindings that name a run's algorithm after ALGORITHM and a point's own gin file (GIN_FILE:
# its stem); else config.gin's DPO_LOSS_TYPE or train.stage.
ALGORITHM_KEYS = ("ALGORITHM", "DPO_LOSS_TYPE", "LOSS_TYPE")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def slug(metric: str) -> str:
    """A file-name form of a metric key (`eval/loss` -> `eval_loss`)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", metric).strip("_")


def _read_curve(run: Run, metric: str) -> tuple[np.ndarray, np.ndarray]:
    from rlhf_jax.train.metrics import read_metrics

    steps, values = [], []
    for rec in read_metrics(run.run_dir):
        v = rec.get(metric)
        if _is_number(v):
            steps.append(rec["step"])
            values.append(v)
    return np.asarray(steps), np.asarray(values, np.float64)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_curves(configs: Sequence[ConfigStats], metric: str, path: Path) -> Path | None:
    """Learning curve of `metric` (from metrics.jsonl): each run thin, each configuration's
    mean over its runs thick; None when no run logged it."""
    plt, fig, ax = _figure()
    drawn = False
    for i, c in enumerate(configs):
        color = f"C{i % 10}"
        curves = [_read_curve(r, metric) for r in c.runs if r.status == "done"]
        curves = [cv for cv in curves if cv[0].size]
        for steps, values in curves:
            ax.plot(steps, values, color=color, alpha=0.3, lw=0.8)
        if curves:
            common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
            if common:
                mean = [np.mean([v[list(s).index(t)] for s, v in curves]) for t in common]
                ax.plot(common, mean, color=color, lw=2, label=c.label)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (thin: runs, thick: mean over seeds)")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _algorithm_and_beta(run: Run) -> tuple[str, str | None]:
    b = run.bindings
    algo = str(b["ALGORITHM"]) if "ALGORITHM" in b else None
    if algo is None and GIN_FILE_KEY in b:  # a point's own gin file names its algorithm
        algo = dict(run.config)[GIN_FILE_KEY]
    algo = algo or next((str(b[k]) for k in ALGORITHM_KEYS if k in b), None)
    beta = str(b["BETA"]) if "BETA" in b else None
    if algo is None or beta is None:
        try:
            text = (run.run_dir / "config.gin").read_text()
        except OSError:
            text = ""
        if algo is None:
            m = re.search(r"^DPO_LOSS_TYPE = '([^']+)'", text, re.M) or re.search(
                r"^train\.stage = @(\w+)", text, re.M
            )
            algo = m.group(1) if m else "run"
        if beta is None:
            m = re.search(r"^BETA = (\S+)", text, re.M)
            beta = m.group(1) if m else None
    return algo, beta


def plot_frontier(configs: Sequence[ConfigStats], x: str, y: str, path: Path) -> Path | None:
    """`y` (gold reward) against `x` (KL to the reference), one point per configuration with
    its bootstrap intervals, coloured by algorithm and labelled by β; None without data."""
    plt, fig, ax = _figure()
    styles: dict[str, tuple[str, str]] = {}  # algorithm -> (colour, marker): 10 colours per marker
    drawn = False
    for c in configs:
        (mx, lx, hx), (my, ly, hy) = c.stats.get(x), c.stats.get(y)
        if math.isnan(mx) or math.isnan(my):
            continue
        algo, beta = _algorithm_and_beta(c.runs[0])
        n = len(styles)
        color, marker = styles.setdefault(algo, (f"C{n % 10}", "os^Dv"[(n // 10) % 5]))
        first = algo not in ax.get_legend_handles_labels()[1]
        ax.errorbar(mx, my, xerr=[[mx - lx], [hx - mx]], yerr=[[my - ly], [hy - my]],
                    fmt=marker, color=color, capsize=3, label=algo if first else None)  # fmt: skip
        if beta is not None:
            ax.annotate(f"β={beta}", (mx, my), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)  # fmt: skip
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title("frontier: mean over seeds, 95% bootstrap intervals")
    ax.legend(title="algorithm", fontsize=7)
    return _save(plt, fig, path)


def plot_accuracy(configs: Sequence[ConfigStats], metric: str, path: Path) -> Path | None:
    """Reward-model accuracy per configuration (bars with 95% intervals); None without data."""
    rows = [(c.label, c.stats[metric]) for c in configs if not math.isnan(c.stats[metric][0])]
    if not rows:
        return None
    plt, fig, ax = _figure()
    means = [s[0] for _, s in rows]
    err = [[s[0] - s[1] for _, s in rows], [s[2] - s[0] for _, s in rows]]
    ax.bar(range(len(rows)), means, yerr=err, capsize=3, color="C0")
    ax.set_xticks(range(len(rows)), [lbl for lbl, _ in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title("reward-model accuracy (mean over seeds, 95% bootstrap)")
    return _save(plt, fig, path)
