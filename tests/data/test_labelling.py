"""`label_pairs` and the Bradley-Terry labelling: empirical choice rates against σ(Δ/T), the
noiseless limit, dropped pairs, and the prompt split."""

import numpy as np
import pytest

from rlhf_jax.data.labelling import label_pairs, preference_probability, split_prompts
from rlhf_jax.errors import SettingsError


def _rows(num_prompts: int, k: int, rng: np.random.Generator) -> tuple[list[dict], np.ndarray]:
    """k distinct completions per prompt with random gold scores (prompt-major)."""
    rows = [
        {"prompt": f"p{i}", "completion": f"c{i}-{j}", "sentiment": float(j)}
        for i in range(num_prompts)
        for j in range(k)
    ]
    return rows, rng.normal(size=len(rows))


def test_preference_probability_closed_form():
    diff = np.array([-2.0, -0.1, 0.0, 0.3, 5.0])
    for t in (0.05, 0.5, 2.0):
        np.testing.assert_allclose(
            preference_probability(diff, t), 1.0 / (1.0 + np.exp(-diff / t)), rtol=1e-12
        )
    np.testing.assert_array_equal(preference_probability(diff, 0.0), [0, 0, 0.5, 1, 1])
    # No overflow (nor warning) for huge Δ/T.
    with np.errstate(all="raise"):
        np.testing.assert_array_equal(preference_probability(np.array([-1e3, 1e3]), 1e-9), [0, 1])
    with pytest.raises(ValueError, match=">= 0"):
        preference_probability(diff, -1.0)


@pytest.mark.parametrize("temperature", [0.25, 1.0])
def test_choice_rate_matches_bradley_terry(temperature):
    """Binned by σ(Δ/T), the rate at which the higher-gold completion is chosen matches it."""
    rows, gold = _rows(20_000, 2, np.random.default_rng(1))
    pairs = label_pairs(
        rows, gold, num_samples=2, temperature=temperature, rng=np.random.default_rng(0)
    )
    assert len(pairs) == 20_000
    hi = np.array([max(p["chosen_score"], p["rejected_score"]) for p in pairs])
    lo = np.array([min(p["chosen_score"], p["rejected_score"]) for p in pairs])
    chose_higher = np.array([p["chosen_score"] >= p["rejected_score"] for p in pairs])
    expected = 1.0 / (1.0 + np.exp(-(hi - lo) / temperature))
    # Overall and within bins of the predicted probability (4 binomial standard errors).
    for lo_p, hi_p in [(0.5, 1.01), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01)]:
        sel = (expected >= lo_p) & (expected < hi_p)
        assert sel.sum() > 500
        se = np.sqrt(np.mean(expected[sel] * (1 - expected[sel])) / sel.sum())
        assert abs(chose_higher[sel].mean() - expected[sel].mean()) < 4 * se + 1e-3
    # label_prob is the probability of the label drawn.
    label_prob = np.array([p["label_prob"] for p in pairs])
    np.testing.assert_allclose(label_prob, np.where(chose_higher, expected, 1 - expected))


def test_zero_temperature_is_deterministic():
    rows, gold = _rows(500, 4, np.random.default_rng(2))
    runs = [
        label_pairs(rows, gold, num_samples=4, temperature=0.0, rng=np.random.default_rng(s))
        for s in (0, 1)
    ]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 1000  # K // 2 disjoint pairs per prompt
    assert all(p["chosen_score"] > p["rejected_score"] for p in runs[0])
    assert all(p["label_prob"] == 1.0 for p in runs[0])


def test_same_rng_same_labels_and_fields_copied():
    rows, gold = _rows(50, 2, np.random.default_rng(3))
    kw = dict(num_samples=2, temperature=0.5, fields=["sentiment"])
    a = label_pairs(rows, gold, rng=np.random.default_rng(7), **kw)
    b = label_pairs(rows, gold, rng=np.random.default_rng(7), **kw)
    assert a == b
    for p in a:
        i = int(p["chosen"].split("-")[1])
        assert p["chosen_sentiment"] == float(i) and p["rejected_sentiment"] == float(1 - i)
        assert set(p) == {
            "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "label_prob",
            "chosen_sentiment", "rejected_sentiment",
        }  # fmt: skip


def test_identical_and_empty_completions_are_dropped():
    rows = [
        {"prompt": "a", "completion": "same"},
        {"prompt": "a", "completion": "same"},
        {"prompt": "b", "completion": "x"},
        {"prompt": "b", "completion": "  "},
        {"prompt": "c", "completion": "good"},
        {"prompt": "c", "completion": "bad"},
    ]
    gold = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    pairs = label_pairs(rows, gold, num_samples=2, temperature=0.0, rng=np.random.default_rng(0))
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("c", "good", "bad")]


def test_odd_k_leaves_one_sample_unpaired():
    rows, gold = _rows(10, 3, np.random.default_rng(4))
    pairs = label_pairs(rows, gold, num_samples=3, temperature=0.0, rng=np.random.default_rng(0))
    assert len(pairs) == 10
    assert all(not p["chosen"].endswith("-2") and not p["rejected"].endswith("-2") for p in pairs)


def test_bad_arguments():
    rows, gold = _rows(3, 2, np.random.default_rng(5))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least 2"):
        label_pairs(rows, gold, num_samples=1, temperature=1.0, rng=rng)
    with pytest.raises(ValueError, match="whole number"):
        label_pairs(rows[:5], gold[:5], num_samples=2, temperature=1.0, rng=rng)
    with pytest.raises(ValueError, match="shape"):
        label_pairs(rows, gold[:4], num_samples=2, temperature=1.0, rng=rng)
    mixed = [dict(rows[0]), dict(rows[1], prompt="other")]
    with pytest.raises(ValueError, match="different prompts"):
        label_pairs(mixed, gold[:2], num_samples=2, temperature=1.0, rng=rng)


def test_split_prompts_by_distinct_prompt():
    prompts = [f"p{i % 40}" for i in range(100)]  # duplicates share their split
    ev = split_prompts(prompts, 0.25, np.random.default_rng(0))
    assert len(ev) == 10 and ev <= set(prompts)
    assert split_prompts(prompts, 0.0, np.random.default_rng(0)) == set()
    assert len(split_prompts(prompts, 0.001, np.random.default_rng(0))) == 1
    with pytest.raises(SettingsError, match="no training prompts"):
        split_prompts(["a"], 0.5, np.random.default_rng(0))
