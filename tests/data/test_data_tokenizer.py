"""Tokenizer wrapper: special ids, encode/decode, chat template lookup, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlhf_jax.data import Tokenizer, TokenizerError, make_sft_iterator


def test_special_ids_and_round_trip(word_tok):
    assert (word_tok.pad_id, word_tok.bos_id, word_tok.eos_id) == (0, 1, 2)
    assert word_tok.vocab_size == 4 + 58
    ids = word_tok.encode("hello there", add_bos=True)
    assert ids[0] == 1 and word_tok.decode(ids) == "hello there"
    assert word_tok.encode("hello") == [word_tok.backend.token_to_id("hello")]
    batch = np.array([[1, *word_tok.encode("the food"), 2, 0, 0], [0] * 5 + [0]])
    assert word_tok.decode_batch(batch) == ["the food", ""]
    assert "<eos>" in word_tok.decode(batch[0], skip_special=False)


def test_from_directory_with_config_and_template(tmp_path, write_tokenizer):
    d = tmp_path / "t"
    write_tokenizer(
        d,
        specials=["<s>", "</s>", "<unk>"],
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
        config={"eos_token": {"content": "</s>"}, "bos_token": "<s>"},
    )
    tok = Tokenizer.from_file(d)
    assert tok.path == str(d / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.pad_id == tok.eos_id  # no pad token: falls back to EOS
    assert tok.chat_template.startswith("{% for m")


def test_no_bos_and_explicit_override(tmp_path, write_tokenizer):
    path = write_tokenizer(tmp_path / "t", specials=["[PAD]", "[END]"])
    with pytest.raises(TokenizerError, match="no eos token"):
        Tokenizer.from_file(path)
    tok = Tokenizer.from_file(path, eos_token="[END]")
    assert tok.bos_id is None and tok.eos_id == 1 and tok.pad_id == 0
    assert tok.encode("hi", add_bos=True) == tok.encode("hi")
    with pytest.raises(TokenizerError, match="not in the tokenizer"):
        Tokenizer.from_file(path, eos_token="<nope>")


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer file not found: .*missing.json"):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match=r"not found: .*empty_dir/tokenizer.json"):
        (tmp_path / "empty_dir").mkdir()
        Tokenizer.from_file(tmp_path / "empty_dir")
    assert issubclass(TokenizerError, ValueError)


def test_unreadable_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=r"cannot read tokenizer file .*tokenizer.json"):
        Tokenizer.from_file(bad)
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
        Tokenizer.from_file(bad)


def test_pipeline_reports_missing_tokenizer(tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello"}] * 4)
    with pytest.raises(TokenizerError, match="nothere"):
        make_sft_iterator(src, tmp_path / "nothere" / "tokenizer.json", batch_size=2)
