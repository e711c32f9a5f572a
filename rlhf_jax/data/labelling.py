"""Preference labelling: sampled completions scored by a gold judge become labelled pairs, and
the pairs a preference folder.

Pairs are labelled by Bradley-Terry sampling (Bradley & Terry 1952): P(a ≻ b) = σ((g_a − g_b)
/ T) for gold scores g, so the temperature T is the label-noise knob (T → 0: always the higher
gold score). A preference folder holds `train.parquet`, `eval.parquet` (split by prompt) and
`preferences.json` (the manifest, with each file's row count); every pair has prompt, chosen,
rejected, both gold scores (`chosen_score`, `rejected_score`), every judge's scores and
`label_prob` (the gold model's probability of the label drawn), which the reward-model stage
uses for its label-noise ceiling. `make_preference_iterator(source=FOLDER, ...)` reads it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from rlhf_jax import atomic, partitioning, settings
from rlhf_jax.data.errors import DataError
from rlhf_jax.errors import SettingsError

Row = dict[str, Any]

TRAIN_FILE, EVAL_FILE, META_FILE = "train.parquet", "eval.parquet", "preferences.json"


def preference_probability(diff: np.ndarray, temperature: float) -> np.ndarray:
    """Bradley-Terry P(a ≻ b) = σ(diff / T) for gold differences diff = g_a − g_b.

    T = 0 is the noiseless limit: 1 when diff > 0, 0 when diff < 0 and ½ on a tie.
    """
    diff = np.asarray(diff, dtype=np.float64)
    if temperature < 0:
        raise ValueError(f"label temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    # σ(x) = exp(−log(1 + e^{−x})): no overflow however small T is (tiny results underflow
    # to 0, which is harmless here).
    with np.errstate(under="ignore"):
        return np.exp(-np.logaddexp(0.0, -diff / temperature))


def label_pairs(
    rows: Sequence[Row],
    gold: np.ndarray,
    *,
    num_samples: int,
    temperature: float,
    rng: np.random.Generator,
    fields: Sequence[str] = (),
) -> list[Row]:
    """Pairs each prompt's samples (0, 1), (2, 3), ... and draws a Bradley-Terry label per pair.

    The pairs of a prompt are disjoint, so with K samples a prompt gives K // 2 independent
    pairs. A pair whose completions are identical carries no preference, and one with an
    empty completion cannot be trained on: both are dropped (after their label is drawn, so
    the labels of the other pairs do not depend on which pairs were dropped).

    Args:
      rows: prompt-major samples (as `eval.policy.sample` returns them): rows
        [i*K, (i+1)*K) share their `prompt`; each has a `completion`.
      gold: [len(rows)] gold scores.
      num_samples: K, samples per prompt (>= 2).
      temperature: the Bradley-Terry temperature T >= 0 (0 = noiseless labels).
      rng: the source of the labels' randomness.
      fields: further per-row fields (judge scores) copied as `chosen_<f>` / `rejected_<f>`.

    Returns:
      One dict per kept pair: `prompt`, `chosen`, `rejected`, `chosen_score`,
      `rejected_score`, `label_prob` (P(chosen ≻ rejected) under the gold model) and the
      copied fields.
    """
    n, k = len(rows), num_samples
    if k < 2:
        raise ValueError(f"num_samples={k}: pairs need at least 2 samples per prompt")
    if n % k:
        raise ValueError(f"{n} rows are not a whole number of groups of {k} samples")
    gold = np.asarray(gold, dtype=np.float64)
    if gold.shape != (n,):
        raise ValueError(f"gold has shape {gold.shape}, expected ({n},)")
    first_B = (np.arange(n // k)[:, None] * k + 2 * np.arange(k // 2)[None]).ravel()
    second_B = first_B + 1
    p_first_B = preference_probability(gold[first_B] - gold[second_B], temperature)
    first_wins_B = rng.random(len(first_B)) < p_first_B
    pairs = []
    for a, b, p_a, a_wins in zip(first_B, second_B, p_first_B, first_wins_B, strict=True):
        ra, rb = rows[a], rows[b]
        if ra["prompt"] != rb["prompt"]:
            raise ValueError(f"rows {a} and {b} are in one group but have different prompts")
        if ra["completion"] == rb["completion"]:
            continue
        if not ra["completion"].strip() or not rb["completion"].strip():
            continue
        win, lose = (a, b) if a_wins else (b, a)
        pair = {
            "prompt": ra["prompt"],
            "chosen": rows[win]["completion"],
            "rejected": rows[lose]["completion"],
            "chosen_score": float(gold[win]),
            "rejected_score": float(gold[lose]),
            "label_prob": float(p_a if a_wins else 1.0 - p_a),
        }
        for f in fields:
            pair[f"chosen_{f}"] = rows[win][f]
            pair[f"rejected_{f}"] = rows[lose][f]
        pairs.append(pair)
    return pairs


def split_prompts(
    prompts: Sequence[str], eval_fraction: float, rng: np.random.Generator
) -> set[str]:
    """The eval prompts: a random `eval_fraction` of the distinct prompts (at least one when
    eval_fraction > 0, and never all of them)."""
    distinct = list(dict.fromkeys(prompts))
    if eval_fraction <= 0:
        return set()
    n_eval = max(1, round(eval_fraction * len(distinct)))
    if n_eval >= len(distinct):
        raise SettingsError(
            f"eval_fraction={eval_fraction} of {len(distinct)} distinct prompt(s) leaves no "
            "training prompts"
        )
    return {distinct[i] for i in rng.permutation(len(distinct))[:n_eval]}


def assign_splits(pairs: Sequence[Row], eval_prompts: set[str], candidates: int) -> dict:
    """{"train": pairs, "eval": pairs}: a pair goes to eval when its prompt is an eval prompt.

    Raises:
      DataError: no training pair is left (`candidates` pairs were sampled).
    """
    splits: dict[str, list[Row]] = {"train": [], "eval": []}
    for p in pairs:
        splits["eval" if p["prompt"] in eval_prompts else "train"].append(p)
    if not splits["train"]:
        raise DataError(
            f"no training pairs: {len(pairs)} of {candidates} candidate pairs were kept (all "
            "for eval prompts); the others had identical or empty completions (use more "
            "prompts, a higher sampling temperature or longer completions)"
        )
    return splits


def label_stats(pairs: Sequence[Row]) -> dict[str, float]:
    """How good the labels are: `label_gold_agreement` (share of labels that agree with the gold
    ordering, over the pairs gold decides) and `ceiling` (the best accuracy any reward model can
    expect on them); empty for no pairs."""
    if not pairs:
        return {}
    diff = np.asarray([p["chosen_score"] - p["rejected_score"] for p in pairs])
    decided = diff != 0
    prob = np.asarray([p["label_prob"] for p in pairs])
    return {
        # Share of labels that agree with the gold ordering, over the pairs gold decides.
        "label_gold_agreement": float(np.mean(diff[decided] > 0)) if decided.any() else 0.5,
        # The best accuracy any reward model can expect on these labels (Bayes: max(p, 1-p)).
        "ceiling": float(np.mean(np.maximum(prob, 1.0 - prob))),
    }


def check_output_folder(name: str, output: Any) -> Path:
    """OUTPUT of make-preferences: a new folder, or an earlier preferences folder (replaced as a
    whole); never a file or a folder holding something else.

    Raises:
      SettingsError: naming the setting.
    """
    out = settings.writable_dir(name, output)
    if out.exists() and any(out.iterdir()) and not (out / META_FILE).exists():
        raise SettingsError(
            f"{name}={str(output)!r} is a folder that holds other files (no {META_FILE}); "
            "choose a new folder, it would be replaced as a whole"
        )
    return out


def write_preferences(out: Path, splits: Mapping[str, list[Row]], meta: Mapping[str, Any]) -> None:
    """Writes train.parquet, eval.parquet (when there are eval pairs) and preferences.json (the
    manifest: `files` maps each file to its row count) into `out`, replacing an earlier
    folder as a whole (process 0 only in a multi-process job: every process holds the same
    pairs; all return once the files are in place, and all raise if writing failed)."""
    partitioning.on_process_0(
        lambda: _write_preference_files(out, splits, meta), f"writing preferences to {out}"
    )


def _write_preference_files(
    out: Path, splits: Mapping[str, list[Row]], meta: Mapping[str, Any]
) -> None:
    # The whole folder is written at a temporary sibling and renamed into place: a kill leaves
    # the old folder or the new one, never the new eval split beside no train split.
    tmp = atomic.temp_sibling(out)
    try:
        _write_parquet(tmp / TRAIN_FILE, splits["train"])
        if splits["eval"]:
            _write_parquet(tmp / EVAL_FILE, splits["eval"])
        files = {TRAIN_FILE: len(splits["train"])}
        if splits["eval"]:
            files[EVAL_FILE] = len(splits["eval"])
        atomic.write_json(tmp / META_FILE, {**meta, "files": files}, sort_keys=False)
        atomic.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_parquet(path: Path, pairs: list[Row]) -> None:
    """Saves the pairs as a `datasets` dataset in one Parquet file, atomically and without a
    progress bar (the caller's progress-bar setting is restored)."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    tmp = path.with_name(f".{path.name}.tmp")
    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        datasets.Dataset.from_list(pairs).to_parquet(str(tmp))
    finally:
        if not was_disabled:
            enable_progress_bars()
    os.replace(tmp, path)
