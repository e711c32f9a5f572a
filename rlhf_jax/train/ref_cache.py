"""Reference log-probs for offline preference training: computed once, cached on disk, shared.

With `DPOConfig.reference = "precomputed"` the reference model never runs during training:
its summed completion log-probs are computed once per example, in a fixed order (no shuffle),
stored in a cache directory shared by every run of a sweep, and attached to the examples so the
shuffled train iterator carries them in every batch (`ref_chosen_logps`, `ref_rejected_logps`
[B] float32).

The cache key (`cache_key`) is the SHA-256 of a JSON record of everything the numbers depend on:

* the reference: `hash_checkpoint` (the bytes of every file of the checkpoint's `params` item,
  plus the model config and class from `model.json`) or, for a reference that exists only in
  memory, `hash_params` (the bytes, dtypes, shapes and paths of the parameters);
* the data: `hash_examples`, the hash of the tokenised examples in order (ids and completion
  starts of both sides), which already reflects the source, the tokenizer and truncation;
* the length settings: max_len, max_prompt_len, buckets and the long-prompt policy;
* `CACHE_VERSION`, bumped whenever the way log-probs are computed changes.

Files: `<dir>/<key>.npz` (arrays `chosen`, `rejected`) and `<dir>/<key>.json` (the key's
components, for people). Both are written to a temporary name and renamed into place, so a
reader sees a whole file or none; the `.npz` is written last and its presence means "done". On
one host, concurrent runs of a sweep serialise on `<dir>/<key>.lock` so only the first one
computes; with several processes the cache is used only when every process can read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax import atomic, partitioning, paths
from rlhf_jax.data.batching import BatchIterator
from rlhf_jax.data.examples import TokenizedDataset
from rlhf_jax.models import ModelConfig
from rlhf_jax.rundir import CHECKPOINT_DIR, MODEL_INFO, load_params, resolve_run_dir
from rlhf_jax.steps.dpo import REF_FIELDS, pair_sequence_logps
from rlhf_jax.steps.state import StateFactory
from rlhf_jax.train.stage import StageContext, StageData

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# None: `paths.cache_dir("ref_cache")`, i.e. $RLHF_JAX_CACHE/ref_cache (~/.cache/rlhf_jax/...).
DEFAULT_CACHE_DIR = None
_EXAMPLE_FIELDS = (
    "chosen_input_ids",
    "chosen_completion_start",
    "rejected_input_ids",
    "rejected_completion_start",
)
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- fingerprints


def _update_array(h: Any, x: Any) -> None:
    arr = np.ascontiguousarray(np.asarray(x))
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())


def checkpoint_step_dir(path: str | os.PathLike) -> Path:
    """The checkpoint step folder a reference is read from: `path` itself when it is one, else
    the newest finished step of the run (orbax renames a step folder into place when done)."""
    p = Path(path)
    if p.name.isdigit() and (p / "params").is_dir():
        return p
    ckpt_dir = resolve_run_dir(p) / CHECKPOINT_DIR
    steps = [d for d in ckpt_dir.iterdir() if d.name.isdigit() and (d / "params").is_dir()]
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint under {ckpt_dir}")
    return max(steps, key=lambda d: int(d.name))


def hash_checkpoint(step_dir: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint's parameters as files, plus the run's model description.

    Hashes every file under `<step>/params/` (relative path, size, bytes, in sorted order) and
    the `model_class`, `model_kwargs` and `model_config` of the run's model.json (the compute
    dtype changes the numbers even for equal parameters).
    """
    step_dir = Path(step_dir)
    h = hashlib.sha256(b"checkpoint-v1")
    params_dir = step_dir / "params"
    for f in sorted(p for p in params_dir.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(params_dir).as_posix()}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    info = json.loads((resolve_run_dir(step_dir) / MODEL_INFO).read_text())
    model = {k: info.get(k) for k in ("model_class", "model_kwargs", "model_config")}
    h.update(json.dumps(model, sort_keys=True).encode())
    return h.hexdigest()


def _host_array(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hash_params(params: Any, model: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of a parameter pytree's leaves (path, dtype, shape, bytes) and `model`."""
    h = hashlib.sha256(b"params-v1")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        _update_array(h, _host_array(leaf))
    h.update(json.dumps(model or {}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def hash_examples(examples: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of tokenised preference rows, in order (ids and completion starts)."""
    h = hashlib.sha256(f"examples-v1:{len(examples)}".encode())
    for row in examples:
        for field in _EXAMPLE_FIELDS:
            _update_array(h, row[field])
    return h.hexdigest()


def cache_key(
    *, reference: str, data: str, lengths: Mapping[str, Any], extra: Mapping | None = None
) -> str:
    """The cache key: SHA-256 of the JSON record of all components (see the module doc)."""
    record = {
        "version": CACHE_VERSION,
        "reference": reference,
        "data": data,
        "lengths": dict(lengths),
        "extra": dict(extra or {}),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=list).encode()).hexdigest()


# ----------------------------------------------------------------------------- the cache


@dataclasses.dataclass
class ReferenceLogps:
    """Per-example reference log-probs (float32 [N], in example order) and where they came
    from: `hit` is True when read from the cache, False when computed by this call."""

    chosen: np.ndarray
    rejected: np.ndarray
    key: str
    path: Path
    hit: bool


def _write_atomic(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ReferenceCache:
    """A directory of cached reference log-probs, one `<key>.npz` per (reference, data,
    lengths) combination."""

    def __init__(self, directory: str | os.PathLike = DEFAULT_CACHE_DIR):
        self.directory = Path(directory).expanduser().absolute()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(self, key: str, num_examples: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The cached arrays, or None when absent, unreadable or of the wrong size."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                chosen, rejected = z["chosen"].astype(np.float32), z["rejected"].astype(np.float32)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable reference cache %s: %s", path, e)
            return None
        if chosen.shape != (num_examples,) or rejected.shape != (num_examples,):
            log.warning(
                "ignoring reference cache %s: %s rows for %d examples",
                path,
                chosen.shape,
                num_examples,
            )
            return None
        return chosen, rejected

    def save(self, key: str, chosen: np.ndarray, rejected: np.ndarray, meta: Mapping) -> Path:
        """Writes `<key>.json` then `<key>.npz`, each atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        record = atomic.dumps({"key": key, **meta}, indent=2, sort_keys=True, default=str)
        _write_atomic(self.directory / f"{key}.json", lambda f: f.write(record.encode()))
        arrays = {
            "chosen": np.asarray(chosen, np.float32),
            "rejected": np.asarray(rejected, np.float32),
        }
        _write_atomic(self.path(key), lambda f: np.savez(f, **arrays))
        return self.path(key)

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        if jax.process_count() > 1:  # all processes compute together; no host lock
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            # The lock file goes once the entry is settled: a waiter that still holds the old
            # file finds the entry and reads it, so nothing is computed twice in practice.
            (self.directory / f"{key}.lock").unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def get_or_compute(
        self,
        key: str,
        compute: Callable[[], tuple[np.ndarray, np.ndarray]],
        *,
        num_examples: int,
        meta: Mapping[str, Any] | None = None,
    ) -> ReferenceLogps:
        """Reads `key` from the cache, or runs `compute()` and stores its result."""
        with self._lock(key):
            loaded = self.load(key, num_examples)
            ok = loaded is not None
            if jax.process_count() > 1:  # a hit only if every process can read the file
                ok = bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
            if ok:
                log.info("reference log-probs: cache hit %s", self.path(key))
                return ReferenceLogps(*loaded, key=key, path=self.path(key), hit=True)
            log.info("reference log-probs: cache miss, computing %d examples", num_examples)
            chosen, rejected = compute()
            if chosen.shape != (num_examples,) or rejected.shape != (num_examples,):
                raise ValueError(f"computed {chosen.shape} log-probs for {num_examples} examples")
            if jax.process_index() == 0:
                self.save(key, chosen, rejected, dict(meta or {}, num_examples=num_examples))
                log.info("reference log-probs: cached in %s", self.path(key))
            return ReferenceLogps(chosen, rejected, key=key, path=self.path(key), hit=False)


# ----------------------------------------------------------------------------- computing


@functools.lru_cache(maxsize=4)
def _jitted_logps(graphdef: nnx.GraphDef, chunk_size: int, mesh: Mesh) -> Callable:
    """One compiled reference forward per model, shared by the splits of a run."""
    rep = NamedSharding(mesh, PartitionSpec())

    def logps(params, batch):
        logps_B2, _ = pair_sequence_logps(graphdef, params, batch, chunk_size)
        return logps_B2, batch["valid"]

    return jax.jit(logps, out_shardings=(rep, rep))


def compute_reference_logps(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    examples: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    buckets: Sequence[int],
    mesh: Mesh,
    rules,
    chunk_size: int = 128,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-probs of every example under (graphdef, params), in order.

    Runs the same `pair_sequence_logps` as the training step over the examples in their
    stored order (`BatchIterator.for_eval`: no shuffle, last batch padded); each process feeds
    its rows and every process receives all results.

    Returns:
      `(chosen [N], rejected [N])` float32.
    """
    it = BatchIterator.for_eval(
        examples,
        batch_size,
        buckets,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    jlogps = _jitted_logps(graphdef, chunk_size, mesh)
    out = []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        for local in it:
            logps_B2, valid_B = jlogps(params, partitioning.make_global_batch(local, mesh))
            out.append(np.asarray(logps_B2)[np.asarray(valid_B) > 0])
    all_N2 = np.concatenate(out).astype(np.float32)
    if len(all_N2) != len(examples):
        raise RuntimeError(f"computed {len(all_N2)} reference log-probs for {len(examples)} rows")
    return all_N2[:, 0], all_N2[:, 1]


# ----------------------------------------------------------------------------- attaching


def attach_reference_logps(
    examples: TokenizedDataset, chosen: np.ndarray, rejected: np.ndarray
) -> TokenizedDataset:
    """A copy of `examples` whose rows also hold `ref_chosen_logps` / `ref_rejected_logps`."""
    if len(chosen) != len(examples) or len(rejected) != len(examples):
        raise ValueError(f"{len(chosen)} reference log-probs for {len(examples)} examples")
    rows = [
        {**row, REF_FIELDS[0]: float(c), REF_FIELDS[1]: float(r)}
        for row, c, r in zip(examples.rows, chosen, rejected, strict=True)
    ]
    return examples.with_rows(rows)


def collate_with_reference(examples: TokenizedDataset) -> Callable:
    """The examples' collate function, plus the reference fields as [B] float32 (0 on padding)."""

    def collate(rows: Sequence[dict | None], length: int) -> dict[str, np.ndarray]:
        batch = examples.collate(rows, length)
        for field in REF_FIELDS:
            batch[field] = np.asarray([0.0 if r is None else r[field] for r in rows], np.float32)
        return batch

    return collate


def with_reference(it: BatchIterator, chosen: np.ndarray, rejected: np.ndarray) -> BatchIterator:
    """A `BatchIterator` with the settings of `it` whose batches carry the reference fields.

    Raises:
      TypeError: `it` does not iterate a `TokenizedDataset` of preference rows.
    """
    examples = getattr(it, "examples", None)
    if not isinstance(examples, TokenizedDataset) or examples.kind != "preference":
        raise TypeError(
            "precomputed reference log-probs need a BatchIterator over preference examples "
            f"(make_preference_iterator), got {type(it).__name__}"
        )
    attached = attach_reference_logps(examples, chosen, rejected)
    return BatchIterator(
        attached,
        it.batch_size,
        it.buckets,
        it.seed,
        collate_fn=collate_with_reference(attached),
        shuffle=it.shuffle,
        drop_last=it.drop_last,
        process_index=it.process_index,
        process_count=it.process_count,
        repeat=it.repeat,
    )


def length_settings(
    buckets: Sequence[int], max_len: int | None, max_prompt_len: int | None, on_long_prompt: str
) -> dict[str, Any]:
    """The length settings of preference pairs as they enter the cache key (defaults filled)."""
    top = max(buckets)
    max_len = top if max_len is None else max_len
    return {
        "max_len": max_len,
        "max_prompt_len": max_len // 2 if max_prompt_len is None else max_prompt_len,
        "buckets": sorted(int(b) for b in buckets),
        "on_long_prompt": on_long_prompt,
    }


def precompute_reference(
    splits: dict[str, BatchIterator],
    *,
    cache_dir: str,
    lengths: dict[str, Any],
    init_from: str | None,
    fresh_params: Callable[[], Any],
    graphdef: Any,
    model_cfg: ModelConfig,
    batch_size: int,
    mesh,
    rules,
    chunk_size: int,
) -> tuple[dict[str, BatchIterator], dict[str, Any]]:
    """Attaches cached (or newly computed) reference log-probs to each split's iterator.

    The reference is the checkpoint `init_from` (hashed as files; loaded only on a cache miss)
    or, without one, the freshly initialised policy (`fresh_params()`, hashed as bytes with
    `model_cfg`).

    Returns:
      The wrapped iterators, and summary entries `ref_cache/hit` (every split read from the
      cache) and `ref_cache/<split>_key`.
    """
    cache = ReferenceCache(cache_dir)
    loaded: dict[str, Any] = {}

    if init_from is not None:
        step_dir = checkpoint_step_dir(init_from)
        fingerprint = hash_checkpoint(step_dir)

        def reference_params():
            if "params" not in loaded:
                ref = load_params(init_from, mesh=mesh, rules=rules, step=int(step_dir.name))
                loaded["params"], loaded["graphdef"] = ref.params, ref.graphdef
            return loaded["graphdef"], loaded["params"]
    else:
        loaded["params"], loaded["graphdef"] = fresh_params(), graphdef
        model = {"model_config": dataclasses.asdict(model_cfg)}
        fingerprint = hash_params(loaded["params"], model)

        def reference_params():
            return loaded["graphdef"], loaded["params"]

    out, info, hits = {}, {}, []
    for name, it in splits.items():
        data_hash = hash_examples(it.examples)
        key = cache_key(reference=fingerprint, data=data_hash, lengths=lengths)

        def compute(examples=it.examples):
            g, p = reference_params()
            return compute_reference_logps(
                g, p, examples, batch_size=batch_size, buckets=lengths["buckets"],
                mesh=mesh, rules=rules, chunk_size=chunk_size,
            )  # fmt: skip

        meta = {"reference": fingerprint, "reference_path": str(init_from), "data": data_hash,
                "lengths": lengths, "split": name}  # fmt: skip
        entry = cache.get_or_compute(key, compute, num_examples=len(it.examples), meta=meta)
        out[name] = with_reference(it, entry.chosen, entry.rejected)
        info[f"ref_cache/{name}_key"] = key
        hits.append(entry.hit)
    info["ref_cache/hit"] = all(hits)
    return out, info


def precompute_stage_reference(
    data: StageData,
    ctx: StageContext,
    cfg: ModelConfig,
    factory: StateFactory,
    *,
    cache_dir: str | None,
    lengths: dict[str, Any],
    chunk_size: int,
) -> StageData:
    """A stage's data with reference log-probs attached to its splits (`precompute_reference`):
    the reference is the stage's `init_from` or, without one, its freshly initialised policy.

    Args:
      data: the stage's data (preference-pair iterators).
      ctx, cfg, factory: the stage's context, model config and state factory.
      cache_dir: the cache directory (None: `$RLHF_JAX_CACHE/ref_cache`).
      lengths: the length settings (`length_settings`), part of the cache key.
      chunk_size: positions per chunk of the log-prob computation.
    """
    splits = {"train": data.train, **({"eval": data.eval} if data.eval is not None else {})}
    splits, info = precompute_reference(
        splits, cache_dir=cache_dir or paths.cache_dir("ref_cache"), lengths=lengths,
        init_from=ctx.init_from, fresh_params=lambda: factory.init().policy.params,
        graphdef=factory.abstract.policy.graphdef, model_cfg=cfg, batch_size=ctx.batch_size,
        mesh=ctx.mesh, rules=ctx.rules, chunk_size=chunk_size,
    )  # fmt: skip
    return dataclasses.replace(data, train=splits["train"], eval=splits.get("eval"),
                               summary={**data.summary, **info})  # fmt: skip
