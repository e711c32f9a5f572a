"""Peak host memory of `models.hf.load_pretrained` against the checkpoint's size.

Writes a GPT-2-medium-shaped checkpoint with random weights using `transformers` (in a child
process, so torch's memory is not counted), then, in another fresh process with 8 fake CPU
devices, loads it onto a (1, 8, 1) fsdp mesh while a thread samples /proc/self/status every
2 ms. Reports the peak of anonymous resident memory (RssAnon: what the process owns; the
file-backed pages of the memory-mapped checkpoint are page cache, reclaimable and shared) and
of total RSS, above the baseline taken after jax started, against the checkpoint's size.

On CPU the 8 "devices" are host memory, so the loaded parameters themselves (one copy in total,
sharded 8 ways, or more where an axis is replicated) stay resident after loading: the figure
to watch is the transient above that, which one-tensor-at-a-time loading keeps near one slice.

  python benchmarks/bench_hf_load.py [--out /tmp/gpt2m] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

WRITE = """
import sys, torch, transformers
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16, vocab_size=50257,
                              n_positions=1024)
transformers.GPT2LMHeadModel(cfg).save_pretrained(sys.argv[1])
"""


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def measure(path: str) -> dict:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from flax import nnx

    from rlhf_jax import partitioning
    from rlhf_jax.models import hf

    mesh = partitioning.make_mesh((1, 8, 1))
    jax.block_until_ready(jax.numpy.zeros(8))
    base = _status()
    peak = dict(base)
    done = threading.Event()

    def sample():
        while not done.is_set():
            s = _status()
            for k in ("VmRSS", "RssAnon"):
                peak[k] = max(peak[k], s[k])
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    cfg, model = hf.load_pretrained(path, mesh=mesh)
    params = nnx.state(model, nnx.Param)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    after = _status()
    # What is left above the parameters after loading is freed memory that glibc's allocator
    # kept; malloc_trim hands it back, which tells retention apart from live data.
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = _status()
    leaves = [
        v.get_value()
        for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    ]
    on_devices = sum(
        sum(s.data.nbytes for s in x.addressable_shards) for x in leaves
    )  # what the 8 CPU devices hold, replicas included
    ckpt = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    gib = 2**30
    return {
        "params": cfg.num_params(),
        "checkpoint_GiB": ckpt / gib,
        "on_devices_GiB": on_devices / gib,
        "peak_anon_above_baseline_GiB": (peak["RssAnon"] - base["RssAnon"]) / gib,
        "peak_rss_above_baseline_GiB": (peak["VmRSS"] - base["VmRSS"]) / gib,
        "transient_anon_GiB": (peak["RssAnon"] - base["RssAnon"] - on_devices) / gib,
        "after_anon_above_baseline_GiB": (after["RssAnon"] - base["RssAnon"]) / gib,
        "after_trim_anon_above_baseline_GiB": (trimmed["RssAnon"] - base["RssAnon"]) / gib,
        "load_seconds": seconds,
        "largest_tensor_GiB": max(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves) / gib,
        "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/rlhf_jax_gpt2_medium_random")
    p.add_argument("--json", default=None)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.out)))
        return
    if not (Path(args.out) / "model.safetensors").exists():
        subprocess.run([sys.executable, "-c", WRITE, args.out], check=True)
    r = subprocess.run(
        [sys.executable, __file__, "--measure", "--out", args.out],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
