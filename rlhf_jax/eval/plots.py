"""Plots of policy evaluations: each gold score against the KL to the reference policy.

`plot_policies(results, path)` draws one panel per score (gold sentiment, offensiveness, ...)
with the KL estimate on the x axis and one point per policy (mean ± standard error both ways),
so a reader sees at a glance what a policy gained and what it cost in divergence.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

PANELS = (
    ("sentiment", "gold sentiment (higher is better)"),
    ("offensiveness", "offensiveness (lower is better)"),
)


def plot_policies(
    results: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    panels: Sequence[tuple[str, str]] = PANELS,
    title: str = "",
) -> Path:
    """Writes a PNG with one panel per score in `panels` that the results hold.

    Args:
      results: {policy name: {"kl", "kl/sem", score, score + "/sem", ...}} as
        `eval.policy.evaluate_policies` returns (a policy without "kl" is drawn at KL 0).
      path: the PNG to write.
      panels: (score key, axis label) pairs; keys absent from every policy are skipped.
      title: the figure title.

    Returns:
      The path written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    keys = [(k, label) for k, label in panels if any(k in r for r in results.values())]
    if not keys:
        raise ValueError(f"none of the scores {[k for k, _ in panels]} is in the results")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for i, (name, r) in enumerate(results.items()):
            if key not in r:
                continue
            ax.errorbar(
                r.get("kl", 0.0),
                r[key],
                xerr=r.get("kl/sem", 0.0),
                yerr=r.get(f"{key}/sem", 0.0),
                fmt="o",
                capsize=4,
                color=f"C{i}",
                label=name,
            )
            ax.annotate(name, (r.get("kl", 0.0), r[key]), textcoords="offset points", xytext=(6, 6))
        ax.margins(0.15)
        ax.set_xlabel("KL to the reference policy (nats per sequence)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")  # atomic: saved, then renamed
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
