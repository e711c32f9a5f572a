"""The contract every algorithm's step keeps, checked once for each entry of `CASES`
(tests/algo_helpers.py): gradient accumulation is exact, traced hyperparameters never
recompile, a non-finite update is skipped and recorded, one device equals the 2x2x2 mesh, and
eval sums ignore padding rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from algo_helpers import CASES, ROWS, jitted

pytestmark = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _close(a, b, **tol):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


def test_gradient_accumulation_is_exact(case):
    state, frozen = case.state("8")
    batch, hp = case.batch(1), case.hparams(1)
    s1, m1 = jitted(case.algo(1), "8")(state, frozen, batch, hp)
    s2, m2 = jitted(case.algo(2), "8")(state, frozen, batch, hp)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-4)
    _close(s1.models, s2.models, rtol=1e-4, atol=1e-6)


def test_traced_hparams_compile_once(case):
    state, frozen = case.state("1")
    traces: list = []
    step = jitted(case.algo(1), "1", counter=traces)
    batch = case.batch(2)
    s_zero, m_zero = step(state, frozen, batch, case.hparams(0, lr_scale=0.0))
    s_one, m_one = step(state, frozen, batch, case.hparams(1, lr_scale=1.0))
    step(state, frozen, batch, case.hparams(2, lr_scale=0.5, debug_nan_step=3))
    assert len(traces) == 1
    assert float(m_zero["lr"]) == 0.0 and float(m_one["lr"]) > 0.0
    for a, b in zip(_leaves(s_zero.policy.params), _leaves(state.policy.params), strict=True):
        np.testing.assert_array_equal(a, b)  # lr_scale 0: no parameter moves
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(_leaves(s_one.policy.params), _leaves(state.policy.params), strict=True)
    )


def test_nonfinite_update_is_skipped_and_recorded(case):
    state, frozen = case.state("1")
    step = jitted(case.algo(1), "1")
    hp = case.hparams(0, debug_nan_step=0)
    s1, m1 = step(state, frozen, case.batch(3), hp)
    assert np.isnan(float(m1["loss"]))
    assert int(s1.step) == 1 and int(s1.nonfinite.skipped) == 1
    assert int(s1.nonfinite.last_step) == 0 and int(s1.nonfinite.last_kind) == 3
    for a, b in zip(_leaves(s1.models), _leaves(state.models), strict=True):
        np.testing.assert_array_equal(a, b)  # parameters and optimiser state kept
    s2, m2 = step(s1, frozen, case.batch(3), hp)  # iteration 1 is clean again
    assert np.isfinite(float(m2["loss"])) and int(s2.nonfinite.skipped) == 1


def test_one_device_equals_2x2x2_mesh(case):
    batch, hp = case.batch(4), case.hparams(1)
    results = []
    for name in ("1", "8"):
        state, frozen = case.state(name)
        step = jitted(case.algo(1), name)
        for _ in range(2):
            state, metrics = step(state, frozen, batch, hp)
        results.append((state, jax.device_get(metrics)))
    (s1, m1), (s8, m8) = results
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)
    _close(s1.models, s8.models, rtol=2e-4, atol=2e-6)
    sharded = [x for x in jax.tree.leaves(s8.models) if not x.sharding.is_fully_replicated]
    assert sharded, "the 2x2x2 run should shard some parameters"


def test_eval_sums_ignore_padding_rows(case):
    state, frozen = case.state("1")
    evaluate = jitted(case.algo(1), "1", step=False)
    hp, batch, keep = case.hparams(0), case.batch(5), ROWS // 2
    padded = {k: v.copy() for k, v in batch.items()}
    padded["valid"][keep:] = 0
    for k, v in padded.items():  # garbage in the padding rows must change nothing
        if k.endswith("input_ids"):
            v[keep:] = 5
    top = {k: v[:keep] for k, v in batch.items()}
    s_pad = jax.device_get(evaluate(state, frozen, padded, hp))
    s_top = jax.device_get(evaluate(state, frozen, top, hp))
    assert float(s_pad[case.rows_of]) == float(s_top[case.rows_of]) > 0
    for k in s_top:
        np.testing.assert_allclose(s_pad[k], s_top[k], rtol=1e-5, atol=1e-5, err_msg=k)
    summary = case.algo(1).summarize_eval({k: float(v) for k, v in s_pad.items()})
    assert np.isfinite(summary["loss"])
