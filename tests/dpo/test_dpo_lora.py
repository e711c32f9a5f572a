"""A LoRA DPO run (gin/algorithms/lora.gin) on the tiny SFT policy: only the adapters change,
only they get optimiser state, the reference is exactly the base model (the policy with its
adapters off), and `rlhf-jax export` merges the adapters into a plain checkpoint."""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import QUIET_RUN

from rlhf_jax import cli
from rlhf_jax.models import lora
from rlhf_jax.models.param_paths import by_path
from rlhf_jax.rundir import load_params


def _flat(params):
    return {k: np.asarray(v.get_value()) for k, v in by_path(params).items()}


@pytest.fixture(scope="module")
def lora_run(sft_run, reviews, tmp_path_factory):
    _, prefs, _ = reviews
    run = tmp_path_factory.mktemp("lora") / "dpo"
    gin.clear_config()
    argv = [
        "train",
        "--gin_file", "gin/experiments/dpo_reviews_tiny.gin",
        "--gin_file", "gin/algorithms/lora.gin",
        f"--gin.RUN_DIR={run}",
        f"--gin.SFT_RUN={sft_run}",
        f"--gin.PREFERENCES={prefs}",
        "--gin.REFERENCE='params'",
        "--gin.LORA_RANK=4",
        "--gin.LORA_DROPOUT=0.1",
        "--gin.LORA_TARGETS=('attn/w[qv]$', 'mlp/wo$')",
        "--gin.TRAIN_STEPS=3",
        "--gin.BATCH_SIZE=16",
        "--gin.BUCKETS=(48,)",
        "--gin.LEARNING_RATE=1e-2",
        *QUIET_RUN,
    ]  # fmt: skip
    assert cli.main(argv) == 0
    gin.clear_config()
    # Resuming restores the adapters from the run and the base from the SFT run.
    assert cli.main([*argv, "--gin.TRAIN_STEPS=4"]) == 0
    gin.clear_config()
    return run


def _array_bytes(item):
    """Bytes of the arrays saved in one orbax checkpoint item (from its metadata: shapes and
    dtypes), so the measure is the saved tree's, not the varying size of orbax's files."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(item.absolute()).item_metadata
    leaves = jax.tree_util.tree_leaves(meta, is_leaf=lambda x: hasattr(x, "shape"))
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)


def _dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _newest(run):
    step = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    return run / "checkpoints" / str(step)


def test_checkpoint_holds_adapters_only(lora_run, sft_run):
    import json

    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["step"] == 4
    ckpt, base = _newest(lora_run), _newest(sft_run)
    tuned = _flat(load_params(lora_run).params)
    adapter_bytes = sum(v.nbytes for k, v in tuned.items() if lora.is_adapter(k))
    params_bytes, state_bytes = _array_bytes(ckpt / "params"), _array_bytes(ckpt / "state")
    base_bytes, base_state = _array_bytes(base / "params"), _array_bytes(base / "state")
    print(f"LoRA checkpoint arrays: params {params_bytes} B, state {state_bytes} B (on disk "
          f"{_dir_bytes(ckpt / 'params')} B, {_dir_bytes(ckpt / 'state')} B); the SFT "
          f"checkpoint's: params {base_bytes} B, state {base_state} B")  # fmt: skip
    # The saved parameters are the adapters, nothing else; the optimiser state holds their
    # moments (Adam: two per adapter, plus a few scalars), none for the frozen base.
    assert params_bytes == adapter_bytes
    assert adapter_bytes < base_bytes / 30
    assert state_bytes < 3 * adapter_bytes
    assert state_bytes < base_state / 10


def test_only_adapters_change(lora_run, sft_run):
    base, tuned = _flat(load_params(sft_run).params), _flat(load_params(lora_run).params)
    adapters = {k for k in tuned if lora.is_adapter(k)}
    assert adapters and set(tuned) - adapters == set(base)
    for k in base:
        np.testing.assert_array_equal(tuned[k], base[k], err_msg=k)
    assert all(np.abs(tuned[k]).max() > 0 for k in adapters if k.endswith("_lora_b"))


def test_reference_is_the_base_model(lora_run, sft_run):
    base, tuned = load_params(sft_run), load_params(lora_run)
    ids = jnp.asarray(np.random.default_rng(0).integers(4, 200, (4, 16)), jnp.int32)
    mask = jnp.ones_like(ids)

    def logps(graphdef, params):
        logits = nnx.merge(graphdef, params)(ids, mask)[:, :-1]
        token = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ids[:, 1:, None], -1)
        return token[..., 0].sum(-1)

    want = logps(base.graphdef, base.params)
    off = logps(tuned.graphdef, lora.without_adapters(tuned.params))
    np.testing.assert_allclose(np.asarray(off), np.asarray(want), atol=1e-5, rtol=0)
    on = logps(tuned.graphdef, tuned.params)
    assert np.abs(np.asarray(on) - np.asarray(want)).max() > 1e-4


def test_export_merges_adapters(lora_run, tmp_path):
    import torch
    import transformers

    assert cli.main(["export", str(lora_run), str(tmp_path / "hf"), "--log_level=WARNING"]) == 0
    tuned = load_params(lora_run)
    ids = np.random.default_rng(1).integers(4, 200, (2, 12))
    want = np.asarray(nnx.merge(tuned.graphdef, tuned.params)(jnp.asarray(ids, jnp.int32)))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    with torch.no_grad():
        got = theirs(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
