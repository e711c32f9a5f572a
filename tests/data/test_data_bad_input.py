"""Bad input is never silently wrong: bad rows raise (file, row, field) or are skipped and
counted; long prompts are truncated (keeping their end) or dropped; no row is ever emitted
with an empty completion or an all-zero loss mask."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest

from rlhf_jax.data import (
    BatchIterator,
    DataError,
    build_preference_dataset,
    build_prompt_dataset,
    build_sft_dataset,
    load_source,
    make_sft_iterator,
)

GOOD = {"prompt": "hi", "completion": "hello there"}


def _sft(path, tok, **kw):
    kw.setdefault("format", "prompt_completion")
    kw.setdefault("max_len", 32)
    return build_sft_dataset(load_source(path)["train"], tok, **kw)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "hi"}, r"row 2: field 'completion' is missing"),
        ({"prompt": "hi", "completion": None}, r"row 2: field 'completion' is missing"),
        ({"prompt": "hi", "completion": ""}, r"row 2: field 'completion' is empty"),
        ({"prompt": "hi", "completion": "   "}, r"row 2: field 'completion' is empty"),
        ({"prompt": "hi", "completion": 7}, r"row 2: field 'completion' must be a string, got int"),
        (
            {"prompt": ["hi"], "completion": "a"},
            r"row 2: field 'prompt' must be a string, got list",
        ),
    ],
    ids=["missing-key", "null", "empty", "blank", "int", "list"],
)
def test_bad_row_names_file_row_and_field(tmp_path, word_tok, write_jsonl, bad, message):
    f = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError, match=rf"data.jsonl: {message}"):
        _sft(f, word_tok)


def test_whole_column_non_string(word_tok):
    ds = datasets.Dataset.from_list([{"text": 1}, {"text": 2}])
    with pytest.raises(DataError, match=r"row 0: field 'text' must be a string, got int"):
        build_sft_dataset(ds, word_tok)


def test_skip_mode_drops_counts_and_logs(tmp_path, word_tok, write_jsonl, caplog):
    rows = [GOOD, {"prompt": "hi"}, {"prompt": "", "completion": "a"}, GOOD, {"completion": 3}]
    f = write_jsonl(tmp_path / "data.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="rlhf_jax"):
        ex = _sft(f, word_tok, on_bad_row="skip")
    assert len(ex) == 2
    assert ex.stats["bad_rows"] == 3 and ex.stats["rows"] == 5 and ex.stats["kept"] == 2
    assert "skipped 3 bad row(s) of 5" in caplog.text and "data.jsonl: row 1" in caplog.text
    train, _, _ = make_sft_iterator(
        f,
        word_tok,
        format="prompt_completion",
        on_bad_row="skip",
        batch_size=2,
        buckets=(16,),
        process_index=0,
        process_count=1,
    )
    assert train.stats["bad_rows"] == 3


def test_skip_mode_preference_and_prompts(word_tok):
    pairs = datasets.Dataset.from_list(
        [
            {"prompt": "hi", "chosen": "yes", "rejected": "no"},
            {"prompt": "hi", "chosen": "", "rejected": "no"},
        ]
    )
    with pytest.raises(DataError, match="row 1: field 'chosen' is empty"):
        build_preference_dataset(pairs, word_tok)
    assert build_preference_dataset(pairs, word_tok, on_bad_row="skip").stats["bad_rows"] == 1
    prompts = datasets.Dataset.from_list([{"prompt": "hi"}, {"prompt": None}])
    assert build_prompt_dataset(prompts, word_tok, on_bad_row="skip").stats["bad_rows"] == 1


def test_missing_column_is_an_error_even_when_skipping(word_tok):
    ds = datasets.Dataset.from_list([{"txt": "hi"}])
    with pytest.raises(DataError, match=r"no column 'text'; columns are \['txt'\]"):
        build_sft_dataset(ds, word_tok, on_bad_row="skip")


def test_all_rows_bad_is_an_error(word_tok):
    ds = datasets.Dataset.from_list([{"text": ""}, {"text": None}])
    with pytest.raises(DataError, match="no usable rows"):
        build_sft_dataset(ds, word_tok, on_bad_row="skip")


def test_bad_margin_and_hh_without_marker(word_tok):
    ds = datasets.Dataset.from_list(
        [{"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "lots"}]
    )
    with pytest.raises(DataError, match="row 0: field 'margin' must be a number"):
        build_preference_dataset(ds, word_tok)
    hh = datasets.Dataset.from_list([{"chosen": "\n\nHuman: a b", "rejected": "\n\nHuman: a c"}])
    with pytest.raises(DataError, match="row 0: chosen and rejected share no prefix"):
        build_preference_dataset(hh, word_tok, format="implicit_prompt")


def test_long_prompt_truncate_keeps_the_end(word_tok):
    ds = datasets.Dataset.from_list([{"prompt": "a b c d e f g h", "completion": "yes"}])
    ex = build_sft_dataset(ds, word_tok, format="prompt_completion", max_len=10, max_prompt_len=4)
    row = ex[0]
    assert word_tok.decode(row["input_ids"]) == "f g h yes"
    assert row["input_ids"][0] == word_tok.bos_id and row["completion_start"] == 4
    assert ex.stats["long_prompt_truncated"] == 1


def test_long_prompt_drop_counts(word_tok):
    ds = datasets.Dataset.from_list(
        [{"prompt": "a b c d e f g h", "completion": "yes"}, {"prompt": "a", "completion": "no"}]
    )
    ex = build_sft_dataset(
        ds,
        word_tok,
        format="prompt_completion",
        max_len=10,
        max_prompt_len=4,
        on_long_prompt="drop",
    )
    assert len(ex) == 1 and ex.stats["long_prompt_dropped"] == 1
    pr = build_prompt_dataset(ds, word_tok, max_prompt_len=4, on_long_prompt="drop")
    assert len(pr) == 1 and pr.stats["long_prompt_dropped"] == 1
    pr = build_prompt_dataset(ds, word_tok, max_prompt_len=4)
    assert word_tok.decode(pr[0]["prompt_ids"]) == "f g h" and len(pr[0]["prompt_ids"]) == 4


def test_long_completion_keeps_its_start_without_eos(word_tok):
    ds = datasets.Dataset.from_list([{"prompt": "hi", "completion": "a b c d e f g h"}])
    ex = build_sft_dataset(ds, word_tok, format="prompt_completion", max_len=6)
    ids = ex[0]["input_ids"]
    assert len(ids) == 6 and word_tok.decode(ids) == "hi a b c d"
    assert word_tok.eos_id not in ids.tolist() and ex.stats["completion_truncated"] == 1


def test_truncation_limits_must_leave_a_completion(word_tok):
    ds = datasets.Dataset.from_list([GOOD])
    with pytest.raises(ValueError, match="at least one completion token"):
        build_sft_dataset(ds, word_tok, format="prompt_completion", max_len=8, max_prompt_len=8)


def test_unknown_options_are_rejected(word_tok):
    ds = datasets.Dataset.from_list([GOOD])
    with pytest.raises(ValueError, match="on_bad_row"):
        build_sft_dataset(ds, word_tok, format="prompt_completion", on_bad_row="ignore")
    with pytest.raises(ValueError, match="on_long_prompt"):
        build_sft_dataset(ds, word_tok, format="prompt_completion", on_long_prompt="cut")
    with pytest.raises(ValueError, match="unknown SFT format"):
        build_sft_dataset(ds, word_tok, format="chat")


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_never_an_empty_target(word_tok, policy):
    """Random prompt/completion lengths under tight limits: every emitted row has targets."""
    rng = np.random.default_rng(0)
    words = "a b c d e f g h i j".split()
    rows = []
    for _ in range(200):
        p = " ".join(rng.choice(words, size=rng.integers(1, 12)))
        c = " ".join(rng.choice(words, size=rng.integers(1, 12)))
        rows.append({"prompt": p, "chosen": c, "rejected": c[::-1], "completion": c})
    ds = datasets.Dataset.from_list(rows)
    for max_len, max_prompt_len in ((4, 2), (6, 5), (12, 6)):
        sft = build_sft_dataset(
            ds,
            word_tok,
            format="prompt_completion",
            max_len=max_len,
            max_prompt_len=max_prompt_len,
            on_long_prompt=policy,
        )
        pref = build_preference_dataset(
            ds, word_tok, max_len=max_len, max_prompt_len=max_prompt_len, on_long_prompt=policy
        )
        for ex in (sft, pref):
            it = BatchIterator.for_eval(ex, 16, buckets=(max_len,))
            for b in it:
                real = b["valid"] == 1
                for key in [k for k in b if k.endswith("loss_mask")]:
                    assert (b[key][real].sum(axis=1) >= 1).all()
                    assert b[key].shape[1] == max_len
