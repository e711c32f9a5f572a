"""Checkpoints: round trip, retention (last K and best), interrupted and corrupted saves, no
non-finite parameters on disk, a different mesh on restore, and `load_params`."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import partitioning as P
from rlhf_jax.models import model_config
from rlhf_jax.rundir import (
    CheckpointRestoreError,
    NotARunDirError,
    load_params,
    read_model_info,
    write_model_info,
)
from rlhf_jax.steps.algorithm import HParams
from rlhf_jax.train.checkpoint import BAD_CHECKPOINT_DIR, Checkpointer
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.stages import model_state_factory

CFG = model_config(
    "tiny", vocab_size=48, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=16
)
HP = HParams.create(lr_scale=0.5, debug_nan_step=-1)


def _with_params(state, params):
    return state.with_model("policy", state.policy.replace(params=params))


def _factory(mesh_shape, n_devices):
    mesh = P.make_mesh(mesh_shape, jax.devices()[:n_devices])
    rules = P.logical_rules()
    optimizer = make_optimizer(schedule="constant")
    factory, _ = model_state_factory(CFG, optimizer, mesh, rules, seed=0)
    return mesh, rules, factory


@pytest.fixture(scope="module")
def sharded():
    """A (2,2,2)-mesh state whose parameters are not the init (so restores are checked)."""
    mesh, rules, factory = _factory((2, 2, 2), 8)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = factory.init()
        params = jax.tree.map(lambda x: x + 0.25, state.policy.params)
        state = _with_params(state, params).replace(step=jnp.asarray(7, jnp.int32))
    return mesh, rules, factory, state


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _save(ckpt, step, state, metrics=None, meta=None):
    meta = meta or {"data": {"i": step}}
    ok = ckpt.save(step, state, hparams=HP, rng=jax.random.key(3), meta=meta, metrics=metrics)
    ckpt.wait()
    return ok


def _restore(ckpt, mesh, factory):
    with jax.set_mesh(mesh):
        return ckpt.restore(factory.abstract, HP, jax.random.key(0), mesh)


def test_round_trip(tmp_path, sharded):
    mesh, _, factory, state = sharded
    ckpt = Checkpointer(tmp_path / "ck")
    assert _save(ckpt, 7, state, meta={"data": {"index": 7}, "extra": {"kl": 0.1}})
    r = _restore(ckpt, mesh, factory)
    ckpt.close()
    assert r.step == 7 and int(r.state.step) == 7
    assert r.meta["data"] == {"index": 7} and r.meta["extra"] == {"kl": 0.1}
    assert float(r.hparams.update.lr_scale) == 0.5
    np.testing.assert_array_equal(
        jax.random.key_data(r.rng), jax.random.key_data(jax.random.key(3))
    )
    for a, b in zip(_leaves(state), _leaves(r.state), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(state.policy.params), jax.tree.leaves(r.state.policy.params), strict=True
    ):
        assert a.sharding == b.sharding


def test_keeps_last_k_and_best(tmp_path, sharded):
    _, _, _, state = sharded
    ckpt = Checkpointer(tmp_path / "ck", keep_last=2, keep_best=1, best_metric="eval/loss")
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 7.0}  # best is step 2
    for step, loss in losses.items():
        _save(ckpt, step, state, metrics={"eval/loss": loss, "train/loss": 0.0})
    _save(ckpt, 7, state)  # no eval metric: kept by recency only
    assert ckpt.steps == [2, 6, 7]
    ckpt.close()


def _reject_constant(name):
    raise ValueError(f"non-strict JSON constant {name}")


def test_nonfinite_eval_metric_is_never_best_and_all_json_is_strict(tmp_path, sharded):
    """Orbax writes the ranking metrics beside each checkpoint: no bare NaN/Infinity there, and
    a checkpoint whose eval metric is not finite is kept by recency only, never as the best."""
    _, _, _, state = sharded
    ckpt = Checkpointer(tmp_path / "ck", keep_last=1, keep_best=1, best_metric="eval/loss")
    for step, loss in {1: 2.0, 2: float("nan"), 3: float("-inf"), 4: 3.0}.items():
        _save(ckpt, step, state, metrics={"eval/loss": loss, "train/loss": float("inf")})
    assert ckpt.steps == [1, 4]  # 1: best finite loss, 4: newest
    ckpt.close()
    checked = 0
    for path in (tmp_path / "ck").rglob("*"):
        if not path.is_file() or path.stat().st_size > 1_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # array data
        if text.lstrip().startswith(("{", "[")):
            json.loads(text, parse_constant=_reject_constant)
            checked += 1
    assert checked >= 4  # metrics and metadata of both kept checkpoints were parsed


def test_interrupted_save_is_never_restored(tmp_path, sharded):
    mesh, _, factory, state = sharded
    ckpt = Checkpointer(tmp_path / "ck")
    _save(ckpt, 4, state)
    ckpt.close()
    # A save killed mid-way leaves orbax's temporary folder behind.
    tmp = tmp_path / "ck" / "8.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "ck" / "4", tmp)
    (tmp / "commit_success.txt").unlink(missing_ok=True)
    ckpt = Checkpointer(tmp_path / "ck")
    assert ckpt.steps == [4]
    assert _restore(ckpt, mesh, factory).step == 4
    ckpt.close()
    assert not tmp.exists()  # cleaned up when the manager opened


@pytest.mark.parametrize("damage", ["truncate_array_file", "remove_item"])
def test_corrupted_latest_falls_back_to_previous(tmp_path, sharded, damage):
    mesh, _, factory, state = sharded
    ckpt = Checkpointer(tmp_path / "ck", keep_last=3)
    _save(ckpt, 4, state)
    newer = _with_params(state, jax.tree.map(lambda x: x * 2, state.policy.params))
    _save(ckpt, 8, newer)
    ckpt.close()
    step_dir = tmp_path / "ck" / "8"
    if damage == "remove_item":
        shutil.rmtree(step_dir / "params")
    else:
        files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and "d" in p.parts]
        assert files, list((step_dir / "params").rglob("*"))
        for f in files:
            f.write_bytes(f.read_bytes()[:7])
    ckpt = Checkpointer(tmp_path / "ck", keep_last=3)
    r = _restore(ckpt, mesh, factory)
    assert r.step == 4
    for a, b in zip(_leaves(state.policy.params), _leaves(r.state.policy.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ckpt.steps == [4]  # the bad one moved aside, so step 8 can be saved again
    assert list((tmp_path / BAD_CHECKPOINT_DIR).iterdir())
    assert _save(ckpt, 8, newer)
    ckpt.close()


def test_all_corrupted_raises_instead_of_starting_over(tmp_path, sharded):
    mesh, _, factory, state = sharded
    ckpt = Checkpointer(tmp_path / "ck")
    _save(ckpt, 4, state)
    ckpt.close()
    shutil.rmtree(tmp_path / "ck" / "4" / "state")
    ckpt = Checkpointer(tmp_path / "ck")
    with pytest.raises(CheckpointRestoreError, match="step 4"):
        _restore(ckpt, mesh, factory)
    ckpt.close()


def test_nonfinite_params_are_never_saved(tmp_path, sharded):
    _, _, _, state = sharded
    bad = _with_params(
        state, jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan), state.policy.params)
    )
    ckpt = Checkpointer(tmp_path / "ck")
    assert not _save(ckpt, 3, bad)
    assert ckpt.steps == []
    ckpt.close()


def test_restore_on_a_different_mesh_and_load_params(tmp_path, sharded):
    _, _, _, state = sharded
    run_dir = tmp_path / "run"
    write_model_info(run_dir, CFG, tokenizer_path=str(tmp_path / "tok.json"))
    ckpt = Checkpointer(run_dir / "checkpoints")
    _save(ckpt, 7, state)
    ckpt.close()
    # The whole train state, saved on (2,2,2) over 8 devices, restored on 1 device.
    mesh1, _, factory1 = _factory((1, 1, 1), 1)
    ckpt = Checkpointer(run_dir / "checkpoints")
    r = _restore(ckpt, mesh1, factory1)
    ckpt.close()
    for a, b in zip(_leaves(state), _leaves(r.state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(r.state))
    # load_params from the run dir, its checkpoints dir and a step dir.
    info = read_model_info(run_dir)
    assert info["model_config"] == CFG and info["tokenizer"].endswith("tok.json")
    rules = P.logical_rules()
    for path in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "7"):
        loaded = load_params(path, mesh=mesh1, rules=rules)
        assert loaded.step == 7 and loaded.config == CFG
        for a, b in zip(_leaves(state.policy.params), _leaves(loaded.params), strict=True):
            np.testing.assert_array_equal(a, b)
    model = nnx.merge(loaded.graphdef, loaded.params)
    assert model.cfg == CFG
    with pytest.raises(NotARunDirError, match="neither a run directory"):
        load_params(tmp_path)
    assert json.loads((run_dir / "model.json").read_text())["model_class"] == "Transformer"
