"""Every data format, tokenised and collated: exact ids and masks on tiny fixture files."""

from __future__ import annotations

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
    make_preference_iterator,
    make_prompt_iterator,
    make_sft_iterator,
    split_transcripts,
)
from rlhf_jax.data.chat import DEFAULT_CHAT_TEMPLATE, render

BOS, EOS, PAD = 1, 2, 0


def _one_batch(examples, batch_size=None, buckets=(16, 32)):
    it = BatchIterator.for_eval(examples, batch_size or len(examples), buckets)
    return next(iter(it))


def _real(row_ids, row_mask):
    return [int(t) for t, m in zip(row_ids, row_mask, strict=True) if m]


def test_sft_text(tmp_path, word_tok, write_jsonl):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "the food was great"}, {"text": "hi"}])
    ex = build_sft_dataset(load_source(f)["train"], word_tok, max_len=16)
    b = _one_batch(ex, buckets=(8, 16))
    assert b["input_ids"].shape == (2, 8) and b["input_ids"].dtype == np.int32
    expected = [BOS, *word_tok.encode("the food was great"), EOS]
    np.testing.assert_array_equal(b["input_ids"][0], expected + [PAD] * 2)
    np.testing.assert_array_equal(b["attention_mask"][0], [1] * 6 + [0] * 2)
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(b["loss_mask"][1], [0, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["valid"], [1, 1])


def test_sft_prompt_completion_with_renamed_columns(tmp_path, word_tok, write_jsonl):
    rows = [{"q": "what is it ?", "a": "a b"}, {"q": "hi", "a": "hello there"}] * 2
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    _, ev, _ = make_sft_iterator(
        src,
        word_tok,
        format="prompt_completion",
        columns={"prompt": "q", "completion": "a"},
        batch_size=2,
        eval_batch_size=4,
        buckets=(16,),
        split_fraction=0.5,
        process_index=0,
        process_count=1,
    )
    b = next(iter(ev))
    assert b["input_ids"].shape == (4, 16)
    for i in range(2):  # two real rows, then two padding rows
        seq = _real(b["input_ids"][i], b["attention_mask"][i])
        targets = _real(b["input_ids"][i], b["loss_mask"][i])
        prompt = seq[: len(seq) - len(targets)]
        assert prompt[0] == BOS and targets[-1] == EOS
        assert word_tok.decode(targets) in ("a b", "hello there")
        assert word_tok.decode(prompt) in ("what is it ?", "hi")
    np.testing.assert_array_equal(b["valid"], [1, 1, 0, 0])
    assert not b["loss_mask"][2:].any() and not b["attention_mask"][2:].any()


def test_sft_messages_trains_on_last_assistant_turn(word_tok):
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "what is it ?"},
        {"role": "assistant", "content": "a b"},
    ]
    ds = datasets.Dataset.from_list([{"messages": conv}])
    ex = build_sft_dataset(ds, word_tok, format="messages", max_len=32)
    b = _one_batch(ex, buckets=(32,))
    assert word_tok.decode(_real(b["input_ids"][0], b["loss_mask"][0])) == "a b"
    full = word_tok.decode(b["input_ids"][0])
    assert full == "Human : hi Assistant : hello Human : what is it ? Assistant : a b"


def test_default_template_is_hh_layout():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert render(msgs) == "\n\nHuman: hi\n\nAssistant: yo"
    assert render(msgs[:1], add_generation_prompt=True) == "\n\nHuman: hi\n\nAssistant:"
    assert render(msgs, DEFAULT_CHAT_TEMPLATE) == render(msgs)


def test_preference_explicit_with_margin(tmp_path, word_tok, write_jsonl):
    rows = [
        {"prompt": "how is the food ?", "chosen": "great", "rejected": "bad bad bad", "margin": 2},
        {"prompt": "hi", "chosen": "hello there", "rejected": "no", "margin": 0.5},
    ]
    ex = build_preference_dataset(
        load_source(write_jsonl(tmp_path / "p.jsonl", rows))["train"], word_tok, max_len=32
    )
    b = _one_batch(ex, buckets=(8, 16))
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == (2, 16)
    np.testing.assert_allclose(b["margin"], [2.0, 0.5])
    assert b["margin"].dtype == np.float32
    p = word_tok.encode("how is the food ?")
    np.testing.assert_array_equal(
        _real(b["chosen_input_ids"][0], b["chosen_attention_mask"][0]),
        [BOS, *p, *word_tok.encode("great"), EOS],
    )
    assert word_tok.decode(_real(b["rejected_input_ids"][0], b["rejected_loss_mask"][0])) == (
        "bad bad bad"
    )
    assert b["rejected_loss_mask"][0].sum() == 4  # three words + EOS
    # Without a margin column the margin is 0.
    ex2 = build_preference_dataset(
        datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "margin"} for r in rows]),
        word_tok,
        max_len=32,
    )
    np.testing.assert_array_equal(_one_batch(ex2)["margin"], [0.0, 0.0])


HH_CHOSEN = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is the food ?\n\nAssistant: good food"
HH_REJECTED = (
    "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is the food ?\n\nAssistant: good dogs"
)


def test_split_transcripts_cuts_at_last_assistant_marker():
    p, c, r = split_transcripts(HH_CHOSEN, HH_REJECTED)
    assert p == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is the food ?\n\nAssistant:"
    assert (c, r) == (" good food", " good dogs")
    with pytest.raises(DataError, match="share no prefix"):
        split_transcripts("\n\nHuman: a", "\n\nHuman: b")
    with pytest.raises(DataError, match="chosen completion .* is empty"):
        split_transcripts("\n\nHuman: a\n\nAssistant:", "\n\nHuman: a\n\nAssistant: b")


def test_preference_implicit_prompt_hh(tmp_path, word_tok, write_jsonl):
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}] * 2)
    train, _, _ = make_preference_iterator(
        f,
        word_tok,
        format="implicit_prompt",
        batch_size=2,
        buckets=(32,),
        process_index=0,
        process_count=1,
    )
    b = next(train)
    for side, want in (("chosen", "good food"), ("rejected", "good dogs")):
        ids = b[f"{side}_input_ids"][0]
        assert word_tok.decode(_real(ids, b[f"{side}_loss_mask"][0])) == want
        prompt = word_tok.decode(ids[: int(np.argmax(b[f"{side}_loss_mask"][0]))])
        assert prompt == "Human : hi Assistant : hello Human : what is the food ? Assistant :"


def test_preference_conversational_shared_prefix_and_auto(word_tok):
    user = {"role": "user", "content": "hi"}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "hello there"}],
            "rejected": [user, {"role": "assistant", "content": "no"}],
        }
    ]
    ds = datasets.Dataset.from_list(rows)
    for fmt in ("conversational", "auto"):
        b = _one_batch(build_preference_dataset(ds, word_tok, format=fmt, max_len=16))
        assert word_tok.decode(_real(b["chosen_input_ids"][0], b["chosen_loss_mask"][0])) == (
            "hello there"
        )
        assert word_tok.decode(b["rejected_input_ids"][0]) == "Human : hi Assistant : no"


def test_preference_conversational_with_tokenizer_template(tmp_path, write_tokenizer):
    from rlhf_jax.data import Tokenizer

    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User : {{ m['content'] }} "
        "{% else %}Assistant : {{ m['content'] }}{{ eos_token }} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant :{% endif %}"
    )
    tok = Tokenizer.from_file(write_tokenizer(tmp_path / "t", chat_template=template))
    rows = [
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
    ]
    b = _one_batch(
        build_preference_dataset(
            datasets.Dataset.from_list(rows), tok, max_len=16, format="conversational"
        )
    )
    seq = _real(b["chosen_input_ids"][0], b["chosen_attention_mask"][0])
    assert seq == [BOS, *tok.encode("User : hi Assistant :"), *tok.encode("hello"), EOS]
    # A template that does not render the prompt as a prefix cannot be split.
    bad = Tokenizer.from_file(
        write_tokenizer(tmp_path / "bad", chat_template="{{ messages | length }}")
    )
    with pytest.raises(DataError, match="prefix"):
        build_preference_dataset(datasets.Dataset.from_list(rows), bad, format="conversational")


def test_preference_auto_explicit_and_implicit(word_tok):
    explicit = datasets.Dataset.from_list([{"prompt": "hi", "chosen": "yes", "rejected": "no"}])
    implicit = datasets.Dataset.from_list([{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    for ds in (explicit, implicit):
        ex = build_preference_dataset(ds, word_tok, format="auto", max_len=32)
        assert len(ex) == 1


def test_prompts_left_padded(tmp_path, word_tok, write_jsonl):
    rows = [{"prompt": "the food was"}, {"prompt": "hi"}, {"prompt": "what is it"}]
    f = write_jsonl(tmp_path / "pr.jsonl", rows)
    _, ev, _ = make_prompt_iterator(
        f,
        word_tok,
        batch_size=1,
        eval_batch_size=4,
        buckets=(4, 8),
        split_fraction=0.5,
        process_index=0,
        process_count=1,
    )
    train_ds = build_prompt_dataset(load_source(f)["train"], word_tok, max_prompt_len=8)
    b = _one_batch(train_ds, buckets=(4, 8))
    assert b["prompt_ids"].shape == (3, 4)
    np.testing.assert_array_equal(b["prompt_ids"][0], [BOS, *word_tok.encode("the food was")])
    np.testing.assert_array_equal(b["prompt_ids"][1], [PAD, PAD, BOS, *word_tok.encode("hi")])
    np.testing.assert_array_equal(b["prompt_mask"][1], [0, 0, 1, 1])
    assert b["prompt_text"].dtype == object and list(b["prompt_text"]) == [
        r["prompt"] for r in rows
    ]
    eb = next(iter(ev))
    assert eb["prompt_ids"].shape == (4, 4) and list(eb["valid"]) == [1, 1, 0, 0]
    assert list(eb["prompt_text"][2:]) == ["", ""]


def test_prompts_from_messages(word_tok):
    ds = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}])
    b = _one_batch(
        build_prompt_dataset(ds, word_tok, format="messages", max_prompt_len=8), buckets=(8,)
    )
    assert b["prompt_text"][0] == "\n\nHuman: hi\n\nAssistant:"
    assert word_tok.decode(b["prompt_ids"][0]) == "Human : hi Assistant :"


def test_formats_read_from_parquet_and_csv(tmp_path, word_tok):
    ds = datasets.Dataset.from_list([{"prompt": "hi", "completion": "hello there"}] * 4)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    for name in ("d.parquet", "d.csv"):
        train, _, _ = make_sft_iterator(
            tmp_path / name,
            word_tok,
            format="prompt_completion",
            batch_size=2,
            buckets=(8,),
            process_index=0,
            process_count=1,
        )
        b = next(train)
        assert word_tok.decode(_real(b["input_ids"][0], b["loss_mask"][0])) == "hello there"


def test_template_errors_are_data_errors(tmp_path, write_tokenizer):
    from rlhf_jax.data import Tokenizer

    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    )
    tok = Tokenizer.from_file(write_tokenizer(tmp_path / "t", chat_template=template))
    conv = [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    ds = datasets.Dataset.from_list([{"messages": conv}])
    with pytest.raises(DataError, match="row 0: field 'messages'.*chat template error: user first"):
        build_sft_dataset(ds, tok, format="messages")
