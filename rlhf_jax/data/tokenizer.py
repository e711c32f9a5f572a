"""A thin wrapper over a `tokenizers` tokenizer.json: special-token ids and the chat template.

The wrapper never lets the tokenizer's own post-processor add special tokens: `encode` returns
the bare ids of the text and the pipeline places BOS/EOS/pad itself, so a sequence is always
`[bos] prompt completion [eos]` whatever the tokenizer's template says.

Special tokens are resolved in this order: explicit arguments to `from_file`, then the
`tokenizer_config.json` next to tokenizer.json (HF layout), then well-known token strings found
in the vocabulary (`<bos>`, `<s>`, `<|endoftext|>`, ...). The pad token falls back to EOS when
the vocabulary has none. BOS may be absent (`bos_id is None`); EOS may not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers

from rlhf_jax.data.errors import TokenizerError

_BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>", "[BOS]", "<|startoftext|>", "<|endoftext|>")
_EOS_CANDIDATES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[EOS]", "<|im_end|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


def _token_string(value) -> str | None:
    """HF configs write special tokens either as strings or as {"content": ...} dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    """A tokenizer.json plus the special-token ids and chat template the pipeline needs.

    Attributes:
      bos_id: id of the beginning-of-sequence token, or None if the tokenizer has none.
      eos_id: id of the end-of-sequence token.
      pad_id: id used for padding (the EOS id if the vocabulary has no pad token).
      vocab_size: number of ids including added tokens.
      chat_template: jinja2 chat template from tokenizer_config.json (or the
        chat_template.jinja beside it), or None.
      path: the tokenizer.json file this was read from.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        path: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ):
        self._tok = tokenizer
        self.path = path
        self.chat_template = chat_template
        self.bos_token = self._resolve(bos_token, _BOS_CANDIDATES, "bos", required=False)
        self.eos_token = self._resolve(eos_token, _EOS_CANDIDATES, "eos", required=True)
        self.pad_token = self._resolve(pad_token, _PAD_CANDIDATES, "pad", required=False)
        if self.pad_token is None:
            self.pad_token = self.eos_token
        self.bos_id = None if self.bos_token is None else self._tok.token_to_id(self.bos_token)
        self.eos_id = self._tok.token_to_id(self.eos_token)
        self.pad_id = self._tok.token_to_id(self.pad_token)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _resolve(self, given, candidates, what, *, required):
        if given is not None:
            if self._tok.token_to_id(given) is None:
                raise TokenizerError(f"{what} token {given!r} is not in the tokenizer {self.path}")
            return given
        for cand in candidates:
            if self._tok.token_to_id(cand) is not None:
                return cand
        if required:
            raise TokenizerError(
                f"tokenizer {self.path} has no {what} token among {list(candidates)}; "
                f"pass {what}_token= explicitly"
            )
        return None

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> Tokenizer:
        """Reads a tokenizer.json (or a directory holding one) and its tokenizer_config.json.

        Args:
          path: the tokenizer.json file or its directory.
          bos_token, eos_token, pad_token: override the special-token strings.

        Returns:
          The wrapped tokenizer.

        Raises:
          TokenizerError: the file is missing or is not a readable tokenizer.json, naming it.
        """
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise TokenizerError(f"tokenizer file not found: {p}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON.
            raise TokenizerError(f"cannot read tokenizer file {p}: {e}") from None
        config = {}
        cfg_path = p.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TokenizerError(f"cannot read {cfg_path}: {e}") from None
        template = config.get("chat_template")
        jinja = p.parent / "chat_template.jinja"
        if template is None and jinja.is_file():  # where recent transformers save it
            try:
                template = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"cannot read {jinja}: {e}") from None
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return cls(
            tok,
            path=str(p),
            bos_token=bos_token or _token_string(config.get("bos_token")),
            eos_token=eos_token or _token_string(config.get("eos_token")),
            pad_token=pad_token or _token_string(config.get("pad_token")),
            chat_template=template if isinstance(template, str) else None,
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` with no special tokens, optionally preceded by BOS."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` over many texts at once (parallel in the Rust tokenizer)."""
        out = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        if add_bos and self.bos_id is not None:
            out = [[self.bos_id, *ids] for ids in out]
        return out

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        """Text of `ids`; special tokens (pad, bos, eos) are dropped unless skip_special=False."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_batch(
        self, batch: Sequence[Iterable[int]] | np.ndarray, skip_special: bool = True
    ) -> list[str]:
        """`decode` over a list of id lists or a [B, T] array."""
        return self._tok.decode_batch(
            [[int(i) for i in ids] for ids in batch], skip_special_tokens=skip_special
        )

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )
