"""Shared by the test folders (tests/ is on sys.path through tests/conftest.py): a file lock for
fixtures that xdist workers build once and share, the folder they share it in, and preference
pairs made from the reviews corpus (tests/conftest.py's `reviews` fixture)."""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

# Command-line flags of a short, quiet test run: no warm-up, a metrics record every step, eval only
# at the end on one batch, no progress bar, TensorBoard or background checkpoint writes.
QUIET_RUN = (
    "--gin.WARMUP_STEPS=0",
    "--gin.LOG_EVERY=1",
    "--gin.EVAL_EVERY=0",
    "--gin.LoopConfig.eval_batches=1",
    "--gin.LoopConfig.progress_bar=False",
    "--gin.LoopConfig.tensorboard=False",
    "--gin.LoopConfig.async_checkpointing=False",
    "--log_level=WARNING",
)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock shared by the xdist workers (one builds, the others wait and reuse)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def xdist_shared_dir(tmp_path_factory, name: str) -> Path:
    """`name` under the session's base temp folder, the same for all xdist workers."""
    root = tmp_path_factory.getbasetemp()
    if root.name.startswith("popen-gw"):
        root = root.parent
    return root / name


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
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows[9::10]).to_parquet(out_dir / "eval.parquet")
    pd.DataFrame([r for i, r in enumerate(rows) if i % 10 != 9]).to_parquet(
        out_dir / "train.parquet"
    )
    return len(rows)
