"""Helpers of the DPO tests: tiny train states and compiled steps shared within a session (on
top of tests/algo_helpers.py), and preference pairs made from the reviews corpus."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
from algo_helpers import jitted, make_pair_batch, mesh, policy_state  # noqa: F401

from rlhf_jax.steps.dpo import DPOConfig
from rlhf_jax.train.optim import make_optimizer

# Adam as the DPO stage runs it: the step tests check that the loss moves.
ADAM = make_optimizer(learning_rate=1e-3, schedule="constant", clip_norm=None)


def tiny_state(mesh_name: str, *, with_ref: bool = True):
    """(fresh policy state, `Frozen` holding the initial policy as "ref" or nothing)."""
    return policy_state(mesh_name, ref=with_ref, optimizer=ADAM)


@functools.cache
def cached_dpo_step(cfg: DPOConfig, mesh_name: str):
    """One compiled DPO step per (config, mesh) for the whole session, and its trace list."""
    counter: list = []
    return jitted(cfg, mesh_name, counter=counter), counter


# ----------------------------------------------------------------------------- on-disk data


POS = set(
    "good great excellent amazing wonderful fantastic lovely nice perfect awesome brilliant superb "
    "pleasant impressive enjoyable outstanding loved enjoyed liked adored recommend tasty "
    "delicious friendly helpful gem best".split()
)
NEG = set(
    "bad terrible awful horrible poor disappointing mediocre useless annoying overpriced lousy "
    "hated disliked regretted stale bland rude dirty broken boring letdown worst crap sucks "
    "waste".split()
)


def lexicon_score(text: str) -> float:
    """A crude sentiment score: positive minus negative words, a preceding "not" flips one."""
    words = [w.strip(".,!?") for w in text.split()]
    score = 0.0
    for i, w in enumerate(words):
        s = (w in POS) - (w in NEG)
        if s and "not" in words[max(0, i - 3) : i]:
            s = -s
        score += s
    return score


def write_review_preferences(texts: list[str], out_dir: Path, prompt_words: int = 2) -> int:
    """Pairs (prompt = shared first words, chosen = the rest of a positive review, rejected =
    the rest of a negative one) in the `make-preferences` layout (`train.parquet` and every
    tenth pair in `eval.parquet`, with prompt, chosen, rejected, chosen_score,
    rejected_score); returns the number of pairs."""
    groups: dict[str, tuple[list, list]] = {}
    for t in texts:
        words = t.split()
        s = lexicon_score(t)
        if s == 0 or len(words) <= prompt_words + 2:
            continue
        prompt = " ".join(words[:prompt_words])
        groups.setdefault(prompt, ([], []))[0 if s > 0 else 1].append((t, s))
    rows = []
    for prompt, (pos, neg) in sorted(groups.items()):
        for (c, cs), (r, rs) in zip(pos, neg, strict=False):
            rows.append({"prompt": prompt, "chosen": c[len(prompt):], "rejected": r[len(prompt):],
                         "chosen_score": cs, "rejected_score": rs})  # fmt: skip
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows[9::10]).to_parquet(out_dir / "eval.parquet")
    pd.DataFrame([r for i, r in enumerate(rows) if i % 10 != 9]).to_parquet(
        out_dir / "train.parquet"
    )
    return len(rows)
