"""The algorithms under the shared contract tests (tests/train/test_algorithm_contract.py) and the
helpers they and the per-algorithm tests share: meshes, tiny states, jitted steps with a trace
counter, and random batches. A new algorithm gets the contract tests by adding a `Case`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from rlhf_jax import partitioning
from rlhf_jax.models import model_config
from rlhf_jax.steps.algorithm import Algorithm, HParams, eval_step, train_step
from rlhf_jax.steps.dpo import DPOConfig, DPOHParams
from rlhf_jax.steps.reward import RewardConfig, RewardHParams
from rlhf_jax.steps.sft import SFTConfig
from rlhf_jax.steps.state import Frozen
from rlhf_jax.train import stages
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.reward_init import reward_state_factory
from rlhf_jax.train.synthetic import SyntheticSFTIterator

VOCAB, SEQ, ROWS = 64, 24, 8
TINY = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64)


@functools.cache
def mesh(name: str):
    """ "1": one device; "8": the 2x2x2 mesh of the 8 fake CPU devices."""
    if name == "1":
        return partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
    return partitioning.make_mesh((2, 2, 2))


def tiny_config(vocab: int = VOCAB, max_seq_len: int = 32, **overrides):
    return model_config("tiny", vocab_size=vocab, max_seq_len=max_seq_len, **{**TINY, **overrides})


def make_pair_batch(seed: int, rows: int = ROWS, seq: int = SEQ, vocab: int = VOCAB) -> dict:
    """A random right-padded preference batch (prompts shared by chosen and rejected) with a
    margin, gold scores and a label probability, all rows valid."""
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
    out["margin"] = rng.random(rows).astype(np.float32)
    out["valid"] = np.ones((rows,), np.int32)
    out["chosen_score"] = rng.normal(size=rows).astype(np.float32)
    out["rejected_score"] = rng.normal(size=rows).astype(np.float32)
    out["label_prob"] = rng.random(rows).astype(np.float32)
    return out


def make_sft_batch(seed: int, rows: int = ROWS) -> dict:
    batch = next(SyntheticSFTIterator(rows, SEQ, VOCAB, seed=seed))
    return dict(batch, valid=np.ones((rows,), np.int32))


def sgd(lr: float = 0.5):
    # SGD without clipping: parameter changes are then the gradients themselves, comparable
    # across meshes and accumulation (Adam would amplify rounding noise of near-zero gradients).
    return make_optimizer(name="sgd", learning_rate=lr, schedule="constant", clip_norm=None)


@functools.cache
def policy_state(mesh_name: str, *, ref: bool = False, optimizer: Any = None):
    """(fresh policy `TrainState`, `Frozen` with the initial policy as "ref" or empty)."""
    m, rules = mesh(mesh_name), partitioning.logical_rules()
    factory, graphdef = stages.model_state_factory(tiny_config(), optimizer or sgd(), m, rules)
    with jax.set_mesh(m), nnx.logical_axis_rules(rules):
        state = factory.init()
    frozen = Frozen({"ref": state.policy.params}, {"ref": graphdef}) if ref else Frozen()
    return state, frozen


@functools.cache
def reward_state(mesh_name: str, num_heads: int = 3):
    m, rules = mesh(mesh_name), partitioning.logical_rules()
    factory, _ = reward_state_factory(tiny_config(), sgd(), m, rules, num_heads=num_heads)
    with jax.set_mesh(m), nnx.logical_axis_rules(rules):
        return factory.init(), Frozen()


def jitted(algo: Algorithm, mesh_name: str, *, step: bool = True, counter: list | None = None):
    """`train_step` (or `eval_step`) of `algo` jitted as the loop does (no donation: tests reuse
    their states), called under the mesh and rules on host batches."""
    fn = functools.partial(train_step if step else eval_step, cfg=algo)

    def counted(*args):
        if counter is not None:
            counter.append(1)  # runs at trace time only
        return fn(*args)

    m, rules = mesh(mesh_name), partitioning.logical_rules()
    compiled = jax.jit(counted)

    def call(state, frozen, batch, hp, rng=None):
        with jax.set_mesh(m), nnx.logical_axis_rules(rules):
            batch = partitioning.make_global_batch(batch, m)
            return compiled(state, frozen, batch, jax.random.key(0) if rng is None else rng, hp)

    return call


@dataclasses.dataclass(frozen=True)
class Case:
    """One algorithm under the contract tests.

    Attributes:
      name: test id.
      algo: builds the algorithm with `grad_accum_steps`.
      state: `(mesh_name) -> (state, frozen)`.
      batch: `(seed) -> host batch` of `ROWS` rows, with a `valid` column.
      loss_hparams: `(variant) -> loss hparams`; variants 0, 1, 2 differ in value only.
      rows_of: the eval sum that counts the batch's valid rows.
    """

    name: str
    algo: Callable[[int], Algorithm]
    state: Callable[[str], tuple[Any, Frozen]]
    batch: Callable[[int], dict]
    loss_hparams: Callable[[int], Any]
    rows_of: str

    def hparams(self, variant: int = 0, **update) -> HParams:
        return HParams.create(self.loss_hparams(variant), **update)


CASES = [
    Case(
        "sft",
        lambda accum: SFTConfig(grad_accum_steps=accum, logits_chunk_size=8),
        lambda m: policy_state(m),
        make_sft_batch,
        lambda v: None,
        "tokens",
    ),
    Case(
        "reward",
        lambda accum: RewardConfig(grad_accum_steps=accum, num_heads=3),
        lambda m: reward_state(m),
        make_pair_batch,
        lambda v: RewardHParams.create(
            label_smoothing=0.1 * v,
            center_coef=0.01 * v,
            margin_scale=1.0 - 0.3 * v,
            bootstrap_seed=v,
        ),  # fmt: skip
        "pairs",
    ),
    Case(
        "dpo",
        lambda accum: DPOConfig(grad_accum_steps=accum, logits_chunk_size=8),
        lambda m: policy_state(m, ref=True),
        make_pair_batch,
        lambda v: DPOHParams.create(beta=0.1 * (v + 1), label_smoothing=0.05 * v),
        "pairs",
    ),
]
