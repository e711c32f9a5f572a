"""Iterations are counted apart from optimiser steps: a stage whose algorithm takes 3 optimiser
steps per iteration runs TRAIN_STEPS iterations, and its learning-rate schedule spans all
3 * TRAIN_STEPS optimiser steps."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import numpy as np
import optax
from runtime_helpers import bind_tiny_sft

from rlhf_jax.steps.algorithm import one_update
from rlhf_jax.steps.sft import SFTConfig
from rlhf_jax.train.metrics import read_metrics
from rlhf_jax.train.sft import SFTRecipe, synthetic_sft_data
from rlhf_jax.train.stage import run_stage

K = 3


@dataclasses.dataclass(frozen=True)
class ThreeStepSFT(SFTConfig):
    """A fake online-RL-like algorithm: K optimiser steps on the batch per iteration."""

    optimizer_steps_per_iteration: ClassVar[int] = K

    def update(self, state, frozen, batch, rng, hp):
        metrics = {}
        for k in range(K):
            opt_step = state.step * K + k
            state, metrics = one_update(self, state, frozen, batch, jax.random.fold_in(rng, k),
                                        hp, opt_step=opt_step)  # fmt: skip
        return state, metrics


def _counts(opt_state) -> set[int]:
    """The step counters optax keeps in the optimiser state (schedule and Adam counts)."""
    leaves = jax.tree_util.tree_leaves_with_path(opt_state)
    return {int(v) for p, v in leaves if "count" in jax.tree_util.keystr(p)}


def test_iterations_apart_from_optimizer_steps(tmp_path):
    iterations, peak = 4, 1e-2
    extra = (
        f"LR_SCHEDULE = 'warmup_linear'\nWARMUP_STEPS = 0\nLEARNING_RATE = {peak}\nLOG_EVERY = 1\n"
    )
    bind_tiny_sft(tmp_path / "run", iterations, extra)
    data = functools.partial(synthetic_sft_data, seq_len=16, vocab_size=48)
    recipe = SFTRecipe(ThreeStepSFT(logits_chunk_size=8), data)
    result = run_stage(recipe, run_dir=str(tmp_path / "run"), batch_size=8)
    assert result.status == "done" and int(result.state.step) == iterations
    assert _counts(result.state.policy.opt_state) == {K * iterations}
    # The schedule decays over all K * iterations optimiser steps (to final_lr_ratio * peak):
    # the last iteration's last optimiser step is step K * iterations - 1 of it.
    schedule = optax.linear_schedule(peak, 0.1 * peak, K * iterations)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, iterations + 1))
    lrs = [r["train/lr"] for r in records]
    expected = [float(schedule(K * i + K - 1)) for i in range(iterations)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert result.summary["compile/step_traces"] == 1
