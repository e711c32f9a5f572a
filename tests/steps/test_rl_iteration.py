"""The online-RL iteration on a tiny policy and a synthetic reward (share of a target token):
determinism, one compile across hyperparameters, no host transfers, learning (RLOO and PPO),
the critic as a value head on the policy's trunk, the two-program split against the one-program
iteration, a factorial grid of switches, the NaN guard, and settings validation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import partitioning as P
from rlhf_jax.errors import SettingsError, UserError
from rlhf_jax.models import ScalarModel, Transformer, ValueHead, model_config
from rlhf_jax.steps import rl
from rlhf_jax.steps.rl_config import RLConfig, RLHParams, create_rl_state
from rlhf_jax.steps.rollout import completion_logps, completion_logps_and_values, tokens_scorer
from rlhf_jax.steps.state import Frozen, ModelState
from rlhf_jax.train.optim import make_optimizer

V, TARGET, EOS = 16, 3, 1
MCFG = model_config(
    "tiny", vocab_size=V, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=24
)
BASE = dict(prompts_per_iteration=4, samples_per_prompt=4, max_new_tokens=8, eos_id=EOS,
            logits_chunk_size=8)  # fmt: skip
RLOO = RLConfig(estimator="rloo", num_minibatches=2, **BASE)
PPO = RLConfig(estimator="ppo", value_model="separate", value_clip=True, entropy_bonus=True,
               whiten_advantages=True, epochs=2, num_minibatches=2, critic_warmup=1,
               **BASE)  # fmt: skip
# PPO whose critic is a value head on the policy's trunk.
HEAD = RLConfig(estimator="ppo", value_model="head", whiten_advantages=True, epochs=2,
                num_minibatches=2, **BASE)  # fmt: skip
# The programs here are tiny, and the shared 2-core machine's cost is XLA's compile time:
# skipping LLVM's expensive passes halves it and changes no semantics.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def share_of_target(tokens, mask):
    """The synthetic reward: the share of completion tokens equal to TARGET (NumPy or jnp)."""
    xp = jnp if isinstance(tokens, jax.Array) else np
    m = (mask != 0).astype(xp.float32)
    return xp.sum((tokens == TARGET) * m, -1) / xp.maximum(m.sum(-1), 1.0)


score_fn = tokens_scorer(share_of_target)


@functools.cache
def _mesh():
    return P.make_mesh((1, 1, 1), jax.devices()[:1]), P.logical_rules()


def _setup(cfg: RLConfig, hp: RLHParams):
    """(state, frozen, prompts): fresh arrays every call (the reference is a separate copy)."""
    mesh, rules = _mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        g, p = nnx.split(Transformer(MCFG, rngs=nnx.Rngs(0)), nnx.Param)
        opt = make_optimizer(name="adam", learning_rate=1e-2, clip_norm=1.0)
        value = None
        if cfg.value_head:
            gv, pv = nnx.split(ValueHead(MCFG, rngs=nnx.Rngs(1)), nnx.Param)
            value = ModelState.create(graphdef=gv, params=pv, optimizer=opt)
        elif cfg.has_critic:
            gv, pv = nnx.split(ScalarModel(MCFG, rngs=nnx.Rngs(1)), nnx.Param)
            value = ModelState.create(graphdef=gv, params=pv, optimizer=opt)
        policy = ModelState.create(graphdef=g, params=p, optimizer=opt)
        state = create_rl_state(policy=policy, value=value, hp=hp)
        frozen = Frozen(params={"ref": jax.tree.map(jnp.copy, p)}, graphdefs={"ref": g})
    ids = np.random.RandomState(0).randint(2, V, (cfg.prompts_per_iteration, 5))
    mask = np.ones_like(ids)
    mask[1, :2] = mask[2, :1] = 0  # left padding
    prompts = {"input_ids": jnp.asarray(ids * mask, jnp.int32), "attention_mask": jnp.asarray(mask)}
    return state, frozen, prompts


TRACES: dict[RLConfig, int] = {}


@functools.cache
def _iteration(cfg: RLConfig):
    """The jitted one-program iteration (not donating, so tests can reuse their inputs)."""

    def fn(*args):
        TRACES[cfg] = TRACES.get(cfg, 0) + 1
        return rl.rl_iteration(*args, cfg=cfg, score_fn=score_fn)

    return jax.jit(fn, compiler_options=FAST)


def _run(cfg, state, frozen, prompts, rng, hp, n=1):
    mesh, rules = _mesh()
    history = []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        for _ in range(n):
            state, metrics = _iteration(cfg)(state, frozen, prompts, rng, hp)
            history.append(jax.device_get(metrics))
    return state, history


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_iteration_is_deterministic_and_compiles_once_across_hparams():
    hp = RLHParams.create()
    state, frozen, prompts = _setup(RLOO, hp)
    key = jax.random.key(7)
    a, (ma,) = _run(RLOO, state, frozen, prompts, key, hp)
    b, (mb,) = _run(RLOO, state, frozen, prompts, key, hp)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert ma == mb and int(a.step) == 1
    assert all(np.isfinite(v) for v in ma.values())
    before = TRACES[RLOO]
    hp2 = RLHParams.create(kl_coef=0.3, eps_low=0.1, eps_high=0.3, temperature=0.7, gamma=0.9,
                           lr_scale=0.5, missing_eos_penalty=1.0)  # fmt: skip
    c, (mc,) = _run(RLOO, state, frozen, prompts, key, hp2)
    assert TRACES[RLOO] == before, "changing traced hyperparameters recompiled the iteration"
    assert mc["kl/coef"] == pytest.approx(0.3) and mc != ma
    # A different key samples different completions.
    _, (md,) = _run(RLOO, state, frozen, prompts, jax.random.key(8), hp)
    assert md != ma


def test_iteration_makes_no_host_transfers():
    hp = RLHParams.create()
    state, frozen, prompts = _setup(RLOO, hp)
    key = jax.random.key(0)
    _run(RLOO, state, frozen, prompts, key, hp)  # compile (and place constants) first
    mesh, rules = _mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), jax.transfer_guard("disallow"):
        new_state, metrics = _iteration(RLOO)(state, frozen, prompts, key, hp)
        jax.block_until_ready((new_state, metrics))
    assert int(new_state.step) == 1


def test_nan_guard_skips_every_update_of_the_poisoned_iteration():
    hp = RLHParams.create(debug_nan_step=0)
    state, frozen, prompts = _setup(RLOO, hp)
    new, (m,) = _run(RLOO, state, frozen, prompts, jax.random.key(0), hp)
    for x, y in zip(_leaves(state.models), _leaves(new.models), strict=True):
        np.testing.assert_array_equal(x, y)
    assert m["nonfinite/skipped"] == RLOO.epochs * RLOO.num_minibatches
    assert int(new.nonfinite.last_step) == 0 and int(new.step) == 1


def _learns(cfg, n=25):
    hp = RLHParams.create(kl_coef=0.01)
    state, frozen, prompts = _setup(cfg, hp)
    _, hist = _run(cfg, state, frozen, prompts, jax.random.key(1), hp, n=n)
    rewards = np.array([m["reward/proxy"] for m in hist])
    start, end = rewards[:2].mean(), rewards[-3:].mean()
    assert end > 3 * start and end - start > 0.3, rewards
    assert all(np.isfinite(v) for m in hist for v in m.values())
    return hist


def test_rloo_raises_the_reward():
    hist = _learns(RLOO)
    assert hist[-1]["kl/k3"] > hist[0]["kl/k3"]  # it moved away from the reference to do so


def test_ppo_raises_the_reward_and_fits_its_critic():
    hp = RLHParams.create()
    state, frozen, prompts = _setup(PPO, hp)
    warm, _ = _run(PPO, state, frozen, prompts, jax.random.key(0), hp)
    # critic_warmup=1: the first iteration trains the critic only.
    for name, should_change in (("policy", False), ("value", True)):
        before, after = _leaves(state.models[name].params), _leaves(warm.models[name].params)
        changed = any(not np.array_equal(x, y) for x, y in zip(before, after, strict=True))
        assert changed == should_change, name
    hist = _learns(PPO)
    assert hist[-1]["value/explained_var"] > hist[0]["value/explained_var"]
    assert hist[-1]["value/error"] < hist[0]["value/error"]


def _changed(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def test_value_head_iteration_trains_head_and_shared_trunk_without_a_second_model():
    hp = RLHParams.create()
    state, frozen, prompts = _setup(HEAD, hp)
    new, hist = _run(HEAD, state, frozen, prompts, jax.random.key(0), hp, n=2)
    for m in hist:
        bad = {k: v for k, v in m.items() if not np.isfinite(v)}
        assert not bad, bad
        assert {"loss/value", "value/explained_var", "value/error", "grad_norm/value"} <= set(m)
    assert int(new.step) == 2
    assert _changed(state.models["policy"].params, new.models["policy"].params)
    assert _changed(state.models["value"].params, new.models["value"].params)
    # The critic is the head alone (d_model + 1 numbers), and the policy's parameters keep a
    # plain Transformer's structure: what checkpoints and export publish.
    head_leaves = jax.tree.leaves(new.models["value"].params)
    assert sum(x.size for x in head_leaves) == MCFG.d_model + 1
    plain = nnx.state(Transformer(MCFG, rngs=nnx.Rngs(0)), nnx.Param)
    assert jax.tree.structure(new.models["policy"].params) == jax.tree.structure(plain)


@functools.cache
def _head_batch():
    """(state, batch) of one scored HEAD rollout (prepare_batch's output)."""
    hp = RLHParams.create()
    state, frozen, prompts = _setup(HEAD, hp)
    mesh, rules = _mesh()

    def fn(state, frozen, prompts, key, hp):
        ro, _ = rl.rollout_program(state, frozen, prompts, key, hp, cfg=HEAD)
        batch, _, _ = rl.prepare_batch(state, frozen, ro, score_fn(frozen, ro), hp, cfg=HEAD)
        return batch

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        batch = jax.jit(fn, compiler_options=FAST)(state, frozen, prompts, jax.random.key(4), hp)
    return state, batch


def test_value_head_loss_decreases_on_a_fixed_batch():
    state, batch = _head_batch()
    hp = RLHParams.create(vf_coef=1.0)
    mesh, rules = _mesh()
    step = jax.jit(functools.partial(rl.update, cfg=HEAD), compiler_options=FAST)
    losses = []
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        for _ in range(6):
            state, m = step(state, batch, jax.random.key(0), hp, hp.kl_coef)
            losses.append(float(m["loss/value"]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


def test_value_loss_gradient_reaches_the_trunk_scaled_by_vf_coef():
    """d(loss)/d(trunk) = policy part + vf_coef * value part: the value loss trains the shared
    trunk, linearly in vf_coef, and the head gets no gradient from the policy loss."""
    state, batch = _head_batch()
    models = state.models
    params = {name: m.params for name, m in models.items()}

    @jax.jit
    def grads(vf_coef):
        hp = RLHParams.create(vf_coef=vf_coef)
        return jax.grad(lambda p: rl._minibatch_loss(p, batch, models, hp.kl_coef, hp, HEAD)[0])(
            params
        )

    mesh, rules = _mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        g0, g1, g2 = (jax.device_get(grads(c)) for c in (0.0, 1.0, 2.0))
    for x in jax.tree.leaves(g0["value"]):
        np.testing.assert_array_equal(x, 0.0)
    trunk = [jax.tree.leaves(g["policy"]["blocks"]) for g in (g0, g1, g2)]
    d1 = [b - a for a, b in zip(trunk[0], trunk[1], strict=True)]
    d2 = [c - a for a, c in zip(trunk[0], trunk[2], strict=True)]
    # Every trunk weight of every block gets a value-loss gradient ...
    assert all(np.any(np.abs(d) > 0) for d in d1)
    # ... proportional to vf_coef.
    for a, b in zip(d1, d2, strict=True):
        np.testing.assert_allclose(b, 2 * a, rtol=1e-3, atol=1e-7)


def test_value_head_leaves_the_logits_path_a_plain_transformer():
    """After head-PPO updates, the policy's parameters in a plain Transformer give the very
    log-probs of the shared forward, and the values are the head on its hidden states."""
    hp = RLHParams.create()
    state, frozen, prompts = _setup(HEAD, hp)
    new, _ = _run(HEAD, state, frozen, prompts, jax.random.key(0), hp)
    _, batch = _head_batch()
    ro = batch.rollout
    policy, head = new.models["policy"], new.models["value"]
    mesh, rules = _mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        logps, _, values = completion_logps_and_values(
            policy.graphdef, policy.params, head.graphdef, head.params, ro,
            temperature=hp.temperature, chunk_size=HEAD.logits_chunk_size,
        )  # fmt: skip
        plain_g = nnx.graphdef(Transformer(MCFG, rngs=nnx.Rngs(0)))
        plain = completion_logps(
            plain_g, policy.params, ro, temperature=hp.temperature, chunk_size=64
        )
        model = nnx.merge(plain_g, policy.params)
        hidden, _ = model.forward(ro.input_ids, ro.attention_mask, ro.positions)
        p = ro.prompt_ids.shape[1]
        by_hand = hidden[:, p - 1 : -1] @ head.params["w"][...] + head.params["b"][...][0]
    mask = np.asarray(ro.mask) > 0
    np.testing.assert_allclose(np.asarray(logps)[mask], np.asarray(plain)[mask], rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(np.asarray(values), np.asarray(by_hand), rtol=1e-5, atol=1e-6)


def test_two_programs_around_host_scores_match_one_program():
    cfg = RLOO
    hp = RLHParams.create()
    state, frozen, prompts = _setup(cfg, hp)
    key = jax.random.key(3)
    one, (m_one,) = _run(cfg, state, frozen, prompts, key, hp)
    mesh, rules = _mesh()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        first = jax.jit(functools.partial(rl.rollout_program, cfg=cfg), compiler_options=FAST)
        second = jax.jit(functools.partial(rl.update_program, cfg=cfg), compiler_options=FAST)
        ro, greedy = first(state, frozen, prompts, key, hp)
        assert greedy is None
        host = jax.device_get(ro)  # the judge reads the completions on the host
        scores = np.asarray(share_of_target(host.tokens, host.mask), np.float32)
        two, m_two = second(state, frozen, ro, scores, key, hp)
    for x, y in zip(_leaves(one), _leaves(two), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    m_two = jax.device_get(m_two)
    assert m_one.keys() == m_two.keys()
    for k in m_one:
        np.testing.assert_allclose(m_one[k], m_two[k], rtol=1e-4, atol=1e-5, err_msg=k)


# Each setting's every value appears at least once (with the RLOO and PPO tests above); each
# entry is one more compiled program, so the grid is a covering set, not the full product.
GRID = {
    "grpo-gspo-dualclip-seqmeantokenmean-k3-klloss-batchnorm-sampler": dict(
        estimator="grpo", ratio_level="sequence", dual_clip=True,
        loss_agg_mode="seq_mean_token_mean", kl_estimator="k3", kl_in_reward=False,
        reward_norm="batch", old_logps="sampler",
    ),
    "drgrpo-cispo-drnorm-k2-adaptive-runningnorm-truncmask-clip": dict(
        estimator="dr_grpo", policy_loss="cispo", loss_agg_mode="seq_mean_token_sum_norm",
        kl_estimator="k2", kl_controller="adaptive", reward_norm="running",
        mask_truncated=True, clip_reward=True,
    ),
    "remax-gspo-cispo-seqmeantokensum-k1-whiten-entropy-epochs-batchnorm": dict(
        estimator="remax", ratio_level="sequence", policy_loss="cispo",
        loss_agg_mode="seq_mean_token_sum", kl_estimator="k1", whiten_advantages=True,
        entropy_bonus=True, epochs=2, num_minibatches=4, reward_norm="batch",
    ),
    "runningmean-noref": dict(estimator="running_mean", use_reference=False, kl_in_reward=False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(GRID))
def test_switch_combinations_run_with_finite_metrics(name):
    cfg = RLConfig(**{**BASE, **GRID[name]})
    hp = RLHParams.create(kl_coef=0.1, kl_target=0.5, kl_horizon=100.0, missing_eos_penalty=0.5)
    state, frozen, prompts = _setup(cfg, hp)
    new, hist = _run(cfg, state, frozen, prompts, jax.random.key(2), hp, n=2)
    for m in hist:
        bad = {k: v for k, v in m.items() if not np.isfinite(v)}
        assert not bad, bad
    assert int(new.step) == 2
    changed = any(
        not np.array_equal(x, y)
        for x, y in zip(_leaves(state.models), _leaves(new.models), strict=True)
    )
    assert changed
    if cfg.kl_controller == "adaptive":  # beta moved from its start, towards the target KL
        assert hist[1]["kl/coef"] != hist[0]["kl/coef"]
        assert float(new.extra["kl_ctl"].coef) != pytest.approx(0.1)
    if cfg.reward_norm == "running":
        assert float(new.extra["reward_moments"].count) == 2 * cfg.rollout_batch_size
    if cfg.estimator == "remax":
        assert "reward/greedy" in hist[0]
    if cfg.estimator == "running_mean":
        assert bool(new.extra["baseline"].initialised)
    if not cfg.use_reference:
        assert hist[0]["kl/k3"] == 0.0


@pytest.mark.parametrize(
    "overrides, setting",
    [
        (dict(estimator="rloo", samples_per_prompt=1), "samples_per_prompt"),
        (dict(estimator="grpo", samples_per_prompt=1), "samples_per_prompt"),
        (dict(num_minibatches=3), "num_minibatches"),
        (dict(estimator="ppo"), "value_model"),
        (dict(estimator="rloo", value_model="separate"), "value_model"),
        (dict(estimator="grpo", value_model="head"), "value_model"),
        (dict(estimator="ppo", value_model="trunk"), "value_model"),
        (dict(estimator="vtrace"), "estimator"),
        (dict(policy_loss="cispo", dual_clip=True), "dual clip"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(loss_agg_mode="mean"), "agg_mode"),
        (dict(kl_controller="pid"), "kl_controller"),
        (dict(epochs=0), "epochs"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(kl_controller="adaptive", use_reference=False), "use_reference"),
    ],
)
def test_bad_settings_raise_a_settings_error_naming_the_setting(overrides, setting):
    with pytest.raises(SettingsError, match=setting) as info:
        RLConfig(**{**BASE, **overrides})
    assert isinstance(info.value, UserError)


def test_config_shapes_and_alias():
    cfg = dataclasses.replace(PPO, num_minibatches=4)
    assert cfg.estimator == "gae" and cfg.rollout_batch_size == 16 and cfg.minibatch_size == 4
    assert cfg.sampling_config.stop_tokens == (EOS,) and cfg.greedy_config.greedy


@pytest.mark.parametrize("cfg", [RLOO, HEAD], ids=["rloo", "ppo_value_head"])
def test_a_sharded_mesh_runs_the_same_iteration(cfg):
    """Parameters sharded over a 2x2x2 mesh (rows over data x fsdp, heads over tensor; the
    value head's weight over fsdp) give the one-device iteration's samples and numbers."""
    hp = RLHParams.create()
    state, frozen, prompts = _setup(cfg, hp)
    key = jax.random.key(5)
    one, (m_one,) = _run(cfg, state, frozen, prompts, key, hp)
    mesh, rules = P.make_mesh((2, 2, 2), jax.devices()[:8]), P.logical_rules()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = jax.device_put(state, P.state_shardings(state, mesh, rules))
        frozen = jax.device_put(frozen, P.state_shardings(frozen, mesh, rules))
        prompts = jax.device_put(prompts, P.batch_sharding(mesh, 2))
        eight, m_eight = _iteration(cfg)(state, frozen, prompts, key, hp)
    specs = [x.sharding.spec for x in jax.tree.leaves(eight.models["policy"].params)]
    assert any(any(axis is not None for axis in spec) for spec in specs)
    if cfg.value_head:
        assert tuple(eight.models["value"].params["w"][...].sharding.spec) == ("fsdp",)
    m_eight = jax.device_get(m_eight)
    assert m_one["response/length"] == m_eight["response/length"]
    keys = ("reward/proxy", "kl/k1", "loss/policy", "entropy", "advantages/std")
    if cfg.has_critic:
        keys += ("loss/value", "value/explained_var")
    for k in keys:
        np.testing.assert_allclose(m_one[k], m_eight[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for x, y in zip(_leaves(one.models), _leaves(eight.models), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
