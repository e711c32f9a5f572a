"""Fixtures of the data tests: a word-level tokenizer with known ids, file writers and a small
reviews task built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = (
    "a b c d e f g h i j k l m n o p q r s t u v w x y z "
    "hello there you hi how are the food was great bad good what is it yes no "
    "Human Assistant User System : ? ! . , tell me about cats dogs thanks"
).split()


def _write_word_tokenizer(
    directory: Path,
    words=WORDS,
    specials=SPECIALS,
    chat_template: str | None = None,
    config: dict | None = None,
) -> Path:
    """Writes a word-level tokenizer.json (ids: specials first, then `words` in order)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(cleanup=False)  # joins every token with a space
    tok.add_special_tokens(list(specials))
    path = directory / "tokenizer.json"
    tok.save(str(path))
    cfg = dict(config or {})
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    if cfg:
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def _write_jsonl(path: Path, rows) -> Path:
    """Writes rows as JSON lines; a str row is written verbatim (for malformed lines)."""
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def write_tokenizer():
    """The word-level tokenizer writer: (directory, words=..., chat_template=...) -> path."""
    return _write_word_tokenizer


@pytest.fixture
def write_jsonl():
    """The JSONL writer: (path, rows) -> path."""
    return _write_jsonl


@pytest.fixture
def word_tok(tmp_path):
    """A word-level Tokenizer: <pad>=0 <bos>=1 <eos>=2 <unk>=3, then WORDS in order."""
    from rlhf_jax.data import Tokenizer

    return Tokenizer.from_file(_write_word_tokenizer(tmp_path / "tok"))


@pytest.fixture(scope="session")
def small_task(tmp_path_factory):
    from rlhf_jax.data.tasks import build_reviews_task

    out = tmp_path_factory.mktemp("reviews")
    return build_reviews_task(out, num_texts=1500, seed=0, num_prompts=200, num_eval_prompts=50)
