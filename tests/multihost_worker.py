"""Worker for tests/test_multihost.py: one JAX process of a 2-process CPU job.

Usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_FILE
Each process has 2 fake CPU devices, reads only its own rows of a fixed global batch and
writes the sharded loss it computes, then samples from the same prompts (every process holds
the whole prompt batch) and writes the completions gathered back to the host.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from rlhf_jax import partitioning as P  # noqa: E402
from rlhf_jax.generate import Sampler, SamplingConfig, SamplingHParams  # noqa: E402
from rlhf_jax.info import create_params  # noqa: E402
from rlhf_jax.models import model_config  # noqa: E402


def global_batch(vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(123)
    ids = rng.integers(3, vocab, (8, 16)).astype(np.int32)
    mask = np.ones((8, 16), np.int32)
    mask[::3, 10:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def sharded_loss(mesh, rows: slice) -> float:
    cfg = model_config("tiny")
    rules = P.logical_rules()
    graphdef, params, _ = create_params(cfg, mesh, rules, seed=0)
    local = {k: v[rows] for k, v in global_batch(cfg.vocab_size).items()}
    batch = P.make_global_batch(local, mesh)

    def loss_fn(p, b):
        logits = nnx.merge(graphdef, p)(b["input_ids"], b["attention_mask"])
        logp = jax.nn.log_softmax(logits[:, :-1])
        tgt = jnp.take_along_axis(logp, b["input_ids"][:, 1:, None], axis=-1)[..., 0]
        m = b["attention_mask"][:, 1:]
        return -(tgt * m).sum() / m.sum()

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        loss = jax.jit(
            loss_fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        )(params, batch)
    return float(np.asarray(jax.device_get(loss.addressable_data(0))))


def sampled(mesh) -> dict[str, list]:
    """Greedy and sampled completions of the same left-padded prompts, gathered to the host."""
    cfg = model_config("tiny", init_std=0.2)  # peaked logits: no greedy near-ties
    rules = P.logical_rules()
    graphdef, params, shardings = create_params(cfg, mesh, rules, seed=0)
    sampler = Sampler(graphdef, cfg, mesh, rules, shardings)
    b = global_batch(cfg.vocab_size)
    ids, mask = b["input_ids"][:, :8].copy(), np.ones((8, 8), np.int32)
    mask[1::2, :3] = 0  # left padding in every other row
    out = {}
    for name, config, hp in (
        ("greedy", SamplingConfig(max_new_tokens=6, greedy=True), None),
        ("sampled", SamplingConfig(max_new_tokens=6), SamplingHParams(temperature=1.0)),
    ):
        res = sampler(params, ids, mask, jax.random.key(7), config, hp)
        out[name] = P.to_host(res.tokens).tolist()
        out[name + "_logprobs"] = P.to_host(res.model_logprobs).round(4).tolist()
    return out


def process_0_failure() -> list[str]:
    """What each process sees when process 0's part of `on_process_0` succeeds, then fails."""

    def fail():
        raise OSError("disk full")

    seen = [repr(P.on_process_0(lambda: "written", "writing a test file"))]
    try:
        P.on_process_0(fail, "writing a test file")
        seen.append("no error")
    except OSError:
        seen.append("OSError")
    except RuntimeError as e:
        seen.append(f"RuntimeError: {e}")
    return seen


def main() -> None:
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if nproc > 1:
        P.initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
    mesh = P.make_mesh((2, -1, 1))  # data across processes, fsdp within
    per = 8 // jax.process_count()
    loss = sharded_loss(mesh, slice(pid * per, (pid + 1) * per))
    result = {"loss": loss, "process_count": jax.process_count(), "devices": jax.device_count()}
    result.update(sampled(mesh))
    result["process_0_failure"] = process_0_failure()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
