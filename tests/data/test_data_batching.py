"""BatchIterator: bucketed static shapes, seeded shuffling, exact resume, multi-process slices,
and the eval mode (padded last batch with a `valid` mask)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

from rlhf_jax.data import (
    BatchIterator,
    DataError,
    build_sft_dataset,
    device_fields,
    make_prompt_iterator,
    pick_bucket,
)

BUCKETS = (4, 8, 16)


@pytest.fixture
def examples(word_tok):
    rng = np.random.default_rng(0)
    words = "a b c d e f g h".split()
    rows = [{"text": " ".join(rng.choice(words, size=int(n)))} for n in rng.integers(1, 14, 37)]
    return build_sft_dataset(datasets.Dataset.from_list(rows), word_tok, max_len=16)


def _take(it, k):
    return [next(it) for _ in range(k)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_pick_bucket():
    assert [pick_bucket(n, BUCKETS) for n in (1, 4, 5, 16)] == [4, 4, 8, 16]
    with pytest.raises(DataError, match="exceeds the largest bucket 16"):
        pick_bucket(17, BUCKETS)


def test_only_bucket_lengths_appear(examples):
    it = BatchIterator(examples, 4, BUCKETS, seed=1)
    seen = set()
    for _ in range(60):
        b = next(it)
        t = b["input_ids"].shape[1]
        seen.add(t)
        longest = int(b["attention_mask"].sum(1).max())
        assert t == pick_bucket(longest, BUCKETS)  # the smallest bucket that fits
        assert all(v.shape[0] == 4 for v in b.values())
    assert seen <= set(BUCKETS) and len(seen) >= 2


def test_seeded_shuffle_and_epochs(examples):
    n = len(examples)

    def order(seed, batches):
        it = BatchIterator(examples, 1, BUCKETS, seed=seed)
        return [tuple(next(it)["input_ids"][0]) for _ in range(batches)]

    assert order(3, 2 * n) == order(3, 2 * n)
    assert order(3, n) != order(4, n)
    first, second = order(3, 2 * n)[:n], order(3, 2 * n)[n:]
    assert sorted(first) == sorted(second) and first != second  # each epoch is a permutation
    it = BatchIterator(examples, 5, BUCKETS, seed=0)
    assert len(it) == n // 5  # drop_last


@pytest.mark.parametrize("k", [0, 3, 7, 8, 20])
def test_exact_resume(examples, k):
    a = BatchIterator(examples, 5, BUCKETS, seed=11)
    _take(a, k)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able
    expected = _take(a, 10)  # crosses an epoch boundary (7 batches per epoch)
    b = BatchIterator(examples, 5, BUCKETS, seed=11)
    b.load_state_dict(state)
    for x, y in zip(expected, _take(b, 10), strict=True):
        _same(x, y)


def test_resume_rejects_other_settings(examples):
    state = BatchIterator(examples, 5, BUCKETS, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(examples, 5, BUCKETS, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(examples, 4, BUCKETS, seed=1).load_state_dict(state)


@pytest.mark.parametrize("procs", [2, 4])
def test_multi_process_slices(examples, procs):
    whole = BatchIterator(examples, 8, BUCKETS, seed=5)
    parts = [
        BatchIterator(examples, 8, BUCKETS, seed=5, process_index=p, process_count=procs)
        for p in range(procs)
    ]
    for _ in range(9):
        g = next(whole)
        locals_ = [next(p) for p in parts]
        for key in g:
            assert {loc[key].shape for loc in locals_} == {(8 // procs, *g[key].shape[1:])}
            np.testing.assert_array_equal(np.concatenate([loc[key] for loc in locals_]), g[key])


def test_batch_not_divisible_by_processes(examples):
    with pytest.raises(DataError, match="batch_size=6 is not divisible by process_count=4"):
        BatchIterator(examples, 6, BUCKETS, process_index=0, process_count=4)


def test_eval_mode_pads_last_batch_and_rewinds(examples):
    n = len(examples)  # 37
    it = BatchIterator.for_eval(examples, 8, BUCKETS)
    batches = list(it)
    assert len(batches) == len(it) == 5
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == n and valid[n:].sum() == 0
    last = batches[-1]
    pad_rows = last["valid"] == 0
    for key in ("attention_mask", "loss_mask"):
        assert not last[key][pad_rows].any()
    assert (last["input_ids"][pad_rows] == examples.pad_id).all()
    # In order, every row exactly once.
    got = [b["input_ids"][i] for b in batches for i in np.flatnonzero(b["valid"])]
    for row, ids in zip(examples.rows, got, strict=True):
        np.testing.assert_array_equal(ids[: len(row["input_ids"])], row["input_ids"])
    again = list(it)  # a second pass gives the same batches
    for x, y in zip(batches, again, strict=True):
        _same(x, y)
    for _ in it:  # an early break does not shorten the next pass
        break
    assert len(list(it)) == 5


def test_eval_mode_multi_process(examples):
    whole = list(BatchIterator.for_eval(examples, 8, BUCKETS))
    parts = [
        list(BatchIterator.for_eval(examples, 8, BUCKETS, process_index=p, process_count=2))
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for g, a, b in zip(whole, *parts, strict=True):
        for key in g:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), g[key])


def test_construction_errors(examples, word_tok):
    with pytest.raises(DataError, match="largest bucket is 8"):
        BatchIterator(examples, 4, (4, 8))
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchIterator(examples, 64, BUCKETS)
    assert len(BatchIterator(examples, 64, BUCKETS, drop_last=False)) == 1


def test_prompt_batches_and_device_fields(tmp_path, word_tok, write_jsonl):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a " * (i % 5 + 1)} for i in range(12)])
    train, ev, tok = make_prompt_iterator(
        f, word_tok, batch_size=4, buckets=(4, 8), process_index=1, process_count=2
    )
    assert ev is None
    b = next(train)
    assert b["prompt_ids"].shape[0] == 2 and b["prompt_ids"].shape[1] in (4, 8)
    assert set(device_fields(b)) == {"prompt_ids", "prompt_mask", "valid"}


def test_check_state_dict_refuses_corrupted_positions(examples):
    """A saved position is validated before it is trusted (types, same settings, reachable,
    and the position after the number of batches the run consumed)."""
    from rlhf_jax.data import DataError

    it = BatchIterator(examples, 4, BUCKETS, seed=3)
    next(it), next(it)
    good = it.state_dict()
    it.check_state_dict(good, batches=2)
    for bad in (
        {**good, "position": 10**9},
        {**good, "position": 3},  # not a batch boundary
        {**good, "position": "8"},
        {**good, "seed": 4},
        {**good, "data_hash": "0" * 16},  # the same number of rows, other data
        {**good, "epoch": -1},
        {k: v for k, v in good.items() if k != "epoch"},
        None,
    ):
        with pytest.raises(DataError):
            it.check_state_dict(bad)
    with pytest.raises(DataError, match="after 3 batches"):
        it.check_state_dict(good, batches=3)
