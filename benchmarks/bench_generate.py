"""Sampler throughput: new tokens/s and memory-bandwidth roofline share, next to `transformers`.

For each size (GPT-2-small / -medium shapes, random weights, bf16) this times
`rlhf_jax.generate.Sampler` on a batch of prompts with sampling at temperature 1 and no early
stop (min_new_tokens = max_new_tokens), and Hugging Face `GPT2LMHeadModel.generate` on the
same shape (torch bf16 on CUDA when available, else fp32 on CPU), in the same process.

Roofline. Decode is memory-bound: each step reads every weight matrix once (the embedding table
once, as the unembedding) plus the K/V cache. The "useful" bytes per step are the weights plus
the cache slots that hold a token (prompt bucket + tokens so far, averaged over the steps).
The decode step time comes from two runs, `(t(N new) - t(1 new)) / (N - 1)`, which removes the
prefill; the share is useful bytes / step time / peak HBM bandwidth (H100 SXM 3.35e12 B/s,
H200 4.8e12 B/s; unknown devices, e.g. CPU, report achieved bytes/s only).

Usage:
  python benchmarks/bench_generate.py --sizes gpt2,gpt2-medium --batch 64 --prompt_len 64 \
      --new_tokens 256 --repeats 3 --out results.json
  python benchmarks/bench_generate.py --quick      # tiny model on CPU, a minute or so
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

# Leave GPU memory for torch, which runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import partitioning  # noqa: E402
from rlhf_jax.generate import Sampler, SamplingConfig, SamplingHParams, segment_ends  # noqa: E402
from rlhf_jax.info import create_params  # noqa: E402
from rlhf_jax.models import ModelConfig, model_config  # noqa: E402

# Peak HBM bandwidth (bytes/s) by a substring of `device_kind`; first match wins.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100", 2.0e12),
)


def peak_bandwidth(device_kind: str) -> float | None:
    """The device's peak memory bandwidth in bytes/s, or None when unknown (e.g. CPU)."""
    for key, value in PEAK_BANDWIDTH:
        if key.lower() in device_kind.lower():
            return value
    return None


# Decode-step variants: a name maps to ModelConfig overrides (these change kernels, not numbers:
# tests/models) or, for "rng:" entries, to the keys' PRNG implementation (other random draws
# from the same distribution).
VARIANTS = {
    "base": {},
    "fused_qkv": {"fused_qkv": True},
    "reduce": {"decode_attention": "reduce"},
    "rbg": {"rng:": "unsafe_rbg"},
}


def variant_overrides(name: str) -> dict:
    """ModelConfig overrides of a variant name such as "fused_qkv+reduce"."""
    out: dict = {}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r}; choose from {sorted(VARIANTS)}")
        out.update(VARIANTS[part])
    return {k: v for k, v in out.items() if k != "rng:"}


def variant_rng_impl(name: str) -> str | None:
    """The PRNG implementation a variant asks for (None: jax's default)."""
    impls = [VARIANTS[p]["rng:"] for p in name.split("+") if "rng:" in VARIANTS.get(p, {})]
    return impls[-1] if impls else None


def bench_config(size: str, dtype: str, variant: str = "base") -> ModelConfig:
    return model_config(size, param_dtype=dtype, compute_dtype=dtype, **variant_overrides(variant))


def bytes_per_decode_step(
    cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, segment_len: int
) -> dict[str, float]:
    """Weight bytes, and K/V bytes (useful, and as allocated/attended) per decode step."""
    itemsize = np.dtype(cfg.dtype).itemsize
    # Gathered tables (input embedding rows, positions) cost ~nothing; the unembedding reads
    # one full vocab × d_model matrix.
    n_weights = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
    per_slot = 2 * cfg.n_layers * batch * cfg.num_kv_heads * cfg.head_dim * itemsize
    steps = np.arange(1, new_tokens)
    if steps.size == 0:
        return {"weights": n_weights * itemsize, "kv_useful": 0.0, "kv_attended": 0.0}
    ends = np.asarray(segment_ends(new_tokens, segment_len))
    attended = prompt_len + ends[np.searchsorted(ends, steps, side="right")] - 1
    return {
        "weights": float(n_weights * itemsize),
        "kv_useful": float(per_slot * np.mean(prompt_len + steps)),
        "kv_attended": float(per_slot * np.mean(attended)),
    }


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    """Wall times of `fn(0)`, ..., `fn(repeats - 1)` (each must block), and the last output."""
    times, out = [], None
    for r in range(repeats):
        start = time.perf_counter()
        out = fn(r)
        times.append(time.perf_counter() - start)
    return times, out


def bench_ours(size: str, args, variant: str = "base") -> dict:
    """Times `Sampler` at `max_new_tokens = N` and `= 1` (prefill only).

    With `--hlo_dir`, also writes the compiled program and the kernels each loop iteration
    launches (`hlo_kernels.py`); with `--profile_dir`, traces one more full call.
    """
    cfg = bench_config(size, args.dtype, variant)
    mesh = partitioning.make_mesh((-1, 1, 1))
    rules = partitioning.logical_rules()
    graphdef, params, shardings = create_params(cfg, mesh, rules, seed=0)
    sampler = Sampler(graphdef, cfg, mesh, rules, shardings)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size - 1, (args.batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    hp = SamplingHParams(temperature=1.0, top_p=1.0)
    eos = cfg.vocab_size - 1
    result: dict = {"variant": variant, "segment_len": args.segment_len}
    rng_impl = variant_rng_impl(variant)
    for n in (args.new_tokens, 1):
        config = SamplingConfig(
            max_new_tokens=n,
            min_new_tokens=n,  # EOS is masked at every step: no early stop
            eos_id=eos,
            segment_len=args.segment_len,
            use_top_p=False,  # top_p = 1: compile no nucleus filter (and no per-step cond)
        )

        def run(r, config=config):
            out = sampler(params, ids, mask, jax.random.key(r, impl=rng_impl), config, hp)
            return jax.block_until_ready(out)

        start = time.perf_counter()
        run(1000)
        first = time.perf_counter() - start
        times, out = _timed(run, args.repeats)
        key = "full" if n == args.new_tokens else "prefill"
        result[f"{key}_first_call_s"] = first
        result[f"{key}_times_s"] = times
        if n == args.new_tokens:
            lengths = np.asarray(out.lengths)
            assert (lengths == n).all(), f"early stop: lengths {lengths}"
            tag = f"{size}_{variant}"
            if args.hlo_dir:
                key0 = jax.random.key(0, impl=rng_impl)
                result["loops"] = _write_hlo(
                    sampler, params, ids, mask, key0, hp, config, args, tag
                )
            if args.profile_dir:
                trace_dir = Path(args.profile_dir) / tag
                with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                    run(2000)
                result["trace_dir"] = str(trace_dir)
    result["traces"] = sampler.trace_count
    t_full = statistics.median(result["full_times_s"])
    t_prefill = statistics.median(result["prefill_times_s"])
    result["tokens_per_s"] = args.batch * args.new_tokens / t_full
    if args.new_tokens > 1:
        step = max(t_full - t_prefill, 1e-9) / (args.new_tokens - 1)
        nbytes = bytes_per_decode_step(
            cfg, args.batch, args.prompt_len, args.new_tokens, args.segment_len
        )
        useful = nbytes["weights"] + nbytes["kv_useful"]
        result.update(
            decode_step_ms=step * 1e3,
            prefill_ms=t_prefill * 1e3,
            bytes_per_step=nbytes,
            achieved_useful_bytes_per_s=useful / step,
            achieved_read_bytes_per_s=(nbytes["weights"] + nbytes["kv_attended"]) / step,
        )
        peak = peak_bandwidth(jax.devices()[0].device_kind)
        if peak:
            result["roofline_share"] = useful / step / peak
            result["roofline_share_incl_prefill"] = useful * (args.new_tokens - 1) / t_full / peak
    return result


def _write_hlo(sampler, params, ids, mask, key, hp, config, args, tag: str) -> list[dict]:
    """Writes the compiled program's HLO; returns kernels per iteration of each while loop."""
    from hlo_kernels import loop_kernel_counts

    text = sampler.lower(params, ids, mask, key, config, hp).compile().as_text()
    Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.hlo_dir) / f"{tag}.hlo.txt").write_text(text)
    loops = loop_kernel_counts(text)
    # Print the decode loops (one per segment; the RNG's own small loops are left out).
    most = max((loop["kernels"] for loop in loops), default=0)
    for loop in loops:
        if loop["kernels"] == most:
            top = ", ".join(f"{op} {n}" for op, n in list(loop["by_op"].items())[:8])
            nested = f"; nested loops of {loop['nested']} kernels" if loop["nested"] else ""
            print(f"  {tag} {loop['while']}: {loop['kernels']} kernels/iteration ({top}{nested})")
    return loops


def bench_transformers(size: str, args) -> dict:
    """Times `GPT2LMHeadModel.generate` (sampling, no early stop) on the same shape."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = bench_config(size, args.dtype)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        activation_function="gelu_new",
        bos_token_id=cfg.vocab_size - 1,
        eos_token_id=cfg.vocab_size - 1,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_cfg).to(device=device, dtype=dtype).eval()
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size - 1, (args.batch, args.prompt_len), generator=gen)
    ids = ids.to(device)
    mask = torch.ones_like(ids)

    def run(r, n=args.new_tokens):
        torch.manual_seed(r)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=cfg.vocab_size - 1,
            )
        if cuda:
            torch.cuda.synchronize()
        return out

    repeats = args.hf_repeats or args.repeats
    if not cuda and not args.quick:
        repeats = 1  # fp32 on CPU at these sizes takes minutes per call
        print("transformers: no CUDA in torch, timing one call on CPU", flush=True)
    run(1000, n=min(8, args.new_tokens))  # warm-up (kernels, allocator)
    times, out = _timed(run, repeats)
    assert out.shape[1] == args.prompt_len + args.new_tokens, out.shape
    return {
        "device": f"{device} ({torch.cuda.get_device_name() if cuda else platform.machine()})",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "times_s": times,
        "tokens_per_s": args.batch * args.new_tokens / statistics.median(times),
    }


def probe_attention(size: str, args, iters: int = 20) -> dict:
    """Times one decode step's attention over all layers for two K/V cache layouts.

    "model": the first cache layout, [B, S, K, H], through
    `jax.nn.dot_product_attention(implementation="xla")` with a boolean mask. "kv_major":
    [B, K, S, H] with two einsums (fp32 scores, bf16 values), the layout the model now uses for
    decode. Both read the same bytes; a gap shows what the layout costs.
    """
    import jax.numpy as jnp

    cfg = bench_config(size, args.dtype)
    b, k, h, n_layers = args.batch, cfg.num_kv_heads, cfg.head_dim, cfg.n_layers
    g = cfg.n_heads // k
    slots = args.prompt_len + args.new_tokens - 1
    keys = jax.random.split(jax.random.key(0), 2 * n_layers + 1)
    q = jax.random.normal(keys[0], (b, 1, cfg.n_heads, h), cfg.dtype)
    # Per-layer buffers, as the model keeps them (no stacked array to slice).
    shape = (b, slots, k, h)
    kv = [jax.random.normal(key, shape, cfg.dtype) for key in keys[1:]]
    kv = list(zip(kv[::2], kv[1::2], strict=True))
    kv_t = [(jnp.swapaxes(kl, 1, 2), jnp.swapaxes(vl, 1, 2)) for kl, vl in kv]  # [B, K, S, H]
    allowed = jnp.ones((b, 1, slots), bool).at[:, :, -7:].set(False)

    def model_layout(q, kv):
        for kv_l in kv:
            q = jax.nn.dot_product_attention(
                q, kv_l[0], kv_l[1], mask=allowed[:, None], implementation="xla"
            )
        return q

    def kv_major(q, kv_t):
        for kv_l in kv_t:
            qg = q.reshape(b, k, g, h)
            s = jnp.einsum("bkgh,bksh->bkgs", qg, kv_l[0], preferred_element_type=jnp.float32)
            s = jnp.where(allowed[:, :, None, :], s * h**-0.5, -jnp.inf)
            p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
            q = jnp.einsum("bkgs,bksh->bkgh", p, kv_l[1]).reshape(q.shape)
        return q

    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(kv))
    result = {"slots": slots, "kv_bytes": nbytes}
    for name, fn, arr in (("model", model_layout, kv), ("kv_major", kv_major, kv_t)):
        f = jax.jit(fn)
        jax.block_until_ready(f(q, arr))
        start = time.perf_counter()
        for _ in range(iters):
            out = f(q, arr)
        jax.block_until_ready(out)
        t = (time.perf_counter() - start) / iters
        result[f"{name}_us"] = t * 1e6
        result[f"{name}_bytes_per_s"] = nbytes / t
    return result


def _guarded(fn, *a) -> dict:
    try:
        return fn(*a)
    except Exception as e:  # a benchmark run should report, not die, on one failing part
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| size | ours tok/s | transformers tok/s | ratio | decode step ms | prefill ms "
        "| useful GB/s | roofline share |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in rows:
        ours, hf = row["ours"], row["transformers"]

        def fmt(x, spec):
            return format(x, spec) if isinstance(x, (int, float)) else "—"

        bw = ours.get("achieved_useful_bytes_per_s")
        lines.append(
            f"| {row['size']} | {fmt(ours.get('tokens_per_s'), ',.0f')} "
            f"| {fmt(hf.get('tokens_per_s'), ',.0f')} | {fmt(row.get('ratio'), '.1f')}× "
            f"| {fmt(ours.get('decode_step_ms'), '.3f')} | {fmt(ours.get('prefill_ms'), '.1f')} "
            f"| {fmt(bw / 1e9 if bw else None, ',.0f')} "
            f"| {fmt(ours.get('roofline_share'), '.1%')} |"
        )
    return "\n".join(lines)


def variant_table(rows: list[dict]) -> str:
    """Decode step time and roofline share of every variant timed, with kernels per step."""
    lines = [
        "| size | variant | decode step ms | roofline share | kernels per decode step |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        for ours in [row["ours"], *row.get("other_variants", [])]:
            step, share = ours.get("decode_step_ms"), ours.get("roofline_share")
            # The decode loop is the loop with the most kernels (RNG loops are tiny); loops
            # nested in it (CPU threefry) are shown, not added.
            loops = ours.get("loops", [])
            top = max(loops, key=lambda loop: loop["kernels"], default=None)
            kernels = None
            if top is not None:
                kernels = f"{top['kernels']}" + (
                    f" (+{len(top['nested'])} nested loops)" if top.get("nested") else ""
                )
            lines.append(
                f"| {row['size']} | {ours.get('variant', ours.get('error', '?'))} "
                f"| {'—' if step is None else format(step, '.3f')} "
                f"| {'—' if share is None else format(share, '.1%')} "
                f"| {'—' if kernels is None else kernels} |"
            )
    return "\n".join(lines)


def _write(path: str, env: dict, args: argparse.Namespace, rows: list[dict]) -> None:
    report = {"env": env, "args": vars(args), "rows": rows}
    Path(path).write_text(json.dumps(report, indent=1))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="gpt2,gpt2-medium")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf_repeats", type=int, default=0, help="0 = --repeats")
    p.add_argument("--segment_len", type=int, default=64, help="SamplingConfig.segment_len")
    p.add_argument("--dtype", default="bfloat16", help="param and compute dtype (ours)")
    p.add_argument("--skip_transformers", action="store_true")
    p.add_argument("--skip_probe", action="store_true", help="skip the attention-layout probe")
    p.add_argument("--out", default="bench_generate.json")
    p.add_argument("--quick", action="store_true", help="tiny model, small batch (CPU smoke)")
    p.add_argument(
        "--variants",
        default="base",
        help=f"comma list of model variants to time, parts joined by '+' ({', '.join(VARIANTS)})",
    )
    p.add_argument("--hlo_dir", default="", help="write each variant's compiled HLO here")
    p.add_argument("--profile_dir", default="", help="trace one full call per variant here")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.prompt_len, args.new_tokens = "tiny", 8, 16, 16
        args.repeats, args.segment_len = 3, 8
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    env = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "peak_bytes_per_s": peak_bandwidth(jax.devices()[0].device_kind),
    }
    print(json.dumps(env))
    rows = []
    for size in args.sizes.split(","):
        row = {"size": size, "batch": args.batch, "prompt_len": args.prompt_len}
        row["new_tokens"] = args.new_tokens
        variants = args.variants.split(",")
        for v in variants:
            variant_overrides(v)  # fail on a typo before any timing
        row["ours"] = _guarded(bench_ours, size, args, variants[0])
        print(size, variants[0], "ours:", json.dumps(row["ours"]), flush=True)
        _write(args.out, env, args, [*rows, row])  # keep ours even if what follows dies
        row["other_variants"] = []
        for v in variants[1:]:
            row["other_variants"].append(_guarded(bench_ours, size, args, v))
            print(size, v, "ours:", json.dumps(row["other_variants"][-1]), flush=True)
            _write(args.out, env, args, [*rows, row])
        if not args.skip_probe:
            row["attention_probe"] = _guarded(probe_attention, size, args)
            print(size, "attention probe:", json.dumps(row["attention_probe"]), flush=True)
        if args.skip_transformers:
            row["transformers"] = {"skipped": True}
        else:
            row["transformers"] = _guarded(bench_transformers, size, args)
        print(size, "transformers:", json.dumps(row["transformers"]), flush=True)
        a, b = row["ours"].get("tokens_per_s"), row["transformers"].get("tokens_per_s")
        row["ratio"] = a / b if a and b else None
        rows.append(row)
        _write(args.out, env, args, rows)
    print(markdown_table(rows))
    print(variant_table(rows))
    for row in rows:
        probe = row.get("attention_probe", {})
        if "model_us" in probe:
            print(
                f"attention probe {row['size']} ({probe['slots']} slots, all layers): "
                f"model layout {probe['model_us']:.0f} us "
                f"({probe['model_bytes_per_s'] / 1e9:.0f} GB/s), "
                f"kv-major {probe['kv_major_us']:.0f} us "
                f"({probe['kv_major_bytes_per_s'] / 1e9:.0f} GB/s)"
            )
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
