"""Helpers of the DPO tests: tiny train states and compiled steps shared within a session (on
top of tests/algo_helpers.py), and preference pairs made from the reviews corpus."""

from __future__ import annotations

import functools

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
