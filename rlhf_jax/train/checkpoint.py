"""Checkpoints: the orbax `CheckpointManager` that saves and restores a run's training state.

The run directory around the checkpoints (model.json, loading a run's parameters, the item
names) is `rlhf_jax.rundir`. A checkpoint `RUN_DIR/checkpoints/<step>/` has four items:

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
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import atomic
from rlhf_jax.models import lora
from rlhf_jax.rundir import ITEMS, MODEL_INFO, CheckpointRestoreError, load_params

log = logging.getLogger(__name__)

BAD_CHECKPOINT_DIR = "checkpoints.bad"


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
        # Orbax stores the metrics as JSON beside the checkpoint: pass only the ranking metric,
        # and only when finite (no bare NaN in a file we write; a non-finite eval cannot be the
        # best, so such a checkpoint is kept by LatestN only).
        value = (metrics or {}).get(self.best_metric) if self.best_metric else None
        value = None if value is None else float(value)
        metrics = {self.best_metric: value} if value is not None and math.isfinite(value) else None
        main = state.policy.params
        saved = lora.adapters_only(main) if self._lora_base() else main
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(saved),
            state=ocp.args.StandardSave(_without_main_params(state)),
            aux=ocp.args.StandardSave({"hparams": hparams, "rng": jax.random.key_data(rng)}),
            meta=ocp.args.JsonSave(atomic.strict(dict(meta))),  # strict JSON, as every file
        )
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
