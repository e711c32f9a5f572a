"""The reference-log-prob cache: what its key depends on, atomic reuse, and iterators that carry
the cached values in every (shuffled) batch, and a reference without a checkpoint."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from dpo_helpers import mesh, tiny_state

from rlhf_jax import partitioning
from rlhf_jax.data.batching import BatchIterator
from rlhf_jax.data.examples import TokenizedDataset
from rlhf_jax.models import model_config
from rlhf_jax.train import ref_cache
from rlhf_jax.train.ref_cache import (
    ReferenceCache,
    cache_key,
    checkpoint_step_dir,
    hash_checkpoint,
    hash_examples,
    hash_params,
    precompute_reference,
    with_reference,
)

LENGTHS = {"max_len": 64, "max_prompt_len": 32, "buckets": [64], "on_long_prompt": "truncate"}


def _examples(n: int = 10, seed: int = 0) -> TokenizedDataset:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        c, r = rng.integers(3, 50, size=rng.integers(4, 12)), rng.integers(3, 50, size=6)
        rows.append({"chosen_input_ids": c.astype(np.int32), "chosen_completion_start": 2,
                     "rejected_input_ids": r.astype(np.int32), "rejected_completion_start": 2,
                     "margin": 0.0})  # fmt: skip
    return TokenizedDataset("preference", rows, {}, pad_id=0)


def _fake_run(root, weights: bytes):
    (root / "checkpoints" / "7" / "params" / "d").mkdir(parents=True)
    (root / "checkpoints" / "3" / "params").mkdir(parents=True)
    (root / "checkpoints" / "7" / "params" / "d" / "blob").write_bytes(weights)
    (root / "checkpoints" / "3" / "params" / "blob").write_bytes(b"older")
    (root / "model.json").write_text(json.dumps({"model_class": "Transformer", "model_kwargs": {},
                                                 "model_config": {"d_model": 8}}))  # fmt: skip
    return root


def test_key_depends_on_reference_data_and_lengths(tmp_path):
    ex = _examples()
    data = hash_examples(ex)
    assert data == hash_examples(_examples())  # deterministic
    changed = _examples()
    changed.rows[3]["rejected_input_ids"] = changed.rows[3]["rejected_input_ids"].copy()
    changed.rows[3]["rejected_input_ids"][-1] += 1
    assert hash_examples(changed) != data
    shuffled = TokenizedDataset("preference", ex.rows[::-1], {}, pad_id=0)
    assert hash_examples(shuffled) != data  # values are stored in example order

    run = _fake_run(tmp_path / "sft", b"weights")
    step_dir = checkpoint_step_dir(run)
    assert step_dir.name == "7" and checkpoint_step_dir(step_dir) == step_dir
    ref = hash_checkpoint(step_dir)
    other = hash_checkpoint(_fake_run(tmp_path / "sft2", b"weightz"))
    assert ref != other and ref == hash_checkpoint(tmp_path / "sft" / "checkpoints" / "7")
    p1 = {"w": jnp.ones((2, 3))}
    assert hash_params(p1) == hash_params({"w": jnp.ones((2, 3))})
    assert hash_params(p1) != hash_params({"w": jnp.ones((3, 2))})

    key = cache_key(reference=ref, data=data, lengths=LENGTHS)
    assert key == cache_key(reference=ref, data=data, lengths=dict(LENGTHS))
    assert key != cache_key(reference=other, data=data, lengths=LENGTHS)
    assert key != cache_key(reference=ref, data=hash_examples(changed), lengths=LENGTHS)
    for name, value in (("max_len", 128), ("max_prompt_len", 16), ("buckets", [32, 64]),
                        ("on_long_prompt", "drop")):  # fmt: skip
        assert key != cache_key(reference=ref, data=data, lengths={**LENGTHS, name: value}), name


def test_get_or_compute_reuses_and_recovers(tmp_path):
    cache = ReferenceCache(tmp_path / "cache")
    calls = []

    def compute():
        calls.append(1)
        return np.arange(5, dtype=np.float32), -np.arange(5, dtype=np.float32)

    first = cache.get_or_compute("k1", compute, num_examples=5, meta={"split": "train"})
    second = cache.get_or_compute("k1", compute, num_examples=5)
    assert (first.hit, second.hit, len(calls)) == (False, True, 1)
    np.testing.assert_array_equal(second.chosen, first.chosen)
    np.testing.assert_array_equal(second.rejected, first.rejected)
    assert json.loads((tmp_path / "cache" / "k1.json").read_text())["split"] == "train"
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic writes leave no temporaries
    # A damaged or mismatched file is recomputed rather than trusted.
    cache.path("k1").write_bytes(b"not an npz")
    assert not cache.get_or_compute("k1", compute, num_examples=5).hit and len(calls) == 2
    zeros6 = np.zeros(6, np.float32)
    assert not cache.get_or_compute("k1", lambda: (zeros6, zeros6), num_examples=6).hit
    with pytest.raises(ValueError, match="log-probs for"):
        cache.get_or_compute("k2", compute, num_examples=4)


def test_iterator_carries_reference_fields():
    ex = _examples(12)
    chosen = np.arange(12, dtype=np.float32) + 0.25
    rejected = -np.arange(12, dtype=np.float32)
    base = BatchIterator(ex, 4, (16,), seed=3)
    it = with_reference(base, chosen, rejected)
    assert (it.batch_size, it.buckets, it.seed, it.shuffle) == (4, (16,), 3, True)
    lookup = {tuple(r["chosen_input_ids"]): i for i, r in enumerate(ex.rows)}
    for _ in range(6):  # two shuffled epochs
        batch, plain = next(it), next(base)
        np.testing.assert_array_equal(batch["chosen_input_ids"], plain["chosen_input_ids"])
        assert batch["ref_chosen_logps"].dtype == np.float32
        for b in range(4):
            n = int(batch["chosen_attention_mask"][b].sum())
            i = lookup[tuple(batch["chosen_input_ids"][b, :n])]
            assert batch["ref_chosen_logps"][b] == chosen[i]
            assert batch["ref_rejected_logps"][b] == rejected[i]
    ev = with_reference(BatchIterator.for_eval(ex, 8, (16,)), chosen, rejected)
    last = list(ev)[-1]
    np.testing.assert_array_equal(last["valid"], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(last["ref_chosen_logps"][4:], 0.0)
    with pytest.raises(TypeError, match="preference"):
        with_reference(iter([]), chosen, rejected)
    # The default cache lives under $RLHF_JAX_CACHE (never relative to the working directory).
    assert ref_cache.DEFAULT_CACHE_DIR is None


def test_precompute_reference_without_checkpoint(tmp_path):
    _, frozen = tiny_state("1")
    graphdef = frozen.graphdefs["ref"]
    ex = _examples(6)
    splits = {
        "train": BatchIterator(ex, 4, (16,), seed=1),
        "eval": BatchIterator.for_eval(ex, 4, (16,)),
    }
    kwargs = dict(cache_dir=str(tmp_path), lengths=LENGTHS, init_from=None,
                  fresh_params=lambda: frozen.params["ref"], graphdef=graphdef,
                  model_cfg=model_config("tiny", vocab_size=64, max_seq_len=32), batch_size=4,
                  mesh=mesh("1"), rules=partitioning.logical_rules(), chunk_size=8)  # fmt: skip
    out, info = precompute_reference(dict(splits), **kwargs)
    assert not info["ref_cache/hit"] and info["ref_cache/train_key"] == info["ref_cache/eval_key"]
    again, info2 = precompute_reference(dict(splits), **kwargs)
    assert info2["ref_cache/hit"]
    b1, b2 = next(out["eval"]), next(again["eval"])
    np.testing.assert_array_equal(b1["ref_chosen_logps"], b2["ref_chosen_logps"])
    assert np.all(b1["ref_chosen_logps"] < 0) and np.all(b1["ref_rejected_logps"] < 0)


def test_cache_lives_under_rlhf_jax_cache_and_leaves_no_lock_files(tmp_path, monkeypatch):
    from rlhf_jax import paths

    monkeypatch.setenv("RLHF_JAX_CACHE", str(tmp_path / "cache_root"))
    assert paths.cache_dir("ref_cache") == tmp_path / "cache_root" / "ref_cache"
    cache = ref_cache.ReferenceCache(paths.cache_dir("ref_cache"))
    arrays = (np.arange(3, dtype=np.float32), -np.arange(3, dtype=np.float32))
    first = cache.get_or_compute("k1", lambda: arrays, num_examples=3)
    second = cache.get_or_compute("k1", lambda: arrays, num_examples=3)
    assert (first.hit, second.hit) == (False, True)
    assert not list((tmp_path / "cache_root").rglob("*.lock"))
