"""The `generate` and `make-preferences` commands (gin-configurable, host-side), and the policy
evaluation the quickstart runs.

`generate` samples completions for a prompt file from a policy run and writes JSONL with the
configured task judge's scores. `make-preferences` samples K completions per prompt, scores
them with the task's gold judge and labels pairs by Bradley-Terry sampling (Bradley & Terry
1952): P(a ≻ b) = σ((g_a − g_b) / T), so the temperature T is the label-noise knob (T → 0:
always the higher gold score). The pairs are saved as a `datasets` dataset in Parquet files
(`train.parquet`, `eval.parquet`, split by prompt) with prompt, chosen, rejected, both gold
scores (`chosen_score`, `rejected_score`), every judge's scores and `label_prob` (the gold
model's probability of the label drawn), which the reward-model stage uses for its label-noise
ceiling. `rlhf_jax.data.make_preference_iterator(source=OUT_DIR, ...)` reads the folder.

User errors (a missing checkpoint, an unreadable prompt file, K < 2, ...) raise `CommandError`,
which the CLI reports with exit code 2 and one message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pkgutil
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import gin
import numpy as np

import rlhf_jax.train
from rlhf_jax import atomic, gin_utils, partitioning, settings
from rlhf_jax.data.errors import DataError
from rlhf_jax.data.examples import RowReader
from rlhf_jax.data.sources import load_source
from rlhf_jax.data.tasks import judges
from rlhf_jax.errors import SettingsError, UserError
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.eval.policy import Judge, Policy, Row
from rlhf_jax.rundir import MODEL_INFO, resolve_run_dir
from rlhf_jax.train.faults import RunLock

log = logging.getLogger(__name__)

# Task judges by name: each maps decoded texts to {score name: [N] scores}.
TASK_JUDGES: dict[str, Judge] = {"reviews": judges.score_texts}

TRAIN_FILE, EVAL_FILE, META_FILE = "train.parquet", "eval.parquet", "preferences.json"


class CommandError(UserError):
    """A user error in a command's inputs or settings (exit code 2 in the CLI)."""


# The modules whose gin configurables gin files may name. Every module of train/ (stages, loop,
# optimiser, HF import) is listed, so a new stage's configurables are nameable without touching
# this list.
CONFIGURABLES: tuple[str, ...] = (
    "rlhf_jax.models.config",
    "rlhf_jax.partitioning",
    "rlhf_jax.data",
    "rlhf_jax.data.tasks.judges",
    "rlhf_jax.data.tasks.reviews",
    *(f"rlhf_jax.train.{m.name}" for m in pkgutil.iter_modules(rlhf_jax.train.__path__)),
    "rlhf_jax.commands",
    "rlhf_jax.info",
)


def import_configurables() -> None:
    """Imports every module in `CONFIGURABLES` (and registers optax's builders)."""
    gin_utils.import_modules(CONFIGURABLES)


def parse_gin(
    gin_files: Sequence[str], bindings: Sequence[str], *, allow_required: bool = False
) -> None:
    """Parses gin files and bindings as every command does (`gin_utils.parse` with
    `CONFIGURABLES`): unknown names, syntax errors, macros used but never defined, misspelt
    macro bindings and (unless `allow_required`) REQUIRED macros left unset raise
    `GinConfigError`."""
    gin_utils.parse(gin_files, bindings, configurables=CONFIGURABLES, allow_required=allow_required)


@gin.configurable("train")
def train_command(stage: Callable[[], object] = gin.REQUIRED) -> object:
    """`rlhf-jax train`: runs the stage the gin files configure (`train.stage = @sft_stage`,
    `@reward_stage`, `@dpo_stage`, ...) and returns what it returns."""
    return stage()


@contextlib.contextmanager
def _user_errors(what: str) -> Iterator[None]:
    """Turns the errors a bad input path or file causes into `CommandError`s naming `what`."""
    try:
        yield
    except (FileNotFoundError, UserError) as e:
        raise CommandError(f"{what}: {e}") from e


def enclosing_run_dir(path: str | os.PathLike) -> Path | None:
    """The run directory (a folder with model.json) that holds `path`, if any."""
    p = Path(path).absolute()
    for d in (p, *p.parents):
        if (d / MODEL_INFO).is_file():
            return d
    return None


@contextlib.contextmanager
def lock_enclosing_run_dir(path: str | os.PathLike) -> Iterator[None]:
    """Holds the lock of the run directory that `path` lies in (if any) while writing there:
    a command never writes into a run directory that another process is using."""
    run_dir = enclosing_run_dir(Path(path).parent)
    if run_dir is None:
        yield
        return
    with RunLock(run_dir):
        yield


def resolve_judge(judge: str | Judge | None) -> Judge | None:
    """A judge from its name in `TASK_JUDGES`, a callable, or None (no scoring)."""
    if judge is None or callable(judge):
        return judge
    if judge not in TASK_JUDGES:
        raise CommandError(f"unknown judge {judge!r}; choose one of {sorted(TASK_JUDGES)} or None")
    return TASK_JUDGES[judge]


def read_prompts(
    source: str | os.PathLike,
    split: str | None = None,
    column: str = "prompt",
    limit: int | None = None,
) -> list[str]:
    """Prompt strings from a file, folder or saved dataset (any `load_source` format).

    Args:
      source: the prompts.
      split: "train" or "eval"; None takes "eval" when the source has one, else "train".
      column: the prompt column.
      limit: keep the first `limit` prompts (None: all).

    Raises:
      DataError: the source is missing or unreadable, lacks the split or the column, or has a
        missing, non-string or empty prompt (the message names the file and row).
    """
    splits = load_source(str(source))
    if split is None:
        split = "eval" if "eval" in splits else "train"
    if split not in splits:
        raise DataError(f"{source} has no {split!r} split (it has {sorted(splits)})")
    ds = splits[split]
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    reader = RowReader(ds, [column])
    prompts = [reader.text(i, column) for i in reader]
    if not prompts:
        raise DataError(f"{source} has no prompts")
    return prompts


def _load_policy(path: str | os.PathLike, what: str = "CHECKPOINT", **kwargs: Any) -> Policy:
    with _user_errors(f"cannot load the policy from {what}={str(path)!r}"):
        return policy_eval.load_policy(path, **kwargs)


def _read_prompts(prompts: str | os.PathLike, split: str | None, limit: int | None) -> list[str]:
    with _user_errors(f"cannot read prompts from PROMPTS={str(prompts)!r}"):
        return read_prompts(prompts, split, limit=limit)


@gin.configurable
def generate_command(
    checkpoint: str = gin.REQUIRED,
    prompts: str = gin.REQUIRED,
    output: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    num_samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 64,
    seed: int = 0,
    judge: str | Judge | None = "reviews",
    segment_len: int = 0,
) -> Path:
    """Samples completions and writes them as JSONL, one object per completion.

    Each row has `prompt`, `sample`, `completion`, `text` (prompt + completion), `length`,
    `logprob` and one field per judge score (e.g. `sentiment`, `offensiveness`). The means
    are printed as one JSON line.

    Args:
      checkpoint: a policy run directory (or its checkpoints/ or one step folder).
      prompts: a prompt file, folder or saved dataset with a `prompt` column.
      output: the JSONL path (default CHECKPOINT's run directory / generations.jsonl).
      split: the prompts' split (None: "eval" when there is one, else "train").
      limit: use the first `limit` prompts.
      num_samples: completions per prompt.
      max_new_tokens, temperature, top_p, top_k: sampling settings.
      batch_size: rows per sampler call.
      seed: sampling seed.
      judge: a name in `TASK_JUDGES` ("reviews"), a callable, or None for no scores.
      segment_len: decode the tokens in fixed segments of this many steps (the same samples;
        on GPU it spares a host read-back of the loop condition at every step). 0 = one loop.

    Returns:
      The JSONL path.
    """
    settings.positive_int("generate_command.num_samples", num_samples)
    _check_sampling(
        "generate_command", top_k, segment_len, max_new_tokens, temperature, top_p, batch_size,
        limit, seed,
    )  # fmt: skip
    if output is not None:
        settings.writable_file("generate_command.output (OUTPUT)", output)
    judge_fn = resolve_judge(judge)
    texts = _read_prompts(prompts, split, limit)
    if output:
        out = Path(output)
    else:
        with _user_errors(f"cannot load the policy from CHECKPOINT={str(checkpoint)!r}"):
            out = resolve_run_dir(checkpoint) / "generations.jsonl"
    # Taken before sampling: a busy run directory is refused before the expensive work.
    with lock_enclosing_run_dir(out):
        pol = _load_policy(checkpoint)
        rows = policy_eval.sample(
            pol,
            texts,
            max_new_tokens=max_new_tokens,
            num_samples=num_samples,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            batch_size=batch_size,
            segment_len=segment_len,
        )
        judge_fields = policy_eval.score(rows, judge_fn)
        policy_eval.write_jsonl(out, rows)
    log.info("wrote %d generations to %s", len(rows), out)
    print(atomic.dumps(policy_eval.summarize(rows, [*judge_fields, "length"])))
    return out


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
        raise CommandError(
            f"eval_fraction={eval_fraction} of {len(distinct)} distinct prompt(s) leaves no "
            "training prompts"
        )
    return {distinct[i] for i in rng.permutation(len(distinct))[:n_eval]}


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


def _label_stats(pairs: list[Row]) -> dict[str, float]:
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


def _check_sampling(
    command: str,
    top_k: Any,
    segment_len: Any,
    max_new_tokens: Any = 1,
    temperature: Any = 1.0,
    top_p: Any = 1.0,
    batch_size: Any = 1,
    limit: Any = None,
    seed: Any = 0,
) -> None:
    """Fails before loading anything on sampling settings the sampler would reject."""
    settings.nonneg_int(f"{command}.top_k", top_k)
    settings.nonneg_int(f"{command}.segment_len", segment_len)
    settings.positive_int(f"{command}.max_new_tokens", max_new_tokens)
    settings.nonneg_float(f"{command}.temperature", temperature)
    settings.in_range(f"{command}.top_p", top_p, 0.0, 1.0, low_open=True)
    settings.positive_int(f"{command}.batch_size", batch_size)
    settings.optional_positive_int(f"{command}.limit", limit)
    settings.integer(f"{command}.seed", seed)


def _check_preference_settings(
    num_samples: int,
    label_temperature: float,
    eval_fraction: float,
    gold: str,
    gold_weights: Mapping[str, float] | None,
) -> None:
    """Fails before any sampling on settings `make_preferences_command` cannot use."""
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 2:
        raise CommandError(
            f"make_preferences_command.num_samples={num_samples}: need K >= 2 completions per "
            "prompt to form pairs"
        )
    settings.nonneg_float("make_preferences_command.label_temperature", label_temperature)
    settings.in_range(
        "make_preferences_command.eval_fraction", eval_fraction, 0.0, 1.0, high_open=True
    )
    try:  # the gold kind and weights, on a dummy score
        judges.gold_from_scores({k: np.zeros(1) for k in judges.JUDGES}, gold, gold_weights)
    except ValueError as e:
        raise CommandError(f"bad gold reward settings: {e}") from None


def _write_preferences(out: Path, splits: Mapping[str, list[Row]], meta: Mapping[str, Any]):
    """Writes train.parquet, eval.parquet (when there are eval pairs) and preferences.json (the
    manifest: `files` maps each file to its row count) into `out`, replacing an earlier
    folder as a whole (process 0 only in a multi-process job: every process holds the same
    pairs; all return once the files are in place, and all raise if writing failed)."""
    partitioning.on_process_0(
        lambda: _write_preference_files(out, splits, meta), f"writing preferences to {out}"
    )


def _write_preference_files(out: Path, splits: Mapping[str, list[Row]], meta: Mapping[str, Any]):
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


@gin.configurable
def make_preferences_command(
    checkpoint: str = gin.REQUIRED,
    prompts: str = gin.REQUIRED,
    output: str = gin.REQUIRED,
    num_samples: int = 2,
    split: str = "train",
    limit: int | None = None,
    eval_fraction: float = 0.1,
    label_temperature: float = 0.1,
    gold: str = "sentiment",
    gold_weights: Mapping[str, float] | None = None,
    max_new_tokens: int = 24,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 128,
    seed: int = 0,
    segment_len: int = 0,
) -> Path:
    """Samples K completions per prompt, scores them with the gold judge, labels pairs by
    Bradley-Terry sampling and writes OUTPUT/train.parquet, eval.parquet and preferences.json.

    The gold judge scores the whole text (prompt + completion), as the reviews task defines
    it. train.parquet is written last: its presence means the folder is complete.

    Args:
      checkpoint: the policy run directory to sample from (the SFT policy).
      prompts: prompt file, folder or saved dataset with a `prompt` column.
      output: the output folder.
      num_samples: K completions per prompt (K // 2 disjoint pairs per prompt), >= 2.
      split: the prompts' split.
      limit: use the first `limit` prompts.
      eval_fraction: share of the distinct prompts whose pairs go to eval.parquet (0: none).
      label_temperature: Bradley-Terry temperature T of the labels (0 = noiseless).
      gold: gold reward kind: "sentiment", "harmless" or "hh".
      gold_weights: for "hh", {"sentiment": w_s, "harmless": w_h} (default ½ / ½).
      max_new_tokens, temperature, top_p, top_k: sampling settings of the policy.
      batch_size: rows per sampler call.
      seed: seed of the sampling, the prompt split and the labels.
      segment_len: as in `generate_command`.

    Returns:
      The output folder.
    """
    _check_preference_settings(num_samples, label_temperature, eval_fraction, gold, gold_weights)
    _check_sampling(
        "make_preferences_command", top_k, segment_len, max_new_tokens, temperature, top_p,
        batch_size, limit, seed,
    )  # fmt: skip
    check_output_folder("make_preferences_command.output (PREFERENCES)", output)
    texts = _read_prompts(prompts, split, limit)
    eval_prompts = split_prompts(texts, eval_fraction, np.random.default_rng([seed, 1]))
    pol = _load_policy(checkpoint)
    rows = policy_eval.sample(
        pol,
        texts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        batch_size=batch_size,
        segment_len=segment_len,
    )
    fields = policy_eval.score(rows, judges.score_texts)
    scores = {f: np.asarray([r[f] for r in rows]) for f in fields}
    gold_scores = judges.gold_from_scores(scores, gold, gold_weights)
    pairs = label_pairs(
        rows,
        gold_scores,
        num_samples=num_samples,
        temperature=label_temperature,
        rng=np.random.default_rng([seed, 2]),
        fields=fields,
    )
    splits: dict[str, list[Row]] = {"train": [], "eval": []}
    for p in pairs:
        splits["eval" if p["prompt"] in eval_prompts else "train"].append(p)
    if not splits["train"]:
        candidates = len(texts) * (num_samples // 2)
        raise CommandError(
            f"no training pairs: {len(pairs)} of {candidates} candidate pairs were kept (all "
            "for eval prompts); the others had identical or empty completions (use more "
            "prompts, a higher sampling temperature or longer completions)"
        )
    if not splits["eval"] and eval_fraction > 0:
        log.warning("no eval pairs were produced; %s will have no eval split", output)
    meta = {
        "checkpoint": str(pol.run_dir),
        "checkpoint_step": pol.step,
        "prompts": str(prompts),
        "num_prompts": len(texts),
        "eval_prompts": len(eval_prompts),
        "num_samples": num_samples,
        "pairs": len(pairs),
        "dropped_pairs": len(texts) * (num_samples // 2) - len(pairs),
        "train_pairs": len(splits["train"]),
        "eval_pairs": len(splits["eval"]),
        "label_temperature": label_temperature,
        "gold": gold,
        "gold_weights": dict(gold_weights) if gold_weights else None,
        "sampling": {
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
        },
        **_label_stats(pairs),
    }
    out = Path(output)
    _write_preferences(out, splits, meta)
    log.info(
        "wrote %d train and %d eval pairs to %s (labels agree with gold on %.1f%%)",
        meta["train_pairs"],
        meta["eval_pairs"],
        out,
        100 * meta["label_gold_agreement"],
    )
    return out


def samples_path(run_dir: str | os.PathLike) -> Path:
    """Where `evaluate_policies` writes a policy's samples: RUN_DIR/samples.jsonl."""
    return Path(run_dir) / "samples.jsonl"


def evaluate_policies(
    policies: Mapping[str, str],
    reference: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 24,
    seed: int = 0,
    batch_size: int = 128,
    judge: str | Judge | None = "reviews",
) -> dict[str, dict[str, float]]:
    """Samples each policy on `prompts` at temperature 1 and reports the judges' means, the
    completion length and the sequence KL to `reference` (all with standard errors); writes
    each policy's samples to RUN_DIR/samples.jsonl.

    Args:
      policies: display name -> policy run directory.
      reference: the reference policy's run directory (e.g. the SFT run).
      prompts: prompt strings.
      max_new_tokens, seed, batch_size: sampling settings (the same for every policy).
      judge: as in `generate_command`.

    Returns:
      Display name -> `eval.policy.summarize` output.
    """
    judge_fn = resolve_judge(judge)
    ref = _load_policy(reference, "reference")
    results = {}
    for name, run_dir in policies.items():
        pol = _load_policy(run_dir, name, mesh=ref.mesh, rules=ref.rules)
        rows = policy_eval.sample(
            pol,
            prompts,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            ref=ref,
        )
        fields = policy_eval.score(rows, judge_fn)
        with lock_enclosing_run_dir(samples_path(run_dir)):
            policy_eval.write_jsonl(samples_path(run_dir), rows)
        results[name] = policy_eval.summarize(rows, [*fields, "kl", "length"])
    return results
