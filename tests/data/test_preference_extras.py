"""Per-pair float columns (`extra_fields`) through the one preference loader: carried into the
batch in row order, validated like margins (file, row, field), and shared by the reward-model
and DPO stages' data."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_jax.data import BatchIterator, DataError, load_source, make_preference_iterator
from rlhf_jax.data.preference import build_preference_dataset
from rlhf_jax.errors import SettingsError
from rlhf_jax.train.pairs import reward_preference_data

ROWS = [
    {"prompt": "how is the food ?", "chosen": "great", "rejected": "bad", "gold": 0.5, "m": 1},
    {"prompt": "hi", "chosen": "hello there", "rejected": "no", "gold": None, "m": 2},
    {"prompt": "what is it ?", "chosen": "cats", "rejected": "", "gold": 3.0, "m": 3},  # bad
    {"prompt": "tell me", "chosen": "yes", "rejected": "no no", "gold": -2, "m": 4},
]


def _eval_batch(pairs, batch_size: int) -> dict[str, np.ndarray]:
    return next(iter(BatchIterator.for_eval(pairs, batch_size, (16,))))


def test_extras_arrive_in_the_batch_in_row_order(tmp_path, word_tok, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    # Renamed through `columns`, like the fixed roles; the bad row (empty rejected) is skipped.
    train, ev, _ = make_preference_iterator(
        {"train": str(path), "eval": str(path)}, word_tok, extra_fields=("score", "m"),
        columns={"score": "gold"}, batch_size=2, eval_batch_size=4, buckets=(16,),
        on_bad_row="skip",
    )  # fmt: skip
    b = next(iter(ev))
    np.testing.assert_array_equal(b["valid"], [1, 1, 1, 0])
    np.testing.assert_array_equal(b["m"][:3], [1.0, 2.0, 4.0])
    np.testing.assert_array_equal(b["score"][:3], [0.5, np.nan, -2.0])  # null: NaN, not 0
    assert np.isnan(b["m"][3]) and np.isnan(b["score"][3])  # padding row: no value
    assert b["score"].dtype == b["m"].dtype == np.float32
    np.testing.assert_array_equal(b["margin"], [0.0] * 4)  # no margin column
    # The shuffled train batches carry each pair's extras with it.
    score_of = {1.0: 0.5, 2.0: np.nan, 4.0: -2.0}
    for _ in range(4):
        t = next(train)
        np.testing.assert_array_equal(t["score"], [score_of[m] for m in t["m"].tolist()])


def test_a_missing_extra_column_names_the_file_and_column(tmp_path, word_tok, write_jsonl):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    for on_bad_row in ("error", "skip"):  # a missing column is never a skippable row
        with pytest.raises(DataError, match=r"p\.jsonl: no column 'label_prob'"):
            build_preference_dataset(
                load_source(str(path))["train"], word_tok, extra_fields=("gold", "label_prob"),
                on_bad_row=on_bad_row,
            )  # fmt: skip


@pytest.mark.parametrize(
    "value, message",
    [
        ("abc", "is a str where the column holds number values"),  # JSON: a mixed column
        (float("nan"), "must be finite"),
        (True, "is a bool where"),
    ],
)
def test_a_bad_extra_value_names_file_row_and_field(tmp_path, word_tok, write_jsonl, value,
                                                    message):  # fmt: skip
    rows = [dict(r) for r in ROWS]
    rows[1]["gold"] = value
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ds = load_source(str(path))["train"]
    with pytest.raises(DataError, match=rf"p\.jsonl: row 1: field 'gold' .*{message}"):
        build_preference_dataset(ds, word_tok, extra_fields=("gold",), on_bad_row="error")
    # Skipped and counted like any bad row: rows 1 (bad gold) and 2 (empty rejected).
    pairs = build_preference_dataset(ds, word_tok, extra_fields=("gold",), on_bad_row="skip")
    assert pairs.stats["bad_rows"] == 2 and len(pairs) == 2
    np.testing.assert_array_equal(_eval_batch(pairs, 2)["gold"], [0.5, -2.0])


def test_an_extra_field_cannot_replace_a_batch_field(word_tok):
    with pytest.raises(SettingsError, match="'margin'"):
        build_preference_dataset(load_source(ROWS)["train"], word_tok, extra_fields=("margin",))


def test_reward_and_dpo_data_read_pairs_through_one_loader(tmp_path, word_tok, write_jsonl):
    """The reward model's data is the DPO loader's batches plus the gold columns it asked for,
    validated the same way."""
    rows = [dict(r, chosen_score=r["gold"], rejected_score=0.0, margin=r["m"]) for r in ROWS]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    common = dict(batch_size=2, seed=5, buckets=(16,), split_fraction=None, on_bad_row="skip")
    rm = reward_preference_data(tokenizer=word_tok, source=str(path), format="explicit", **common)
    train, _, _ = make_preference_iterator(
        str(path), word_tok, extra_fields=("chosen_score", "rejected_score"), **common
    )
    assert rm.summary["data/columns"] == "chosen_score,rejected_score"
    for _ in range(3):
        a, b = next(rm.train), next(train)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    rows[1]["chosen_score"] = "high"
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl: row 1: field 'chosen_score'"):
        reward_preference_data(tokenizer=word_tok, source=str(path), **{**common,
                               "on_bad_row": "error"})  # fmt: skip
