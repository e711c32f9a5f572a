"""`rlhf-jax report` on the tiny real sweep: results.csv equals the runs' summary.json values,
the failed point is listed as failed, the per-configuration means and bootstrap intervals come
from the seeds' values, and the plots are non-empty PNG images (embedded in report.html)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from conftest import BAD, GOOD

from rlhf_jax import cli
from rlhf_jax.sweep import report
from rlhf_jax.sweep.spec import point_name

PNG = b"\x89PNG\r\n\x1a\n"
FRONTIER = ("eval/kl/implicit", "eval/rewards/margins")  # axes chosen on the command line


@pytest.fixture(scope="module")
def written(tiny_sweep, reviews, sft_run, tmp_path_factory):
    """The report of a copy of the tiny sweep, after a gold evaluation of its finished runs on
    16 held-out prompts (so the frontier has its default axes: gold sentiment against KL)."""
    import shutil

    out = tmp_path_factory.mktemp("report") / "sweep"
    shutil.copytree(tiny_sweep[0], out, ignore=shutil.ignore_patterns("jax_cache"))
    gold = report.evaluate_gold(out, reviews[0].eval_prompts_path, sft_run, limit=16)
    assert len(gold) == len(GOOD)
    return out, report.write_report(out)


def test_results_csv_equals_summaries_and_shows_the_failure(written):
    out, paths = written
    rows = {r["name"]: r for r in csv.DictReader(paths["csv"].open())}
    assert set(rows) == {point_name(p) for p in [*GOOD, BAD]}
    for p in GOOD:
        row = rows[point_name(p)]
        summary = json.loads((out / point_name(p) / "summary.json").read_text())
        assert row["status"] == "done" and row["BETA"] == str(p["BETA"])
        numeric = {k: v for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
        assert "eval/loss" in numeric and "train/loss" in numeric
        for k, v in numeric.items():
            assert float(row[k]) == v, k
        gold = json.loads((out / point_name(p) / "gold_eval.json").read_text())
        assert gold["eval/gold/sentiment"] == float(row["eval/gold/sentiment"])
        assert gold["eval/kl/ref"] == float(row["eval/kl/ref"]) and gold["eval/samples"] == 16
    bad = rows[point_name(BAD)]
    assert bad["status"] == "failed" and "no_such_loss" in bad["error"]
    assert bad["eval/loss"] == ""
    md = paths["md"].read_text()
    assert "did not finish" in md and point_name(BAD) in md and "failed" in md


def test_means_and_intervals_over_seeds(written):
    out, _ = written
    runs = report.collect_runs(out)
    configs = {c.label: c for c in report.aggregate(runs, ["eval/loss"])}
    two_seeds = configs["BETA=0.1"]  # seeds 0 and 1
    values = [json.loads((out / point_name(p) / "summary.json").read_text())["eval/loss"]
              for p in GOOD[:2]]  # fmt: skip
    mean, lo, hi = two_seeds.stats["eval/loss"]
    assert mean == pytest.approx(np.mean(values))
    assert min(values) <= lo <= mean <= hi <= max(values) and lo < hi
    assert two_seeds.n_done == 2 and len(two_seeds.runs) == 2
    one_seed = configs["BETA=0.3"]
    assert one_seed.stats["eval/loss"][0] == one_seed.stats["eval/loss"][1]
    failed = configs[f"BETA=0.1, DPO_LOSS_TYPE={BAD['DPO_LOSS_TYPE']}"]
    assert failed.n_done == 0 and math.isnan(failed.stats["eval/loss"][0])
    # The report's table shows the same mean.
    assert f"{mean:.4g}" in (out / "report.md").read_text()


def test_plots_are_pngs_embedded_in_the_html(written):
    _, paths = written
    plots = {k: p for k, p in paths.items() if k.startswith("curve/") or k == "frontier"}
    assert "frontier" in plots and "curve/eval/loss" in plots and "curve/train/loss" in plots
    # The frontier's default axes: gold reward against KL to the reference.
    assert "Frontier: eval/gold/sentiment against eval/kl/ref" in paths["md"].read_text()
    html = paths["html"].read_text()
    for p in plots.values():
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 2000
    assert html.count("data:image/png;base64,") == len(plots)
    assert "src='http" not in html and 'src="http' not in html
    assert point_name(BAD) in html


def test_bootstrap_interval_is_seeded_and_covers_the_mean():
    x = [1.0, 2.0, 3.0, 10.0]
    mean, lo, hi = report.bootstrap_ci(x)
    assert mean == pytest.approx(4.0) and min(x) <= lo < mean < hi <= max(x)
    assert report.bootstrap_ci(x) == (mean, lo, hi)
    assert report.bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)
    assert all(math.isnan(v) for v in report.bootstrap_ci([]))


def test_report_command(written, capsys):
    out, _ = written
    assert cli.main(["report", str(out), "--frontier", ",".join(FRONTIER)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert cli.main(["report", str(out), "--metric", "eval/nonexistent"]) == 2
    assert "eval/nonexistent" in capsys.readouterr().err


def test_a_points_own_gin_file_names_its_algorithm(tmp_path):
    """The frontier colours a point by its GIN_FILE's stem; the table groups by it."""
    from rlhf_jax.sweep.plots import _algorithm_and_beta
    from rlhf_jax.sweep.report import Run

    ppo = Run("a", tmp_path, {"GIN_FILE": "exp/ppo.gin", "SEED": 0}, "done", None, {})
    dpo = Run("b", tmp_path, {"GIN_FILE": "exp/dpo.gin", "BETA": 0.3, "SEED": 1}, "done", None, {})
    assert _algorithm_and_beta(ppo) == ("ppo", None)
    assert _algorithm_and_beta(dpo) == ("dpo", "0.3")
    assert dpo.config == (("GIN_FILE", "dpo"), ("BETA", "0.3"))
