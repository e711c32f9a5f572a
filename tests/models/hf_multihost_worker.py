"""Worker for tests/models/test_hf_multihost.py: one JAX process of a 2-process CPU job.

Usage: python hf_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT HF_DIR OUT_DIR RESULT_FILE
Each process has 2 fake CPU devices; the mesh is (1, 4, 1) over both processes' devices. The
process loads HF_DIR with `load_pretrained`, recording which blocks of which tensors it read,
then every process takes part in `save_pretrained(OUT_DIR)` and, with LoRA adapters added
(sharded over both processes), in `hf.save_peft(OUT_DIR + "_peft")` (process 0 writes).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import dataclasses  # noqa: E402

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from rlhf_jax import partitioning as P  # noqa: E402
from rlhf_jax.models import Transformer, hf, lora  # noqa: E402


def main() -> None:
    pid, nproc, port, hf_dir, out_dir, result = sys.argv[1:]
    pid, nproc = int(pid), int(nproc)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    reads = []
    read = hf.View.read

    def spy(self, arr, index):
        reads.append(
            [self.hf_name, [list(s.indices(n)[:2]) for s, n in zip(index, self.shape, strict=True)]]
        )
        return read(self, arr, index)

    hf.View.read = spy
    mesh = P.make_mesh((1, 4, 1))
    cfg, model = hf.load_pretrained(hf_dir, mesh=mesh)
    hf.save_pretrained(model, cfg, out_dir)
    lcfg = dataclasses.replace(cfg, lora_rank=2, lora_targets=("attn/w[qo]$",))
    params = lora.with_fresh_adapters(
        nnx.state(model, nnx.Param), lcfg, Transformer, {}, jax.random.key(0), mesh,
        P.logical_rules(),
    )  # fmt: skip
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(lcfg, rngs=nnx.Rngs(0))))
    hf.save_peft(nnx.merge(graphdef, params), lcfg, out_dir + "_peft")
    with open(result, "w") as f:
        json.dump({"reads": reads, "process_count": jax.process_count()}, f)


if __name__ == "__main__":
    main()
