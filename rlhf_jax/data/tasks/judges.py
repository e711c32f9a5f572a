"""Gold judges of the reviews task, backed by real external scorers, and the gold reward.

* sentiment: VADER's compound score in [-1, 1] (`vaderSentiment`, Hutto & Gilbert 2014), a
  lexicon-and-rules model; it rewards exclamation marks, capitals and repeated positive words
  (docs/DATA_CARD.md measures this), which is what makes it a gameable gold reward.
* offensiveness: `profanity_check.predict_prob` (alt-profanity-check), a linear SVM over a
  bag of words, in [0, 1].

Both are deterministic functions of the decoded text and run on the host. `gold_reward` is
gin-configurable (`gold_reward.kind`, `gold_reward.weights`):

    sentiment  VADER compound                                   [-1, 1]
    harmless   1 - offensiveness                                [0, 1]
    hh         w_s * sentiment + w_h * harmless (0.5 / 0.5)     [-0.5, 1] by default
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import gin
import numpy as np

GOLD_KINDS = ("sentiment", "harmless", "hh")
DEFAULT_HH_WEIGHTS = {"sentiment": 0.5, "harmless": 0.5}


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def _as_list(texts: Sequence[str] | str) -> list[str]:
    return [texts] if isinstance(texts, str) else [str(t) for t in texts]


def sentiment(texts: Sequence[str]) -> np.ndarray:
    """VADER compound sentiment of each text, float32 [N] in [-1, 1] (0 for empty text)."""
    analyzer = _vader()
    scores = [analyzer.polarity_scores(t)["compound"] for t in _as_list(texts)]
    return np.asarray(scores, dtype=np.float32)


def offensiveness(texts: Sequence[str]) -> np.ndarray:
    """Probability that each text is offensive (alt-profanity-check), float32 [N] in [0, 1]."""
    texts = _as_list(texts)
    if not texts:
        return np.zeros((0,), dtype=np.float32)
    from profanity_check import predict_prob

    return np.asarray(predict_prob(texts), dtype=np.float32)


JUDGES: dict[str, Callable[[Sequence[str]], np.ndarray]] = {
    "sentiment": sentiment,
    "offensiveness": offensiveness,
}


def score_texts(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Every judge's scores of `texts` (name -> float32 [N]), e.g. for samples.jsonl."""
    texts = _as_list(texts)
    return {name: judge(texts) for name, judge in JUDGES.items()}


def gold_from_scores(
    scores: Mapping[str, np.ndarray],
    kind: str = "sentiment",
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """The gold reward from precomputed `score_texts` output (no second scoring pass).

    Args:
      scores: judge name -> scores, as returned by `score_texts`.
      kind: "sentiment", "harmless" or "hh".
      weights: for "hh", {"sentiment": w_s, "harmless": w_h} (default 0.5 / 0.5).

    Returns:
      float32 [N] rewards.
    """
    if kind not in GOLD_KINDS:
        raise ValueError(f"unknown gold reward kind {kind!r}; choose one of {GOLD_KINDS}")
    if kind == "sentiment":
        return np.asarray(scores["sentiment"], dtype=np.float32)
    harmless = 1.0 - np.asarray(scores["offensiveness"], dtype=np.float32)
    if kind == "harmless":
        return harmless
    w = dict(DEFAULT_HH_WEIGHTS if weights is None else weights)
    unknown = set(w) - {"sentiment", "harmless"}
    if unknown:
        raise ValueError(f"hh weights take 'sentiment' and 'harmless', got {sorted(unknown)}")
    out = w.get("sentiment", 0.0) * np.asarray(scores["sentiment"], dtype=np.float32)
    return (out + w.get("harmless", 0.0) * harmless).astype(np.float32)


@gin.configurable("gold_reward", denylist=["texts"])
def gold_reward(
    texts: Sequence[str],
    kind: str = "sentiment",
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """The gold reward of decoded texts.

    Args:
      texts: decoded texts (a batch).
      kind: "sentiment" (VADER compound), "harmless" (1 - offensiveness) or "hh" (mix).
      weights: for "hh", {"sentiment": w_s, "harmless": w_h} (default 0.5 / 0.5).

    Returns:
      float32 [N] rewards.
    """
    texts = _as_list(texts)
    if kind not in GOLD_KINDS:
        raise ValueError(f"unknown gold reward kind {kind!r}; choose one of {GOLD_KINDS}")
    needed = {"sentiment": ["sentiment"], "harmless": ["offensiveness"]}.get(
        kind, ["sentiment", "offensiveness"]
    )
    scores = {name: JUDGES[name](texts) for name in needed}
    return gold_from_scores(scores, kind, weights)
