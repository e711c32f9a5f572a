"""The built-in offline "reviews" task: a seeded corpus of short review-like texts, a tokenizer
trained on it, and prompt sets made of the first words of held-out reviews.

`build_reviews_task(out_dir)` writes

    out_dir/task.json           the settings (a rebuild with equal settings reuses the files)
    out_dir/corpus/             DatasetDict.save_to_disk with "train" and "eval" (column "text")
    out_dir/tokenizer.json      BPE over the train texts; <pad>=0 <bos>=1 <eos>=2 <unk>=3
    out_dir/prompts.jsonl       {"prompt": first 2-5 words, "reference": the rest} (RL prompts)
    out_dir/eval_prompts.jsonl  the same, disjoint from prompts.jsonl (evaluation prompts)

Every text is unique across the corpus splits and the reviews the prompts come from, so prompts
never come from a training text. The texts are 8-30 lowercase words with varied punctuation
(some "!", "!!"), roughly 40% positive, 40% negative, 10% neutral and 10% mixed, about one in
ten with a mild rude word; docs/DATA_CARD.md shows examples and how the gold judges score them.

The tokenizer splits on spaces (sentencepiece-style "▁" markers) and isolates punctuation, so
`decode` re-joins words exactly as written ("good, but slow!").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import string
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import datasets
import gin
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlhf_jax import atomic
from rlhf_jax import settings as check
from rlhf_jax.data.tasks import judges
from rlhf_jax.data.tasks import vocab as V
from rlhf_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TASK_VERSION = 1
_END_PUNCT = ((".", 0.45), ("!", 0.22), ("", 0.17), ("...", 0.07), ("!!", 0.06), ("!!!", 0.03))
_MID_PUNCT = ((".", 0.6), ("!", 0.2), (",", 0.2))
_PLURAL_ENDINGS = ("fries", "tacos", "noodles")


class ReviewGenerator:
    """Seeded generator of review-like texts (reproducible across Python versions: it draws
    only from `random.Random.random`, whose stream Python guarantees)."""

    def __init__(self, seed: int = 0):
        import random

        self._rng = random.Random(seed)

    def _u(self) -> float:
        return self._rng.random()

    def _pick(self, seq):
        return seq[int(self._u() * len(seq))]

    def _weighted(self, table):
        u, acc = self._u(), 0.0
        for value, p in table:
            acc += p
            if u < acc:
                return value
        return table[-1][0]

    def _adj(self, mood: str, cat: dict) -> str:
        if mood == "neu":
            return self._pick(V.NEUTRAL)
        pool = V.POSITIVE + cat["pos"] if mood == "pos" else V.NEGATIVE + cat["neg"]
        word = self._pick(pool)
        return f"{self._pick(V.INTENSIFIERS)} {word}" if self._u() < 0.35 else word

    def _clause(self, mood: str, cat: dict, subj: str) -> str:
        if mood == "neu":
            t = int(self._u() * 5)
            return [
                f"{subj} was {self._adj('neu', cat)}",
                f"i {self._pick(cat['verbs'])} {subj} {self._pick(V.CONTEXTS)}",
                f"{subj} is {self._adj('neu', cat)} i guess",
                f"{subj} was about what you would expect",
                f"it was {self._adj('neu', cat)} {self._pick(V.CONTEXTS)}",
            ][t]
        other = "neg" if mood == "pos" else "pos"
        verbs = V.POS_VERBS if mood == "pos" else V.NEG_VERBS
        t = int(self._u() * 8)
        if t == 0:
            return f"{subj} was {self._adj(mood, cat)}"
        if t == 1:
            return f"{subj} is {self._adj(mood, cat)}"
        if t == 2:
            return f"i {self._pick(verbs)} {subj}"
        if t == 3:
            ctx = self._pick(V.CONTEXTS)
            return f"i {self._pick(cat['verbs'])} {subj} {ctx} and it was {self._adj(mood, cat)}"
        if t == 4:
            return f"{subj} was not {self._adj(other, cat)}"
        if t == 5:
            return f"{subj} felt {self._adj(mood, cat)} {self._pick(V.CONTEXTS)}"
        if t == 6:
            neg = "" if mood == "pos" else "not "
            rec = self._pick(V.RECIPIENTS) if self._u() < 0.7 else ""
            return f"i would {neg}recommend {subj} {rec}".strip()
        return f"{subj} looked {self._adj(mood, cat)}"

    def clause(self, mood: str, cat: dict, subj: str) -> str:
        """One clause with verbs agreeing with a plural subject ("these shoes were")."""
        return self._agree(self._clause(mood, cat, subj), subj)

    @staticmethod
    def _agree(text: str, subj: str) -> str:
        if subj.startswith("these ") or subj.endswith(_PLURAL_ENDINGS):
            for sing, plural in (("was", "were"), ("is", "are"), ("sucks", "suck")):
                text = text.replace(f"{subj} {sing} ", f"{subj} {plural} ")
                if text.endswith(f"{subj} {sing}"):
                    text = text[: -len(sing)] + plural
        return text

    def _rude(self, mood: str, cat: dict, subj: str) -> str:
        table = V.RUDE_CLAUSES_POS if mood == "pos" else V.RUDE_CLAUSES_NEG
        return self._pick(table).format(
            subj=subj,
            pos=self._pick(V.POSITIVE + cat["pos"]),
            neg=self._pick(V.NEGATIVE + cat["neg"]),
            rude_adj=self._pick(V.RUDE_ADJ),
            rude_noun=self._pick(V.RUDE_NOUN),
        )

    def _draft(self) -> str:
        mood = self._weighted((("pos", 0.4), ("neg", 0.4), ("neu", 0.1), ("mixed", 0.1)))
        cat = V.CATEGORIES[self._pick(list(V.CATEGORIES))]
        subj = self._pick(cat["subjects"])
        first = mood
        if mood == "mixed":
            first = "pos" if self._u() < 0.5 else "neg"
        clauses = [self.clause(first, cat, subj)]
        if mood == "mixed":
            second = "neg" if first == "pos" else "pos"
            clause = self.clause(second, cat, self._pick(cat["subjects"]))
            clauses[0] = f"{clauses[0]} but {clause}"
        elif self._u() < 0.5:
            subj2 = "it" if self._u() < 0.3 else self._pick(cat["subjects"])
            clauses.append(self.clause(mood, cat, subj2))
        rude_p = {"neg": 0.18, "pos": 0.07}.get(mood, 0.03)
        if self._u() < rude_p:
            rude = self._rude("pos" if mood == "pos" else "neg", cat, subj)
            rude = self._agree(rude, subj)
            clauses.insert(int(self._u() * (len(clauses) + 1)), rude)
        if self._u() < 0.3:
            clauses[0] = f"{self._pick(V.OPENERS)} {clauses[0]}"
        closer_mood = {"mixed": "neu"}.get(mood, mood)
        while len(" ".join(clauses).split()) < 8 or self._u() < 0.3:
            if self._u() < 0.6:
                clauses.append(self._pick(V.CLOSERS[closer_mood]))
            else:
                clauses.append(self.clause(closer_mood, cat, self._pick(cat["subjects"])))
        text = clauses[0]
        for c in clauses[1:]:
            text += f"{self._weighted(_MID_PUNCT)} {c}"
        return text + self._weighted(_END_PUNCT)

    def review(self) -> str:
        """One review of 8-30 words."""
        while True:
            text = self._draft()
            if 8 <= len(text.split()) <= 30:
                return text


def generate_reviews(n: int, seed: int = 0, exclude: set[str] | None = None) -> list[str]:
    """`n` unique reviews (none in `exclude`) from a generator seeded with `seed`."""
    gen, seen, out = ReviewGenerator(seed), set(exclude or ()), []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            break
        text = gen.review()
        if text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) < n:
        raise RuntimeError(f"the generator made only {len(out)} unique reviews of {n} asked")
    return out


def train_tokenizer(texts: list[str], vocab_size: int = 1536) -> tokenizers.Tokenizer:
    """A small BPE tokenizer over `texts` with the task's special tokens at ids 0-3.

    Printable ASCII is in the initial alphabet, so any lowercase English text encodes without
    <unk>; the Metaspace pre-tokenizer and decoder keep spaces exact.
    """
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=sorted(set(string.ascii_letters + string.digits + string.punctuation)),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def _prompts(reviews: list[str], gen_seed: int, n: int, taken: set[str]) -> list[dict]:
    """Up to `n` unique prompts (first 2-5 words) from `reviews`, none in `taken`."""
    import random

    rng, out = random.Random(gen_seed), []
    for text in reviews:
        if len(out) == n:
            break
        words = text.split()
        k = 2 + int(rng.random() * 4)
        prompt = " ".join(words[:k])
        if prompt in taken:
            continue
        taken.add(prompt)
        out.append({"prompt": prompt, "reference": " ".join(words[k:])})
    return out


@dataclasses.dataclass(frozen=True)
class ReviewsTask:
    """Paths of a built reviews task (what `build_reviews_task` returns), and its judges.

    `sft_source`, `prompt_source` and `tokenizer_path` are what `make_sft_iterator` and
    `make_prompt_iterator` read when given `task=`. The judges (`judge`, `gold_reward`) need
    no built task: commands reach them through the class (`TASKS["reviews"].judge`).
    """

    out_dir: str
    settings: dict

    # The names of the scores `judge` returns.
    JUDGE_NAMES: ClassVar[tuple[str, ...]] = tuple(judges.JUDGES)
    GOLD_KINDS: ClassVar[tuple[str, ...]] = judges.GOLD_KINDS

    @staticmethod
    def judge(texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Every judge's scores of decoded texts: `sentiment` (VADER) and `offensiveness`."""
        return judges.score_texts(texts)

    @staticmethod
    def gold_reward(
        scores: Mapping[str, np.ndarray],
        kind: str = "sentiment",
        weights: Mapping[str, float] | None = None,
    ) -> np.ndarray:
        """The gold reward of `kind` from `judge` scores (see `judges.gold_from_scores`).

        Raises:
          ValueError: an unknown kind or bad weights.
        """
        return judges.gold_from_scores(scores, kind, weights)

    @property
    def corpus_dir(self) -> str:
        return os.path.join(self.out_dir, "corpus")

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(self.out_dir, "tokenizer.json")

    @property
    def prompts_path(self) -> str:
        return os.path.join(self.out_dir, "prompts.jsonl")

    @property
    def eval_prompts_path(self) -> str:
        return os.path.join(self.out_dir, "eval_prompts.jsonl")

    @property
    def sft_source(self) -> str:
        return self.corpus_dir

    @property
    def prompt_source(self) -> dict[str, str]:
        return {"train": self.prompts_path, "eval": self.eval_prompts_path}

    def tokenizer(self) -> Tokenizer:
        """The task's tokenizer."""
        return Tokenizer.from_file(self.tokenizer_path)

    def corpus(self) -> datasets.DatasetDict:
        """The corpus (train/eval, column "text")."""
        return datasets.load_from_disk(self.corpus_dir)


_ARTIFACTS = ("corpus", "tokenizer.json", "prompts.jsonl", "eval_prompts.jsonl")


def default_out_dir(num_texts: int, seed: int) -> str:
    """$RLHF_JAX_DATA (default ~/.cache/rlhf_jax) / reviews-n{num_texts}-s{seed}."""
    root = os.environ.get("RLHF_JAX_DATA", os.path.join("~", ".cache", "rlhf_jax"))
    return os.path.join(os.path.expanduser(root), f"reviews-n{num_texts}-s{seed}")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _quiet_save(corpus: datasets.DatasetDict, path: Path) -> None:
    """save_to_disk without the progress bars (restoring the caller's setting)."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        corpus.save_to_disk(str(path))
    finally:
        if not was_disabled:
            enable_progress_bars()


@gin.configurable("reviews_task")
def build_reviews_task(
    out_dir: str | os.PathLike | None = None,
    num_texts: int = 40_000,
    seed: int = 0,
    eval_fraction: float = 0.05,
    num_prompts: int = 4096,
    num_eval_prompts: int = 512,
    vocab_size: int = 1536,
) -> ReviewsTask:
    """Builds (or reuses) the reviews task in `out_dir`.

    Args:
      out_dir: target directory (default `default_out_dir(num_texts, seed)`).
      num_texts: corpus size (train + eval).
      seed: seed of the generator (the only source of randomness).
      eval_fraction: share of the corpus in the "eval" split (at least one text).
      num_prompts: train prompts wanted (fewer are written, with a warning, if the held-out
        reviews run out of distinct 2-5 word openings).
      num_eval_prompts: evaluation prompts wanted (disjoint from the train prompts).
      vocab_size: BPE vocabulary size (an upper bound; merges stop when words are whole).

    Returns:
      The `ReviewsTask` with the paths.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    out = Path(out_dir if out_dir is not None else default_out_dir(num_texts, seed))
    out = out.expanduser()
    check.writable_dir("reviews_task.out_dir (REVIEWS_DIR)", out)
    check.positive_int("reviews_task.num_texts (REVIEWS_NUM_TEXTS)", num_texts)
    check.positive_int("reviews_task.num_prompts", num_prompts)
    check.positive_int("reviews_task.num_eval_prompts", num_eval_prompts)
    check.in_range(
        "reviews_task.eval_fraction", eval_fraction, 0.0, 1.0, low_open=True, high_open=True
    )
    settings = {
        "version": TASK_VERSION,
        "num_texts": num_texts,
        "seed": seed,
        "eval_fraction": eval_fraction,
        "num_prompts": num_prompts,
        "num_eval_prompts": num_eval_prompts,
        "vocab_size": vocab_size,
    }
    meta = out / "task.json"
    if meta.is_file() and all((out / a).exists() for a in _ARTIFACTS):
        try:
            stored = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            stored = None
        if stored is not None and stored.get("settings") == settings:
            return ReviewsTask(str(out), stored)
    n_eval = max(1, int(round(eval_fraction * num_texts)))
    if n_eval >= num_texts:
        raise ValueError(f"num_texts={num_texts} is too small for eval_fraction={eval_fraction}")
    texts = generate_reviews(num_texts, seed)
    eval_texts, train_texts = texts[:n_eval], texts[n_eval:]
    # Prompts come from further reviews, none of which is a corpus text.
    held_out = generate_reviews(3 * (num_prompts + num_eval_prompts), seed + 1, set(texts))
    taken: set[str] = set()
    prompts = _prompts(held_out, seed, num_prompts, taken)
    eval_prompts = _prompts(held_out[::-1], seed + 1, num_eval_prompts, taken)
    if len(prompts) < num_prompts or len(eval_prompts) < num_eval_prompts:
        log.warning(
            "reviews task: only %d/%d train and %d/%d eval prompts are distinct",
            len(prompts),
            num_prompts,
            len(eval_prompts),
            num_eval_prompts,
        )
    tok = train_tokenizer(train_texts, vocab_size)

    out.mkdir(parents=True, exist_ok=True)
    meta.unlink(missing_ok=True)  # the old settings no longer describe the files
    tmp = out / f".build-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        corpus = datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"text": train_texts}),
                "eval": datasets.Dataset.from_dict({"text": eval_texts}),
            }
        )
        _quiet_save(corpus, tmp / "corpus")
        tok.save(str(tmp / "tokenizer.json"))
        _write_jsonl(tmp / "prompts.jsonl", prompts)
        _write_jsonl(tmp / "eval_prompts.jsonl", eval_prompts)
        for a in _ARTIFACTS:
            target = out / a
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp / a, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stored = {
        "settings": settings,
        "sizes": {
            "train_texts": len(train_texts),
            "eval_texts": len(eval_texts),
            "prompts": len(prompts),
            "eval_prompts": len(eval_prompts),
            "vocab_size": tok.get_vocab_size(),
        },
    }
    meta_tmp = out / f".task-{uuid.uuid4().hex}.json"
    meta_tmp.write_text(atomic.dumps(stored, indent=2))
    os.replace(meta_tmp, meta)  # written last: its presence with these settings means "built"
    log.info("built reviews task in %s: %s", out, stored["sizes"])
    return ReviewsTask(str(out), stored)
