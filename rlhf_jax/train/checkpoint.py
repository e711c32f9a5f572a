"""Checkpoints (orbax `CheckpointManager`), the run directory's model record, and `load_params`.

A checkpoint `RUN_DIR/checkpoints/<step>/` has four items:

- `params`: the parameters of the state's main model (`TrainState.policy`: the policy, or a
  reward-model run's reward model), alone, so other stages can load it without knowing the
  optimiser;
- `state`: the rest of the `TrainState` (step, other models, optimiser states, non-finite
  record, `extra` controller pytree). Frozen models (a DPO reference) are not in the state and
  never saved: a checkpoint holds only what training changes;
- `aux`: the traced hyperparameters and the base rng's key data;
- `meta`: JSON: the data iterator's position, host-side controller state (`extra`), the
  metrics at save time.

Retention: the last `keep_last` checkpoints AND the `keep_best` best by `best_metric` are kept.
orbax's `best_fn` alone keeps only the best N (it would drop the newest, which a resume needs),
so the manager gets an explicit `AnyPreservationPolicy([LatestN, BestN])`: a checkpoint survives
if either policy keeps it. Checkpoints saved without the metric are kept by `LatestN` only.

Atomicity: orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when
complete; leftovers of an interrupted save are deleted when the manager opens
(`cleanup_tmp_directories`) and never listed as steps. A finished checkpoint that fails to
restore (corrupted files, non-finite parameters) is moved to `RUN_DIR/checkpoints.bad/` and the
previous one is used. No checkpoint is ever written with non-finite parameters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import atomic, partitioning
from rlhf_jax.errors import RunDirMismatchError, UserError
from rlhf_jax.models import ModelConfig, ScalarModel, Transformer, lora
from rlhf_jax.steps.state import abstract_with_shardings

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BAD_CHECKPOINT_DIR = "checkpoints.bad"
MODEL_INFO = "model.json"
ITEMS = ("params", "state", "aux", "meta")
MODEL_CLASSES = {"Transformer": Transformer, "ScalarModel": ScalarModel}


class CheckpointRestoreError(UserError):
    """No checkpoint in a directory could be restored (a user error: exit 2 in the CLI)."""


class NotARunDirError(UserError):
    """A path that should be a run directory (of the right kind) is not one."""


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def all_finite(tree: Any) -> bool:
    """True when every floating-point leaf of `tree` is finite (one device round trip)."""
    return bool(_all_finite(tree))


def _without_main_params(state: Any) -> Any:
    """The state with its main model's params (saved as the `params` item) taken out."""
    return state.with_model(state.main, state.policy.replace(params=None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns."""

    step: int
    state: Any
    hparams: Any
    rng: jax.Array
    meta: dict[str, Any]


class Checkpointer:
    """Saves and restores the loop's state under `directory` (async by default).

    Args:
      directory: the checkpoints folder (RUN_DIR/checkpoints).
      keep_last: how many of the newest checkpoints to keep.
      keep_best: how many of the best (by `best_metric`) to keep as well (0: none).
      best_metric: metric name passed with `save(metrics=...)`, e.g. "eval/loss".
      best_mode: "min" or "max".
      async_save: write in the background (arrays are copied to host before `save` returns).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 2,
        keep_best: int = 1,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
    ):
        if best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric if keep_best else None
        policies = [ocp.checkpoint_managers.LatestN(n=max(keep_last, 1))]
        if self.best_metric:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[self.best_metric],
                    reverse=best_mode == "min",  # sorted so that the best come last
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = self._open()
        self._base: str | None = None

    def _lora_base(self) -> str | None:
        """The run a LoRA run's frozen base weights come from (model.json `lora_base`): its
        checkpoints then hold only the adapters, the base is read from there on restore."""
        if self._base is None:
            path = self.directory.parent / MODEL_INFO
            info = json.loads(path.read_text()) if path.exists() else {}
            self._base = info.get("lora_base") or ""
        return self._base or None

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=ITEMS)

    @property
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        *,
        hparams: Any,
        rng: jax.Array,
        meta: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Starts saving `state` at `step`; returns False (and writes nothing) when the
        parameters are not finite or this step is already saved."""
        if step in self.manager.all_steps():
            return False
        if not all_finite({k: m.params for k, m in state.models.items()}):
            log.error("not saving the checkpoint of step %d: its parameters are not finite", step)
            return False
        if not self.best_metric or not metrics or self.best_metric not in metrics:
            metrics = None  # kept by LatestN only
        main = state.policy.params
        saved = lora.adapters_only(main) if self._lora_base() else main
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(saved),
            state=ocp.args.StandardSave(_without_main_params(state)),
            aux=ocp.args.StandardSave({"hparams": hparams, "rng": jax.random.key_data(rng)}),
            meta=ocp.args.JsonSave(atomic.strict(dict(meta))),  # strict JSON, as every file
        )
        if metrics is not None:
            metrics = {k: float(v) for k, v in metrics.items()}
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(
        self,
        abstract_state: Any,
        abstract_hparams: Any,
        rng_template: jax.Array,
        mesh: Mesh,
        check_meta: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> Restored | None:
        """The newest checkpoint that restores cleanly, or None when there is none.

        Newer checkpoints that fail (unreadable, non-finite parameters, or a `meta` that
        `check_meta(step, meta)` rejects, e.g. a corrupted data-iterator position) are moved to
        `checkpoints.bad/` and the previous one is used. If checkpoints exist but none
        restores, raises `CheckpointRestoreError` (e.g. the model config changed) rather than
        starting over.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        rep = replicated(mesh)
        key_data = jax.random.key_data(rng_template)
        aux_target = {
            "hparams": jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract_hparams
            ),
            "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=rep),
        }
        errors, bad = [], []
        base_run = self._lora_base()
        main = abstract_state.policy.params
        target = lora.adapters_only(main) if base_run else main
        for step in steps:
            try:
                r = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(target),
                        state=ocp.args.StandardRestore(_without_main_params(abstract_state)),
                        aux=ocp.args.StandardRestore(aux_target),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
                if not all_finite(r.params):
                    raise ValueError("its parameters are not finite")
                if check_meta is not None:
                    check_meta(step, dict(r.meta or {}))
            except Exception as e:  # noqa: BLE001 - any failure means "try the previous one"
                log.warning("checkpoint of step %d cannot be restored (%s)", step, e)
                errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
                bad.append(step)
                continue
            if bad:
                self._quarantine(bad)
            params = r.params
            if base_run:  # adapters from here, the frozen base from the run it started from
                params = nnx.merge_state(load_params(base_run, mesh=mesh).params, params)
            state = r.state.with_model(r.state.main, r.state.policy.replace(params=params))
            rng = jax.random.wrap_key_data(r.aux["rng"], impl=jax.random.key_impl(rng_template))
            return Restored(step, state, r.aux["hparams"], rng, dict(r.meta or {}))
        raise CheckpointRestoreError(
            f"no checkpoint under {self.directory} could be restored (a different model, data "
            "or batch size than the run was started with?): " + "; ".join(errors)
        )

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable step folders aside so later saves can reuse their step numbers."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            bad_dir = self.directory.parent / BAD_CHECKPOINT_DIR
            bad_dir.mkdir(exist_ok=True)
            for step in steps:
                src = self.directory / str(step)
                if src.exists():
                    dst = bad_dir / f"{step}-{int(time.time())}"
                    log.warning("moving unreadable checkpoint %s to %s", src, dst)
                    shutil.move(str(src), str(dst))
        self.manager.close()
        self.manager = self._open()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------- model records


def write_model_info(
    run_dir: str | os.PathLike,
    cfg: ModelConfig,
    *,
    tokenizer_path: str | None = None,
    model_class: str = "Transformer",
    model_kwargs: Mapping[str, Any] | None = None,
    stage: str | None = None,
    lora_base: str | None = None,
) -> Path:
    """Writes RUN_DIR/model.json: what a later stage needs to rebuild the model from the run
    (`model_record`); callers check `check_run_identity` first.

    `lora_base`: for a LoRA run, the run its frozen base weights come from; its checkpoints
    then hold only the adapters (and their optimiser state).
    """
    path = Path(run_dir) / MODEL_INFO
    info = model_record(
        cfg,
        tokenizer_path=tokenizer_path,
        model_class=model_class,
        model_kwargs=model_kwargs,
        stage=stage,
        lora_base=lora_base,
    )
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MODEL_INFO}.tmp")
        tmp.write_text(atomic.dumps(info, indent=2))
        os.replace(tmp, path)
    return path


def read_model_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """RUN_DIR/model.json with `model_config` turned back into a `ModelConfig`."""
    path = Path(run_dir) / MODEL_INFO
    if not path.exists():
        raise NotARunDirError(f"{path} not found: is {run_dir} a run directory?")
    try:
        info = json.loads(path.read_text())
        info["model_config"] = ModelConfig(**info["model_config"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise NotARunDirError(f"{path} is unreadable or malformed: {e}") from None
    return info


def check_model_class(run_dir: str | os.PathLike, expected: str, what: str) -> dict[str, Any]:
    """RUN_DIR/model.json, checked to hold a `expected` model ("Transformer" for a policy,
    "ScalarModel" for a reward model).

    Raises:
      NotARunDirError: no run directory there, or one of the other kind.
    """
    info = read_model_info(resolve_run_dir(run_dir))
    if info["model_class"] != expected:
        kinds = {"Transformer": "a policy run", "ScalarModel": "a reward-model run"}
        raise NotARunDirError(
            f"{what}={str(run_dir)!r} is {kinds.get(info['model_class'], info['model_class'])}, "
            f"but {kinds.get(expected, expected)} is expected here"
        )
    return info


def model_record(
    cfg: ModelConfig,
    *,
    tokenizer_path: str | None = None,
    model_class: str = "Transformer",
    model_kwargs: Mapping[str, Any] | None = None,
    stage: str | None = None,
    lora_base: str | None = None,
) -> dict[str, Any]:
    """The content of RUN_DIR/model.json: the model, its tokenizer and the stage that trains it
    (together the run's identity: a rerun must match it)."""
    if model_class not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {model_class!r}; known: {sorted(MODEL_CLASSES)}")
    record = {
        "model_class": model_class,
        "model_kwargs": dict(model_kwargs or {}),
        "model_config": dataclasses.asdict(cfg),
        "tokenizer": str(Path(tokenizer_path).absolute()) if tokenizer_path else None,
    }
    if stage is not None:
        record["stage"] = stage
    if lora_base is not None:
        record["lora_base"] = str(Path(lora_base).absolute())
    return json.loads(json.dumps(record))  # the JSON form (tuples -> lists), as stored


def _differences(stored: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(stored) | set(new)):
            out += _differences(stored.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if stored == new else [f"{prefix[:-1]}: stored {stored!r}, now {new!r}"]


def check_run_identity(run_dir: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Refuses to reuse a run directory that holds a different run.

    A run directory with checkpoints or a summary belongs to the run recorded in its
    model.json; rerunning it (to resume or extend) must ask for the same model, tokenizer and
    stage. Nothing is written here.

    Raises:
      RunDirMismatchError: naming the first differing field, before anything is written.
    """
    run_dir = Path(run_dir)
    path = run_dir / MODEL_INFO
    has_run = (run_dir / CHECKPOINT_DIR).is_dir() and any((run_dir / CHECKPOINT_DIR).iterdir())
    has_run = has_run or (run_dir / "summary.json").exists()
    if not path.exists():
        if has_run:
            raise RunDirMismatchError(
                f"{run_dir} holds checkpoints but no {MODEL_INFO}: choose another RUN_DIR"
            )
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirMismatchError(f"{path} is unreadable ({e}): choose another RUN_DIR") from None
    if not has_run:
        return  # a run that never saved anything: nothing to protect
    if "stage" not in stored:  # written before stages were recorded
        record = {k: v for k, v in record.items() if k != "stage"}
    diffs = _differences(stored, dict(record))
    if diffs:
        raise RunDirMismatchError(
            f"{run_dir} holds a different run ({diffs[0]}"
            + (f"; {len(diffs) - 1} more difference(s)" if len(diffs) > 1 else "")
            + "): rerun with its settings to resume, or choose another RUN_DIR"
        )


def abstract_model(
    model_class: str, cfg: ModelConfig, **model_kwargs
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract params) of a model, without allocating it."""
    cls = MODEL_CLASSES[model_class]
    model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), **model_kwargs))
    return nnx.graphdef(model), nnx.state(model, nnx.Param)


class LoadedModel(NamedTuple):
    """What `load_params` returns."""

    params: nnx.State
    config: ModelConfig
    graphdef: nnx.GraphDef
    tokenizer_path: str | None
    step: int
    run_dir: Path


def _resolve(path: Path, step: int | None) -> tuple[Path, Path, int | None]:
    """(run_dir, checkpoints_dir, step) from a run dir, a checkpoints dir or a step dir."""
    if not path.exists():
        raise NotARunDirError(f"{path} does not exist")
    if (path / MODEL_INFO).exists():
        return path, path / CHECKPOINT_DIR, step
    if path.name.isdigit() and (path / "params").exists():
        return path.parent.parent, path.parent, int(path.name) if step is None else step
    if (path.parent / MODEL_INFO).exists():
        return path.parent, path, step
    raise NotARunDirError(
        f"{path} is neither a run directory (with {MODEL_INFO}), its checkpoints/ folder, "
        "nor one checkpoint step folder"
    )


def resolve_run_dir(path: str | os.PathLike) -> Path:
    """The run directory behind a run, checkpoints or checkpoint-step directory."""
    return _resolve(Path(path), None)[0]


def load_params(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules=None,
    step: int | None = None,
    abstract_params: nnx.State | None = None,
) -> LoadedModel:
    """Loads a trained model's parameters, sharded for `mesh`, plus its `ModelConfig`.

    Args:
      path: a run directory, its `checkpoints/` folder, or one `checkpoints/<step>/` folder.
      mesh: target mesh (default: `partitioning.make_mesh()` as gin configures it); the mesh
        may differ from the one the checkpoint was saved on.
      rules: logical-axis rules (default: `partitioning.logical_rules()`).
      step: which checkpoint (default: the newest that restores cleanly).
      abstract_params: restore target when it is not the model that `model.json` names (e.g.
        the trunk of a reward model).

    Returns:
      `LoadedModel(params, config, graphdef, tokenizer_path, step, run_dir)`.
    """
    run_dir, ckpt_dir, step = _resolve(Path(path), step)
    info = read_model_info(run_dir)
    cfg = info["model_config"]
    mesh = mesh if mesh is not None else partitioning.make_mesh()
    rules = rules if rules is not None else partitioning.logical_rules()
    graphdef, abstract = abstract_model(info["model_class"], cfg, **info["model_kwargs"])
    if abstract_params is not None:
        abstract = abstract_params
    shardings = partitioning.state_shardings(abstract, mesh, rules)
    target = abstract_with_shardings(abstract, shardings)
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(ckpt_dir.absolute(), options=options, item_names=ITEMS) as mgr:
        candidates = [step] if step is not None else sorted(mgr.all_steps(), reverse=True)
        if not candidates:
            raise NotARunDirError(f"no checkpoints under {ckpt_dir}")
        errors = []
        base_run = info.get("lora_base") if abstract_params is None else None
        if base_run:  # a LoRA run: the checkpoint holds the adapters only
            target = lora.adapters_only(target)
        for s in candidates:
            try:
                args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
                params = mgr.restore(s, args=args).params
                if base_run:
                    base = load_params(base_run, mesh=mesh, rules=rules).params
                    params = nnx.merge_state(base, params)
                return LoadedModel(params, cfg, graphdef, info["tokenizer"], s, run_dir)
            except Exception as e:  # noqa: BLE001 - fall back to the previous checkpoint
                log.warning("cannot load params of step %d from %s: %s", s, ckpt_dir, e)
                errors.append(f"step {s}: {e}")
    raise CheckpointRestoreError(f"could not load params from {ckpt_dir}: {'; '.join(errors)}")
