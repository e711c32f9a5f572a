"""One online-RL iteration's time split: rollout / scoring / reference and value / update.

Times the pieces of `rlhf_jax.steps.rl` as separate jitted programs on random weights (policy,
frozen reference, critic and reward model all of one preset's shape, the reward model a
`ScalarModel` scored through `steps.reward.make_reward_fn`), then the whole one-program
iteration, and prints each piece's share. Generation never stops early (no EOS), so every
rollout decodes `--new_tokens` tokens. `--value_model` picks PPO's critic: `separate` (a
`ScalarModel` of the policy's shape) or `head` (a `ValueHead` on the policy's trunk: no critic
forward of its own); `all` times both in one process, one after the other.

- rollout: `rollout_program` (k samples per prompt with the KV-cache sampler);
- scoring: the reward model's forward over prompt + completion;
- ref+value: `prepare_batch` (teacher-forced policy forward for the old log-probs and the
  entropy, reference forward, critic forward (with a head: none, the policy's forward gives
  the values), shaped rewards, GAE);
- update: `update` (epochs x minibatches of forward + backward + Adam on policy and critic;
  with a head, one forward + backward of the policy for both losses);
- iteration: `rl_iteration`, all of it in one program (its sum of parts, minus fusion).

Usage:
  python benchmarks/bench_rl_iteration.py --preset tiny --value_model all
  python benchmarks/bench_rl_iteration.py --preset gpt2 --prompts 2 --k 2 --prompt_len 16 \
      --new_tokens 16 --repeats 2 --value_model all --out bench_rl_gpt2.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from rlhf_jax import partitioning  # noqa: E402
from rlhf_jax.models import ScalarModel, Transformer, ValueHead, model_config  # noqa: E402
from rlhf_jax.steps import rl  # noqa: E402
from rlhf_jax.steps.reward import make_reward_fn  # noqa: E402
from rlhf_jax.steps.rl_config import RLConfig, RLHParams, create_rl_state  # noqa: E402
from rlhf_jax.steps.rollout import reward_model_scorer  # noqa: E402
from rlhf_jax.steps.state import Frozen, ModelState  # noqa: E402
from rlhf_jax.train.optim import make_optimizer  # noqa: E402


def _timed(fn, args, repeats: int) -> tuple[float, float, float, object]:
    """(first call incl. compile s, median and minimum of `repeats` further calls s, output).

    On a CPU shared with other jobs the minimum is the least disturbed measurement; the shares
    are computed from it, and the medians are kept beside it.
    """
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), min(times), out


def build(args: argparse.Namespace, value_model: str):
    """(cfg, hp, state, frozen, prompts, score_fn) on a one-device mesh, random weights."""
    mcfg = model_config(args.preset, max_seq_len=max(args.prompt_len + args.new_tokens, 8))
    cfg = RLConfig(
        estimator=args.estimator,
        value_model=value_model if args.estimator in ("ppo", "gae") else "none",
        prompts_per_iteration=args.prompts,
        samples_per_prompt=args.k,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        epochs=args.epochs,
        num_minibatches=args.minibatches,
        logits_chunk_size=args.chunk,
    )
    hp = RLHParams.create()
    opt = make_optimizer(name="adam", learning_rate=1e-5)
    policy_g, policy_p = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(0)), nnx.Param)
    ref_p = jax.tree.map(jnp.copy, policy_p)
    rm_g, rm_p = nnx.split(ScalarModel(mcfg, rngs=nnx.Rngs(2)), nnx.Param)
    value = None
    if cfg.has_critic:
        critic = ValueHead if cfg.value_head else ScalarModel
        v_g, v_p = nnx.split(critic(mcfg, rngs=nnx.Rngs(1)), nnx.Param)
        value = ModelState.create(graphdef=v_g, params=v_p, optimizer=opt)
    policy = ModelState.create(graphdef=policy_g, params=policy_p, optimizer=opt)
    state = create_rl_state(policy=policy, value=value, hp=hp)
    frozen = Frozen(
        params={"ref": ref_p, "reward": rm_p}, graphdefs={"ref": policy_g, "reward": rm_g}
    )
    rng = np.random.RandomState(0)
    ids = rng.randint(1, mcfg.vocab_size, (args.prompts, args.prompt_len)).astype(np.int32)
    prompts = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids))}
    score_fn = reward_model_scorer(make_reward_fn(rm_g))
    return cfg, hp, state, frozen, prompts, score_fn


def run(args: argparse.Namespace, value_model: str = "separate") -> dict:
    """One configuration's timings and shares (`value_model`: PPO's critic)."""
    mesh = partitioning.make_mesh((1, 1, 1), jax.devices()[:1])
    rules = partitioning.logical_rules()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        cfg, hp, state, frozen, prompts, score_fn = build(args, value_model)
        key = jax.random.key(0)
        rows = {}
        fn = jax.jit(functools.partial(rl.rollout_program, cfg=cfg))
        rows["rollout"] = _timed(fn, (state, frozen, prompts, key, hp), args.repeats)
        ro, _ = rows["rollout"][3]
        fn = jax.jit(score_fn)
        rows["scoring"] = _timed(fn, (frozen, ro), args.repeats)
        scores = rows["scoring"][3]
        fn = jax.jit(functools.partial(rl.prepare_batch, cfg=cfg))
        rows["ref+value"] = _timed(fn, (state, frozen, ro, scores, hp), args.repeats)
        batch = rows["ref+value"][3][0]
        fn = jax.jit(functools.partial(rl.update, cfg=cfg))
        rows["update"] = _timed(fn, (state, batch, key, hp, hp.kl_coef), args.repeats)
        if not args.skip_iteration:
            fn = jax.jit(functools.partial(rl.rl_iteration, cfg=cfg, score_fn=score_fn))
            rows["iteration"] = _timed(fn, (state, frozen, prompts, key, hp), args.repeats)
    parts = ("rollout", "scoring", "ref+value", "update")
    total = sum(rows[p][2] for p in parts)
    return {
        "env": {
            "jax": jax.__version__,
            "device": jax.devices()[0].device_kind,
            "platform": platform.platform(),
            "devices": jax.local_device_count(),
            "cpu_count": os.cpu_count(),
        },
        "shape": {
            k: getattr(args, k)
            for k in ("preset", "estimator", "prompts", "k", "prompt_len", "new_tokens")
        }
        | {"epochs": args.epochs, "minibatches": args.minibatches, "value_model": cfg.value_model},
        "seconds": {name: round(r[2], 4) for name, r in rows.items()},
        "median_seconds": {name: round(r[1], 4) for name, r in rows.items()},
        "first_call_seconds": {name: round(r[0], 2) for name, r in rows.items()},
        "share_of_parts": {p: round(rows[p][2] / total, 3) for p in parts},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--estimator", default="ppo")
    p.add_argument(
        "--value_model",
        default="separate",
        choices=("separate", "head", "all"),
        help="PPO's critic; 'all' runs separate, then head",
    )
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--skip_iteration", action="store_true", help="skip the one-program iteration (compile)"
    )
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> dict | list[dict]:
    args = parse_args(argv)
    kinds = ("separate", "head") if args.value_model == "all" else (args.value_model,)
    reports = []
    for kind in kinds:
        reports.append(run(args, kind))
        print(json.dumps(reports[-1], indent=1), flush=True)
    report = reports[0] if len(reports) == 1 else reports
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
