"""The run directory: the files that training writes and later stages read.

```
RUN_DIR/model.json        the model, its tokenizer and the stage (`write_model_info`): the run's
                          identity (`check_run_identity`) and how to rebuild its model
RUN_DIR/config.gin        the gin config that ran (`write_config`)
RUN_DIR/samples.jsonl     generations with their scores (`samples_path`)
RUN_DIR/checkpoints/      orbax checkpoints (`train.checkpoint.Checkpointer` writes them;
                          `load_params` reads a run's parameters from them)
```

Evaluation, reward scoring, generation and later stages find and load runs through this module
only; the orbax manager that saves training state is `train/checkpoint.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import gin
import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax import atomic, partitioning
from rlhf_jax.errors import RunDirMismatchError, UserError
from rlhf_jax.models import ModelConfig, ScalarModel, Transformer, lora
from rlhf_jax.steps.state import abstract_with_shardings

log = logging.getLogger(__name__)

CONFIG_FILE = "config.gin"
CHECKPOINT_DIR = "checkpoints"
MODEL_INFO = "model.json"
SAMPLES_FILE = "samples.jsonl"
# The items of every checkpoint (see `train.checkpoint`); `load_params` reads "params" alone.
ITEMS = ("params", "state", "aux", "meta")
MODEL_CLASSES = {"Transformer": Transformer, "ScalarModel": ScalarModel}


class CheckpointRestoreError(UserError):
    """No checkpoint in a directory could be restored (a user error: exit 2 in the CLI)."""


class NotARunDirError(UserError):
    """A path that should be a run directory (of the right kind) is not one."""


def samples_path(run_dir: str | os.PathLike) -> Path:
    """Where a policy's evaluation samples go: RUN_DIR/samples.jsonl."""
    return Path(run_dir) / SAMPLES_FILE


def enclosing_run_dir(path: str | os.PathLike) -> Path | None:
    """The run directory (a folder with model.json) that holds `path`, if any."""
    p = Path(path).absolute()
    for d in (p, *p.parents):
        if (d / MODEL_INFO).is_file():
            return d
    return None


def write_config(run_dir: str | os.PathLike, operative: bool = False) -> Path:
    """Writes gin's config to RUN_DIR/config.gin, atomically.

    Args:
      run_dir: the run directory (created if missing).
      operative: only the bindings the run used (`gin.operative_config_str`), written at the
        end of a run; otherwise everything parsed, written at its start.
    """
    text = gin.operative_config_str() if operative else gin.config_str()
    return atomic.write_text(Path(run_dir) / CONFIG_FILE, text)


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
