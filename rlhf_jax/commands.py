"""The commands' gin-configurable entry points: thin functions that check their settings before
anything expensive, call the library and write their outputs.

- `train_command` (`rlhf-jax train`): runs the stage the gin files configure.
- `generate_command`: samples completions for a prompt file from a policy run and writes JSONL
  with the task's judge scores (`eval.policy`).
- `make_preferences_command`: samples K completions per prompt, scores them with the task's
  gold judge and labels pairs (`data.labelling`), written as a preference folder.
- `evaluate_policies`: the policy evaluation of the quickstart and the sweep report
  (`eval.policy.evaluate_policies` with the task's judges and run-directory locks).

`parse_gin` is the gin parsing of every command. Judges come from the task named by a `judge`
or `task` setting (`data.tasks.TASKS`). User errors (a missing checkpoint, an unreadable
prompt file, K < 2, ...) raise `CommandError` or another `UserError`, which the CLI reports
with exit code 2 and one message.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pkgutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import numpy as np

import rlhf_jax.train
from rlhf_jax import atomic, gin_utils, rundir, settings
from rlhf_jax.data import labelling
from rlhf_jax.data.prompts import read_prompts
from rlhf_jax.data.tasks import TASKS, ReviewsTask
from rlhf_jax.errors import UserError
from rlhf_jax.eval import policy as policy_eval
from rlhf_jax.eval.policy import Judge
from rlhf_jax.train.faults import RunLock

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def lock_enclosing_run_dir(path: str | os.PathLike) -> Iterator[None]:
    """Holds the lock of the run directory that `path` lies in (if any) while writing there:
    a command never writes into a run directory that another process is using."""
    run_dir = rundir.enclosing_run_dir(Path(path).parent)
    if run_dir is None:
        yield
        return
    with RunLock(run_dir):
        yield


def _task(name: str, setting: str) -> type[ReviewsTask]:
    if name not in TASKS:
        raise CommandError(f"{setting}={name!r}: unknown task; choose one of {sorted(TASKS)}")
    return TASKS[name]


def resolve_judge(judge: str | Judge | None) -> Judge | None:
    """The judges of the task named `judge` (in `data.tasks.TASKS`), a callable, or None."""
    if judge is None or callable(judge):
        return judge
    if judge not in TASKS:
        raise CommandError(f"unknown judge {judge!r}; choose one of {sorted(TASKS)} or None")
    return TASKS[judge].judge


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
      judge: a task name in `data.tasks.TASKS` ("reviews": its judges score the texts), a
        callable, or None for no scores.
      segment_len: decode the tokens in fixed segments of this many steps (the same samples;
        on GPU it spares a host read-back of the loop condition at every step). 0 = one loop.

    Returns:
      The JSONL path.
    """
    settings.positive_int("generate_command.num_samples", num_samples)
    sampling = _sampling(
        "generate_command", num_samples=num_samples, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
        segment_len=segment_len, limit=limit,
    )  # fmt: skip
    if output is not None:
        settings.writable_file("generate_command.output (OUTPUT)", output)
    judge_fn = resolve_judge(judge)
    texts = _read_prompts(prompts, split, limit)
    if output:
        out = Path(output)
    else:
        with _user_errors(f"cannot load the policy from CHECKPOINT={str(checkpoint)!r}"):
            out = rundir.resolve_run_dir(checkpoint) / "generations.jsonl"
    # Taken before sampling: a busy run directory is refused before the expensive work.
    with lock_enclosing_run_dir(out):
        pol = policy_eval.load_named_policy(checkpoint, "CHECKPOINT")
        rows = policy_eval.sample(pol, texts, **sampling)
        judge_fields = policy_eval.score(rows, judge_fn)
        policy_eval.write_jsonl(out, rows)
    log.info("wrote %d generations to %s", len(rows), out)
    print(atomic.dumps(policy_eval.summarize(rows, [*judge_fields, "length"])))
    return out


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


def _sampling(
    command: str,
    *,
    num_samples: int,
    max_new_tokens: Any,
    temperature: Any,
    top_p: Any,
    top_k: Any,
    batch_size: Any,
    seed: Any,
    segment_len: Any,
    limit: Any,
) -> dict[str, Any]:
    """Fails before loading anything on sampling settings the sampler would reject; returns
    the keyword arguments of `eval.policy.sample`."""
    _check_sampling(
        command, top_k, segment_len, max_new_tokens, temperature, top_p, batch_size, limit, seed
    )
    return {
        "num_samples": num_samples,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "batch_size": batch_size,
        "segment_len": segment_len,
    }


def _check_preference_settings(
    num_samples: int,
    label_temperature: float,
    eval_fraction: float,
    gold: str,
    gold_weights: Mapping[str, float] | None,
    task: type[ReviewsTask],
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
        task.gold_reward({k: np.zeros(1) for k in task.JUDGE_NAMES}, gold, gold_weights)
    except ValueError as e:
        raise CommandError(f"bad gold reward settings: {e}") from None


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
    task: str = "reviews",
) -> Path:
    """Samples K completions per prompt, scores them with the task's judges, labels pairs by
    Bradley-Terry sampling on its gold reward (`data.labelling`) and writes
    OUTPUT/train.parquet, eval.parquet and preferences.json.

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
      task: the task (in `data.tasks.TASKS`) whose judges and gold reward label the pairs.

    Returns:
      The output folder.
    """
    task_cls = _task(task, "make_preferences_command.task")
    _check_preference_settings(
        num_samples, label_temperature, eval_fraction, gold, gold_weights, task_cls
    )
    sampling = _sampling(
        "make_preferences_command", num_samples=num_samples, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, batch_size=batch_size, seed=seed,
        segment_len=segment_len, limit=limit,
    )  # fmt: skip
    labelling.check_output_folder("make_preferences_command.output (PREFERENCES)", output)
    texts = _read_prompts(prompts, split, limit)
    rng_split, rng_labels = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    eval_prompts = labelling.split_prompts(texts, eval_fraction, rng_split)
    pol = policy_eval.load_named_policy(checkpoint, "CHECKPOINT")
    rows = policy_eval.sample(pol, texts, **sampling)
    fields = policy_eval.score(rows, task_cls.judge)
    scores = {f: np.asarray([r[f] for r in rows]) for f in fields}
    gold_scores = task_cls.gold_reward(scores, gold, gold_weights)
    pairs = labelling.label_pairs(
        rows,
        gold_scores,
        num_samples=num_samples,
        temperature=label_temperature,
        rng=rng_labels,
        fields=fields,
    )
    candidates = len(texts) * (num_samples // 2)
    splits = labelling.assign_splits(pairs, eval_prompts, candidates)
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
        "dropped_pairs": candidates - len(pairs),
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
        **labelling.label_stats(pairs),
    }
    out = Path(output)
    labelling.write_preferences(out, splits, meta)
    log.info(
        "wrote %d train and %d eval pairs to %s (labels agree with gold on %.1f%%)",
        meta["train_pairs"],
        meta["eval_pairs"],
        out,
        100 * meta["label_gold_agreement"],
    )
    return out


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
    """`eval.policy.evaluate_policies` with the judges of the task named `judge` (as in
    `generate_command`), holding each policy's run-directory lock while its samples.jsonl is
    written."""
    return policy_eval.evaluate_policies(
        policies,
        reference,
        prompts,
        judge=resolve_judge(judge),
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        lock=lock_enclosing_run_dir,
    )
