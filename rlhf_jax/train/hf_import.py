"""Hugging Face model directories as starting points of training stages, and `rlhf-jax export`.

Every stage starts from a run directory (`init_from` / `SFT_RUN`: its model.json names the model
and tokenizer, its checkpoint holds the parameters). `hf_import_run` (gin:
`INIT_FROM = @hf_import_run()`, set up by gin/models/hf.gin) turns an HF directory into such a
run once: the parameters are loaded shard by shard (`models.hf.load_pretrained`) and saved as an
orbax checkpoint in a cache folder keyed by the source files, and model.json points at the HF
directory's own tokenizer.json (with its tokenizer_config.json and chat template). Later runs
on the same checkpoint reuse the cached run, and the DPO reference cache sees the same
checkpoint files. The stages themselves are untouched.

`export_run` is the inverse for any run directory (policy or reward model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import gin
import jax
import orbax.checkpoint as ocp
from flax import nnx

from rlhf_jax import partitioning
from rlhf_jax.models import ScalarModel, hf
from rlhf_jax.rundir import (
    CHECKPOINT_DIR,
    ITEMS,
    MODEL_INFO,
    load_params,
    read_model_info,
    write_model_info,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "runs/hf_import"


def _source_key(path: Path, dtype: str | None) -> str:
    """Identifies an HF checkpoint by its config and its weight files' names, sizes and
    modification times (hashing the bytes of a large model would cost a full read)."""
    h = hashlib.sha256(b"hf-import-v1")
    h.update(str(path.resolve()).encode())
    h.update((path / "config.json").read_bytes())
    h.update(str(dtype).encode())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@gin.configurable
def hf_import_run(
    path: str = gin.REQUIRED,
    cache_dir: str = DEFAULT_CACHE_DIR,
    dtype: str | None = None,
) -> str:
    """A run directory holding the HF checkpoint `path` (imported once, then reused).

    Args:
      path: a local Hugging Face model directory (config.json, safetensors, tokenizer.json).
      cache_dir: where imported runs live (`<cache_dir>/<name>-<key>`).
      dtype: parameter dtype of the import (default: the checkpoint's).

    Returns:
      The run directory, for `init_from` / `SFT_RUN`.
    """
    src = Path(path).expanduser()
    hf_cfg = hf.read_hf_config(src)
    out = Path(cache_dir) / f"{src.resolve().name}-{_source_key(src, dtype)}"
    if (out / MODEL_INFO).is_file():
        log.info("HF checkpoint %s: reusing the import in %s", src, out)
        return str(out)
    if hf._is_reward(hf_cfg):
        raise hf.HFError(f"{src} is a reward model; stages start from a causal LM")
    mesh, rules = partitioning.make_mesh(), partitioning.logical_rules()
    cfg, model = hf.load_pretrained(src, mesh=mesh, rules=rules, dtype=dtype)
    if jax.process_index() == 0 and out.exists():  # an interrupted earlier import
        shutil.rmtree(out)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(
        (out / CHECKPOINT_DIR).absolute(), options=options, item_names=ITEMS
    ) as mgr:
        mgr.save(
            0, args=ocp.args.Composite(params=ocp.args.StandardSave(nnx.state(model, nnx.Param)))
        )
        mgr.wait_until_finished()
    tok = src / "tokenizer.json"
    # model.json last: its presence means the import is complete.
    write_model_info(out, cfg, tokenizer_path=str(tok) if tok.is_file() else None)
    if jax.process_index() == 0:
        (out / "source.json").write_text(json.dumps({"hf_path": str(src.resolve())}, indent=2))
    log.info("HF checkpoint %s imported into %s", src, out)
    return str(out)


def _check_export_target(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Refuses an OUT_DIR that would replace a run (the exported one or another), even with
    --overwrite, which is meant for an earlier export."""
    out = Path(out_dir).expanduser().absolute()
    src = Path(run_dir).expanduser().absolute()
    if out == src or out in src.parents or src in out.parents:
        raise hf.HFError(f"OUT_DIR {out} overlaps the exported run {src}: choose another folder")
    for p in (out, *out.parents):
        if (p / "model.json").is_file():
            raise hf.HFError(
                f"OUT_DIR {out} is {'' if p == out else 'inside '}the run directory {p}: "
                "choose another folder (--overwrite only replaces an earlier export)"
            )


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    overwrite: bool = False,
    peft: bool = False,
) -> Path:
    """Writes a run's model (policy or reward model) as a Hugging Face directory.

    A LoRA run exports with its adapters merged into a plain checkpoint, or, with `peft`, as
    the adapters alone in PEFT's format (adapter_config.json + adapter_model.safetensors, with
    `base_model_name_or_path` the HF directory the base came from when the run started from
    one).

    Args:
      run_dir: a run directory, its checkpoints/ folder or one checkpoint step folder.
      out_dir: the HF directory to write (`transformers` loads it with
        `AutoModelForCausalLM` or, for a reward model, `AutoModelForSequenceClassification`).
      step: which checkpoint (default: the newest that restores).
      overwrite: replace a non-empty `out_dir`.
      peft: write a LoRA run's adapters in PEFT's format instead of a merged checkpoint.

    Returns:
      `out_dir`.
    """
    from rlhf_jax.data.tokenizer import Tokenizer

    # Shard the parameters over every device (fsdp), then gather one tensor at a time.
    mesh = partitioning.make_mesh((1, -1, 1))
    loaded = load_params(run_dir, mesh=mesh, step=step)  # a user error if not a run
    _check_export_target(loaded.run_dir, out_dir)  # before anything is written
    model = nnx.merge(loaded.graphdef, loaded.params)
    info = read_model_info(loaded.run_dir)
    tok = Tokenizer.from_file(info["tokenizer"]) if info.get("tokenizer") else None
    kind = "reward model" if isinstance(model, ScalarModel) else "policy"
    if peft:
        if not loaded.config.lora_rank:
            raise hf.HFError(f"{loaded.run_dir} is not a LoRA run: nothing to export as PEFT")
        out = Path(out_dir)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise hf.HFError(f"{out} exists and is not empty (--overwrite replaces it)")
        base = info.get("lora_base")
        source = Path(base) / "source.json" if base else None
        if source is not None and source.is_file():
            base = json.loads(source.read_text())["hf_path"]
        return hf.save_peft(model, loaded.config, out, base_model=base)
    out = hf.save_pretrained(model, loaded.config, out_dir, tokenizer=tok, overwrite=overwrite)
    log.info("exported the %s of %s (step %d) to %s", kind, loaded.run_dir, loaded.step, out)
    return out


def export_command(
    run_dir: str,
    out_dir: str,
    *,
    step: int | None = None,
    overwrite: bool = False,
    peft: bool = False,
) -> Path:
    """`rlhf-jax export RUN_DIR OUT_DIR`: `export_run` with bad paths and files reported as
    user errors (exit code 2, one message)."""
    from rlhf_jax.data.errors import TokenizerError
    from rlhf_jax.errors import GinConfigError
    from rlhf_jax.rundir import CheckpointRestoreError

    try:
        return export_run(run_dir, out_dir, step=step, overwrite=overwrite, peft=peft)
    except (FileNotFoundError, CheckpointRestoreError, TokenizerError) as e:
        raise GinConfigError(f"export {run_dir}: {e}") from e
