"""The reward-model stage: gin wiring from preference data and an SFT policy to the generic loop.

- `reward_preference_data` (gin) loads preference pairs with the data pipeline and adds the
  float columns the reward metrics use when the data has them: the gold judge's
  `chosen_score` / `rejected_score` and the labeller's `label_prob` (or, from a `temperature`
  column, sigmoid((chosen_score - rejected_score) / temperature)). The pipeline only carries
  `margin`, so each row's position travels through its margin field and the extra columns are
  looked up afterwards (robust to rows the pipeline drops).
- `policy_to_reward_params` maps a policy's `Transformer` params into the `trunk/` of a
  `ScalarModel` (the LM head, if any, is dropped; the scalar heads keep their fresh init), and
  `reward_state_factory` initialises a reward model that way from an SFT run directory.
- `reward_stage` (gin: `train.stage = @reward_stage`) trains it with the algorithm
  `steps.reward.RewardConfig` (optionally with a frozen trunk: no update and no optimiser state
  for `trunk/`, `freeze_trunk_updates`), evaluates every EVAL_EVERY steps, and at the end writes
  RUN_DIR/reward_norm.json from the final eval's per-head reward statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import gin
import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import partitioning, settings
from rlhf_jax.data.batching import BatchIterator, collate_preference
from rlhf_jax.data.errors import DataError
from rlhf_jax.data.examples import RowReader, TokenizedDataset
from rlhf_jax.data.pipeline import train_and_eval_iterators
from rlhf_jax.data.preference import build_preference_dataset
from rlhf_jax.data.sources import load_source
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.models import ModelConfig, ScalarModel, lora, model_config
from rlhf_jax.reward_scoring import RewardNormalization
from rlhf_jax.steps.algorithm import HParams, eval_step, train_step
from rlhf_jax.steps.reward import GOLD_FIELDS, LABEL_PROB_FIELD, RewardConfig, RewardHParams
from rlhf_jax.steps.state import ModelState, StateFactory, TrainState
from rlhf_jax.train import stages
from rlhf_jax.train.checkpoint import (
    load_params,
    read_model_info,
    resolve_run_dir,
)
from rlhf_jax.train.faults import RunLock
from rlhf_jax.train.loop import LoopConfig, LoopResult, LoopSpec, train_loop
from rlhf_jax.train.metrics import write_json_atomic
from rlhf_jax.train.optim import Optimizer, param_path

log = logging.getLogger(__name__)

HostBatch = dict[str, np.ndarray]
_ROW_FIELD = "_reward_row"
TRUNK_PATTERN = r"^trunk/"


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class RewardData:
    """What a reward data source returns.

    Attributes:
      train: endless, checkpointable iterator of host batches (this process's rows).
      eval: returns a fresh pass over the eval split (None: no eval split).
      vocab_size: the tokenizer's number of ids.
      seq_len: the longest batch length (the largest bucket).
      tokenizer_path: recorded in RUN_DIR/model.json.
      summary: entries for summary.json (row counts, which gold columns exist).
    """

    train: Iterator[HostBatch]
    eval: Callable[[], Iterable[HostBatch]] | None
    vocab_size: int
    seq_len: int
    tokenizer_path: str | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


def _float_column(ds: datasets.Dataset, name: str | None) -> np.ndarray | None:
    """A column as float64 (NaN for null or non-numeric), or None when absent."""
    if not name or name not in ds.column_names:
        return None
    out = np.full(len(ds), np.nan)
    for i, v in enumerate(ds[name]):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[i] = float(v)
    return out


def _extra_columns(
    ds: datasets.Dataset, gold: Sequence[str], label_prob: str | None, temperature: str | None
) -> dict[str, np.ndarray]:
    """Per-row float columns for the batch: gold scores and the label probability."""
    out = {}
    scores = [_float_column(ds, c) for c in gold]
    if all(s is not None for s in scores):
        out.update(zip(GOLD_FIELDS, scores, strict=True))
    p = _float_column(ds, label_prob)
    temp = _float_column(ds, temperature)
    if p is None and temp is not None and GOLD_FIELDS[0] in out:
        with np.errstate(all="ignore"):
            z = (out["chosen_score"] - out["rejected_score"]) / temp
            p = 1.0 / (1.0 + np.exp(-z))
    if p is not None:
        out[LABEL_PROB_FIELD] = p
    return out


def _checked_margins(
    ds: datasets.Dataset, column: str, on_bad_row: str
) -> tuple[datasets.Dataset, np.ndarray | None]:
    """The margin column validated exactly as the DPO loader does (`RowReader.number`: a
    finite number or null; "abc", NaN, "2.0" are bad rows naming file, row and field).

    Returns:
      The split (without the bad rows under on_bad_row="skip") and its margins (None when
      the column is absent).
    """
    if column not in ds.column_names:
        return ds, None
    reader = RowReader(ds, [], optional=[column], on_bad_row=on_bad_row)
    keep, margins = [], []
    for i in reader:
        try:
            margins.append(reader.number(i, column))
            keep.append(i)
        except DataError as e:
            reader.bad(e)  # raises under "error"
    if len(keep) < len(ds):
        log.warning("%s: %d row(s) with a bad %r skipped", reader.name, len(ds) - len(keep), column)
        ds = ds.select(keep)
    return ds, np.asarray(margins, dtype=np.float64)


def _with_extras(
    built: TokenizedDataset,
    ds: datasets.Dataset,
    margin: np.ndarray | None,
    extras: Mapping[str, np.ndarray],
) -> TokenizedDataset:
    rows = []
    for row in built.rows:
        i = int(row["margin"])  # the row's position, carried through the margin field
        new = dict(row, margin=0.0 if margin is None or np.isnan(margin[i]) else margin[i])
        new.update({k: float(v[i]) for k, v in extras.items()})
        rows.append(new)
    return TokenizedDataset("preference", rows, built.stats, built.pad_id, built.name)


def collate_reward_pairs(
    rows: Sequence[dict | None], length: int, *, pad_id: int, extras: Sequence[str] = ()
) -> HostBatch:
    """Preference batch (`collate_preference`) plus float32 [B] `extras` (NaN on padding)."""
    out = collate_preference(rows, length, pad_id=pad_id)
    for name in extras:
        out[name] = np.asarray([np.nan if r is None else r[name] for r in rows], np.float32)
    return out


def _rewound(it: BatchIterator) -> BatchIterator:
    """The eval iterator from its start (an earlier eval may have stopped at `eval_batches`)."""
    it.reset()
    return it


@gin.configurable
def reward_preference_data(
    batch_size: int,
    seed: int = 0,
    tokenizer: str | Tokenizer | None = None,
    *,
    source: Any = gin.REQUIRED,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    gold_columns: Sequence[str] = GOLD_FIELDS,
    label_prob_column: str | None = LABEL_PROB_FIELD,
    temperature_column: str | None = "temperature",
    buckets: Sequence[int] = (64, 128, 256),
    max_len: int | None = None,
    max_prompt_len: int | None = None,
    split_fraction: float | None = 0.05,
    eval_batch_size: int | None = None,
    file_format: str | None = None,
    on_bad_row: str = "error",
    on_long_prompt: str = "truncate",
) -> RewardData:
    """Preference pairs for reward-model training, with the gold columns when present.

    Args:
      batch_size: global batch size.
      seed: shuffling and split seed.
      tokenizer: tokenizer.json path or `Tokenizer` (the stage passes the SFT run's).
      source: anything `data.sources.load_source` reads (Parquet/JSONL file, directory, ...).
      format: preference format ("explicit", "implicit_prompt", "conversational", "auto").
      columns: column names by role (prompt, chosen, rejected, margin).
      gold_columns: the gold judge's score columns (chosen, rejected).
      label_prob_column: the labeller's P(chosen preferred) column.
      temperature_column: Bradley-Terry labelling temperature column, used for the label
        probability when `label_prob_column` is absent.
      buckets, max_len, max_prompt_len, file_format, on_bad_row, on_long_prompt: as in
        `data.pipeline.make_preference_iterator`.
      split_fraction: eval share when the source has no eval split (None: no eval).
      eval_batch_size: global eval batch size (default batch_size).
    """
    if tokenizer is None:
        raise ValueError("reward_preference_data needs a tokenizer (or an SFT run to take it from)")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
    cols = dict(columns or {})
    margin_col = cols.pop("margin", "margin")
    fields = {f"{k}_field": v for k, v in cols.items()}
    splits = load_source(source, split_fraction=split_fraction, seed=seed, file_format=file_format)
    built: dict[str, TokenizedDataset] = {}
    extra_names: set[str] | None = None
    for name, ds in splits.items():
        ds, margin = _checked_margins(ds, margin_col, on_bad_row)
        ds = ds.add_column(_ROW_FIELD, np.arange(len(ds), dtype=np.int64))
        tokenized = build_preference_dataset(
            ds,
            tok,
            format=format,
            margin_field=_ROW_FIELD,
            max_len=max(buckets) if max_len is None else max_len,
            max_prompt_len=max_prompt_len,
            on_bad_row=on_bad_row,
            on_long_prompt=on_long_prompt,
            **fields,
        )
        extras = _extra_columns(ds, gold_columns, label_prob_column, temperature_column)
        names = set(extras)
        extra_names = names if extra_names is None else extra_names & names
        built[name] = _with_extras(tokenized, ds, margin, extras)
    extra_names = sorted(extra_names or ())
    collate = functools.partial(collate_reward_pairs, pad_id=tok.pad_id, extras=extra_names)
    train, ev = train_and_eval_iterators(
        built,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        buckets=buckets,
        seed=seed,
        collate_fn=collate,
    )
    summary = {f"data/{k}_pairs": len(v) for k, v in built.items()}
    summary.update(stages.truncation_summary({k: v.stats for k, v in built.items()}))
    summary["data/columns"] = ",".join(extra_names) or "none"
    return RewardData(
        train=train,
        eval=None if ev is None else functools.partial(_rewound, ev),
        vocab_size=tok.vocab_size,
        seq_len=max(buckets),
        tokenizer_path=tok.path,
        summary=summary,
    )


# ----------------------------------------------------------------------------- init


def policy_to_reward_params(reward_params: nnx.State, policy_params: nnx.State) -> nnx.State:
    """A reward model's params with its trunk taken from a policy's `Transformer` params.

    Every trunk parameter must exist in the policy with the same shape (it is cast to the
    reward model's dtype); the policy's `lm_head` is dropped; the heads are kept as given.

    Raises:
      ValueError: the trunk and the policy do not match (names or shapes).
    """
    rm, policy = nnx.to_pure_dict(reward_params), nnx.to_pure_dict(policy_params)
    trunk = rm["trunk"]
    missing = sorted(set(trunk) - set(policy))
    unused = sorted(set(policy) - set(trunk) - {"lm_head"})
    if missing or unused:
        raise ValueError(
            f"policy params do not fit the reward trunk: missing {missing}, unexpected {unused}"
        )
    policy_trunk = {k: policy[k] for k in trunk}
    if jax.tree.structure(policy_trunk) != jax.tree.structure(trunk):
        raise ValueError("policy params and reward trunk differ in structure (layers?)")

    def take(path, new, old):
        if new.shape != old.shape:
            raise ValueError(
                f"trunk/{jax.tree_util.keystr(path)}: policy shape {new.shape} "
                f"!= reward model shape {old.shape}"
            )
        return new.astype(old.dtype)

    rm["trunk"] = jax.tree_util.tree_map_with_path(take, policy_trunk, trunk)
    out = jax.tree.map(lambda x: x, reward_params)
    nnx.replace_by_pure_dict(out, rm)
    return out


def reward_state_factory(
    cfg: ModelConfig,
    optimizer: Any,
    mesh: Mesh,
    rules,
    *,
    seed: int = 0,
    num_heads: int = 1,
    init_from: str | None = None,
) -> tuple[StateFactory, nnx.GraphDef]:
    """Abstract + sharded-init `TrainState` of a `ScalarModel`, its trunk optionally taken from
    the policy of the run (or checkpoint) directory `init_from`."""
    kwargs = {"num_heads": num_heads}
    factory, graphdef = stages.model_state_factory(
        cfg, optimizer, mesh, rules, seed=seed, model_class="ScalarModel", model_kwargs=kwargs,
        name="reward",
    )  # fmt: skip
    if init_from is None:
        return factory, graphdef

    def create(key: jax.Array, policy_params: nnx.State) -> TrainState:
        fresh = nnx.state(ScalarModel(cfg, rngs=nnx.Rngs(key), **kwargs), nnx.Param)
        params = policy_to_reward_params(fresh, policy_params)
        model = ModelState.create(graphdef=graphdef, params=params, optimizer=optimizer)
        return TrainState.create({"reward": model})

    def init() -> TrainState:
        policy = load_params(init_from, mesh=mesh, rules=rules)
        log.info("reward trunk from the policy in %s (step %d)", policy.run_dir, policy.step)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            jitted = jax.jit(create, out_shardings=factory.shardings)
            return jitted(jax.random.key(seed), policy.params)

    return dataclasses.replace(factory, init=init), graphdef


def freeze_trunk_updates(optimizer: Optimizer) -> Optimizer:
    """The optimiser with exactly zero updates and no optimiser state for every `trunk/`
    parameter (`optax.multi_transform` + `set_to_zero`, as `make_optimizer(frozen=...)` does),
    so the trunk stays bitwise unchanged, weight decay included. The step's `freeze_trunk`
    also stops the gradient at the trunk, which saves the trunk's backward pass.
    """

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if re.search(TRUNK_PATTERN, param_path(p)) else "train", params
        )

    tx = optax.multi_transform({"train": optimizer.tx, "frozen": optax.set_to_zero()}, labels)
    return Optimizer(tx=tx, schedule=optimizer.schedule)


# ----------------------------------------------------------------------------- stage


def _count_tokens(batch: HostBatch) -> float:
    return float(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())


def _flops_per_batch(cfg: ModelConfig, batch: HostBatch) -> float:
    rows, seq_len = batch["chosen_input_ids"].shape
    return cfg.flops_per_token(seq_len) * 2 * rows * seq_len


def write_normalization(run_dir: Path, summary: Mapping[str, Any], num_heads: int) -> None:
    """RUN_DIR/reward_norm.json from the final eval's per-head statistics (if it has them)."""
    keys = [(f"eval/rewards/head{k}_mean", f"eval/rewards/head{k}_std") for k in range(num_heads)]
    if not all(m in summary and s in summary for m, s in keys):
        log.warning("no eval statistics: %s/reward_norm.json not written", run_dir)
        return
    norm = RewardNormalization.create(
        [summary[m] for m, _ in keys],
        [summary[s] for _, s in keys],
        count=int(2 * summary.get("eval/pairs", 0)),
        source=f"eval split, chosen and rejected, step {summary['step']}",
    )
    norm.save(run_dir)


@gin.configurable
def reward_stage(
    run_dir: str = gin.REQUIRED,
    data: Callable[..., RewardData] = gin.REQUIRED,
    seed: int = 0,
    batch_size: int = 32,
    init_from: str | None = None,
    num_heads: int = 1,
    freeze_trunk: bool = False,
    bootstrap: bool = True,
    grad_accum_steps: int = 1,
    ece_bins: int = 10,
    match_vocab: bool = True,
    normalize: bool = True,
    lr_scale: float = 1.0,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
    margin_scale: float = 1.0,
    debug_nan_step: int = -1,
) -> LoopResult:
    """Trains a Bradley-Terry reward model (gin: `train.stage = @reward_stage`).

    Args:
      run_dir: the run directory (RUN_DIR); re-running on it resumes.
      data: called as `data(batch_size=, seed=)` and, with `init_from`, `tokenizer=` the SFT
        run's tokenizer; returns `RewardData` (normally `@reward_preference_data`).
      seed: init, data and bootstrap seed (SEED).
      batch_size: global batch size in pairs (BATCH_SIZE).
      init_from: an SFT run (or checkpoint) directory: its model.json defines the model and its
        policy params the trunk (None: fresh init from the gin model config).
      num_heads: ensemble size K (NUM_HEADS).
      freeze_trunk: train the heads only.
      bootstrap: with K > 1, train each head on its bootstrap resample (steps/reward.py).
      grad_accum_steps: micro-batches per step.
      ece_bins: calibration bins.
      match_vocab: fresh init only: set the model's vocab_size to the tokenizer's.
      normalize: write RUN_DIR/reward_norm.json at the end (used by the scorer).
      lr_scale, label_smoothing, center_coef, margin_scale, debug_nan_step: traced
        hyperparameters (`steps.reward.RewardHParams`).
    """
    loop_cfg = LoopConfig()
    stages.check_stage_settings(
        run_dir=run_dir, seed=seed, batch_size=batch_size, grad_accum_steps=grad_accum_steps,
        lr_scale=lr_scale, init_from=init_from, stage="reward_stage",
    )  # fmt: skip
    settings.positive_int("reward_stage.num_heads (NUM_HEADS)", num_heads)
    settings.positive_int("reward_stage.ece_bins", ece_bins)
    settings.in_range("reward_stage.label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
    settings.nonneg_float("reward_stage.center_coef", center_coef)
    settings.finite("reward_stage.margin_scale", margin_scale)
    run_dir_path = Path(run_dir)
    with RunLock(run_dir_path):
        mesh, rules = partitioning.make_mesh(), partitioning.logical_rules()
        partitioning.check_batch_divisible(batch_size, mesh)
        lora.check_unsupported("reward-model")  # gin/algorithms/lora.gin would freeze it all
        policy_info = read_model_info(resolve_run_dir(init_from)) if init_from else None
        # The SFT run's tokenizer, when there is one; else the data source's own setting.
        tok = {"tokenizer": policy_info["tokenizer"]} if policy_info else {}
        rm_data = data(batch_size=batch_size, seed=seed, **tok)
        if policy_info is not None:
            cfg = stages.fit_vocab(policy_info["model_config"], rm_data.vocab_size, match=False)
        else:
            cfg = stages.fit_vocab(model_config(), rm_data.vocab_size, match_vocab)
        stages.check_seq_len(cfg, rm_data.seq_len)
        optimizer = stages.build_optimizer(loop_cfg.train_steps)
        if freeze_trunk:
            optimizer = freeze_trunk_updates(optimizer)
        factory, _ = reward_state_factory(
            cfg, optimizer, mesh, rules, seed=seed, num_heads=num_heads, init_from=init_from
        )
        stages.record_model(
            run_dir_path,
            cfg,
            stage="reward_stage",
            tokenizer_path=rm_data.tokenizer_path,
            model_class="ScalarModel",
            model_kwargs={"num_heads": num_heads},
        )
        step_cfg = RewardConfig(
            num_heads=num_heads,
            bootstrap=bootstrap,
            freeze_trunk=freeze_trunk,
            grad_accum_steps=grad_accum_steps,
            ece_bins=ece_bins,
        )
        loss_hp = RewardHParams.create(label_smoothing, center_coef, margin_scale, seed)
        spec = LoopSpec(
            step_fn=functools.partial(train_step, cfg=step_cfg),
            state=factory,
            hparams=HParams.create(loss_hp, lr_scale=lr_scale, debug_nan_step=debug_nan_step),
            train_data=rm_data.train,
            eval_fn=functools.partial(eval_step, cfg=step_cfg),
            eval_data=rm_data.eval,
            summarize_eval=step_cfg.summarize_eval,
            count_tokens=_count_tokens,
            flops_per_batch=functools.partial(_flops_per_batch, cfg),
            summary_extra={
                **rm_data.summary,
                "reward/init_from": str(init_from),
                "reward/num_heads": num_heads,
                "reward/freeze_trunk": freeze_trunk,
            },
        )
        result = train_loop(spec, loop_cfg, run_dir=run_dir_path, mesh=mesh, rules=rules, seed=seed)
        if result.summary is not None:
            _finish(run_dir_path, result.summary, num_heads, normalize)
        return result


def _finish(run_dir: Path, summary: dict[str, Any], num_heads: int, normalize: bool) -> None:
    if normalize:
        write_normalization(run_dir, summary, num_heads)
        summary["reward/normalized"] = (run_dir / "reward_norm.json").exists()
        if jax.process_index() == 0:  # summary.json stays the last file written
            write_json_atomic(run_dir / "summary.json", summary)
    fmt = {k: summary.get(f"eval/{k}", float("nan")) for k in ("loss", "accuracy")}
    fmt.update({k: summary.get(f"eval/gold/{k}", float("nan")) for k in ("agreement", "ceiling")})
    log.info(
        "reward model done: %d steps, eval loss %.4f, accuracy %.3f, gold agreement %.3f "
        "(ceiling %.3f), %.1f s",
        summary["step"], fmt["loss"], fmt["accuracy"], fmt["agreement"], fmt["ceiling"],
        summary["wall_time_s"],
    )  # fmt: skip
