"""Helpers of the DPO tests: random preference batches, tiny train states and compiled steps
shared within a session, and preference pairs made from the reviews corpus."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import partitioning
from rlhf_jax.models import model_config
from rlhf_jax.steps.dpo import DPOConfig, dpo_step
from rlhf_jax.train import stages
from rlhf_jax.train.optim import make_optimizer

VOCAB, SEQ = 64, 24


def make_pair_batch(seed: int, rows: int = 8, seq: int = SEQ, vocab: int = VOCAB) -> dict:
    """A random right-padded preference batch with prompts shared by chosen and rejected."""
    rng = np.random.default_rng(seed)
    out = {}
    prompt_len = rng.integers(2, 6, size=rows)
    prompts = rng.integers(3, vocab, size=(rows, seq))
    for side in ("chosen", "rejected"):
        ids = np.zeros((rows, seq), np.int32)
        attn = np.zeros((rows, seq), np.int32)
        loss = np.zeros((rows, seq), np.int32)
        for r in range(rows):
            n = int(rng.integers(prompt_len[r] + 2, seq + 1))
            ids[r, :n] = rng.integers(3, vocab, size=n)
            ids[r, : prompt_len[r]] = prompts[r, : prompt_len[r]]
            ids[r, 0] = 1
            attn[r, :n] = 1
            loss[r, prompt_len[r] : n] = 1
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn,
                    f"{side}_loss_mask": loss})  # fmt: skip
    out["margin"] = np.zeros((rows,), np.float32)
    return out


@functools.cache
def mesh(name: str):
    """ "1": one device; "8": the 2x2x2 mesh of the 8 fake CPU devices."""
    if name == "1":
        return partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
    return partitioning.make_mesh((2, 2, 2))


@functools.cache
def tiny_factory(mesh_name: str, *, with_ref: bool = True, lr: float = 1e-3):
    """(StateFactory, graphdef) of the tiny model (vocab 64) on `mesh(mesh_name)`."""
    cfg = model_config("tiny", vocab_size=VOCAB, max_seq_len=32)
    optimizer = make_optimizer(learning_rate=lr, schedule="constant", clip_norm=None)
    rules = partitioning.logical_rules()
    return stages.model_state_factory(
        cfg, optimizer, mesh(mesh_name), rules, seed=0, with_ref=with_ref
    )


@functools.cache
def tiny_state(mesh_name: str, *, with_ref: bool = True):
    """A fresh `TrainState` of the tiny model and its graphdef.

    Cached: the steps below never donate their input, so tests can share the initial state.
    """
    factory, graphdef = tiny_factory(mesh_name, with_ref=with_ref)
    return factory.init(), graphdef


def jit_step(
    fn, mesh_name: str, *, with_ref: bool = True, counter: list | None = None, step: bool = True
):
    """`jax.jit(fn)` as the loop compiles it (the state in and, for a `step`, out in its
    shardings), called under the mesh and rules on host batches; `counter` gets one entry per
    trace."""

    def counted(state, batch, rng, hp):
        if counter is not None:
            counter.append(1)
        return fn(state, batch, rng, hp)

    m = mesh(mesh_name)
    state_sh = tiny_factory(mesh_name, with_ref=with_ref)[0].shardings
    rep = NamedSharding(m, PartitionSpec())
    out_sh = (state_sh, rep) if step else rep
    jitted = jax.jit(counted, in_shardings=(state_sh, None, None, None), out_shardings=out_sh)

    def call(state, batch, rng, hp):
        with jax.set_mesh(m), nnx.logical_axis_rules(partitioning.logical_rules()):
            return jitted(state, partitioning.make_global_batch(batch, m), rng, hp)

    return call


@functools.cache
def cached_dpo_step(cfg: DPOConfig, mesh_name: str, with_ref: bool = True):
    """One compiled `dpo_step` per (config, mesh) for the whole session, and its trace list.

    Tests that share one must use the same batch shapes (8 pairs of `SEQ` tokens) and hparams
    structure, so that the trace-count test can assert exactly one trace.
    """
    counter: list = []
    step = jit_step(functools.partial(dpo_step, cfg=cfg), mesh_name, with_ref=with_ref,
                    counter=counter)  # fmt: skip
    return step, counter


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
