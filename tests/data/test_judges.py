"""Gold judges: real VADER / profanity-check scores on fixed sentences, the gold-reward kinds,
gin selection, and determinism."""

from __future__ import annotations

import gin
import numpy as np
import pytest

from rlhf_jax.data.tasks import JUDGES, gold_reward, score_texts
from rlhf_jax.data.tasks.judges import gold_from_scores, offensiveness, sentiment

NICE = ["the food was great", "good", "the pizza was amazing!"]
RUDE = ["you stupid idiot", "this crap sucks"]


def test_vader_exact_values_and_exclamation_hack():
    s = sentiment(["good", "good!", "good good good!!!", "the food was great", "", "bad"])
    assert s.dtype == np.float32 and s.shape == (6,)
    np.testing.assert_allclose(s[:5], [0.4404, 0.4926, 0.8617, 0.6249, 0.0], atol=1e-4)
    assert s[5] < 0
    # The gameable part: repetition and "!" push the score up.
    assert s[2] > s[1] > s[0]


def test_sentiment_signs_and_order():
    s = sentiment(["the food was great", "the service was okay", "the food was terrible"])
    assert s[0] > 0.5 and s[2] < -0.4 and s[0] > s[1] > s[2]


def test_offensiveness():
    o = offensiveness(RUDE + NICE)
    assert o.dtype == np.float32
    assert (o[:2] > 0.5).all() and (o[2:] < 0.1).all()
    assert offensiveness([]).shape == (0,)


def test_score_texts_returns_every_judge():
    scores = score_texts(NICE + RUDE)
    assert set(scores) == set(JUDGES) == {"sentiment", "offensiveness"}
    assert all(v.shape == (5,) for v in scores.values())
    again = score_texts(NICE + RUDE)  # deterministic
    for k in scores:
        np.testing.assert_array_equal(scores[k], again[k])


def test_gold_reward_kinds():
    texts = NICE + RUDE
    scores = score_texts(texts)
    np.testing.assert_allclose(gold_reward(texts), scores["sentiment"])
    harmless = gold_reward(texts, kind="harmless")
    np.testing.assert_allclose(harmless, 1 - scores["offensiveness"], rtol=1e-6)
    hh = gold_reward(texts, kind="hh")
    np.testing.assert_allclose(hh, 0.5 * scores["sentiment"] + 0.5 * harmless, rtol=1e-6)
    w = {"sentiment": 0.2, "harmless": 0.8}
    np.testing.assert_allclose(
        gold_reward(texts, kind="hh", weights=w),
        0.2 * scores["sentiment"] + 0.8 * harmless,
        rtol=1e-6,
    )
    np.testing.assert_allclose(gold_from_scores(scores, "hh", w), gold_reward(texts, "hh", w))
    assert (hh[: len(NICE)] > hh[len(NICE) :].max()).all()
    with pytest.raises(ValueError, match="unknown gold reward kind"):
        gold_reward(texts, kind="helpful")
    with pytest.raises(ValueError, match="hh weights"):
        gold_reward(texts, kind="hh", weights={"fun": 1.0})


def test_gold_reward_is_gin_selectable():
    gin.parse_config("gold_reward.kind = 'harmless'")
    np.testing.assert_allclose(gold_reward(RUDE), 1 - offensiveness(RUDE), rtol=1e-6)
