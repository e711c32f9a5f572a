#!/usr/bin/env bash
# One-shot GPU session: the sampler roofline (issue 5) and the online-RL iteration split (issue 14):
# XLA command-buffer settings are fastest, how many kernels a decode step launches, and where
# the kernel time goes; then the CPU test subset on the machine's jax 0.11. Everything lands in
# $OUT; each section is skipped when the time left (BUDGET seconds in all) is too short for it.
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# .whl/ holds py3.12 wheels the device lacks (gin-config, datasets, dill, multiprocess,
# tensorboardX, vaderSentiment, alt-profanity-check); it is git-ignored via .git/info/exclude.
# On a fresh clone: pip download --no-deps --only-binary :all: --python-version 3.12 -d .whl \
#   gin-config datasets dill multiprocess tensorboardX vaderSentiment alt-profanity-check
set -u
BUDGET=${BUDGET:-570}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Dry run on a CPU machine: SKIP_INSTALL=1 EXTRA=--quick BUDGET=300 bash benchmarks/gpu_check.sh
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# --hlo_dir compiles each program a second time (lower().compile()); the persistent cache turns
# that into a lookup.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

# section NAME SECONDS [XLA_FLAGS] -- bench_generate.py arguments
section() {
  local name=$1 limit=$2 flags=$3
  shift 4
  local left=$((BUDGET - SECONDS))
  if ((left < 45)); then echo "=== $name: skipped ($left s left)"; return; fi
  ((limit > left)) && limit=$left
  echo "=== $name (XLA_FLAGS='$flags', at most $limit s)"
  XLA_FLAGS="$flags" timeout "$limit" python3 benchmarks/bench_generate.py "$@" ${EXTRA:-} \
    --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "rc=$?"
  grep -E "^\| |kernels/iteration|probe" "$OUT/$name.log" | grep -v "^W"
}

# The "+TYPE" form adds to XLA's default command-buffer types; fall back to an explicit list if
# this XLA does not parse it.
GRAPHS="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
if ! XLA_FLAGS="$GRAPHS" timeout 60 python3 -c "import jax; jax.numpy.ones(2).block_until_ready()" \
  > /dev/null 2>&1; then
  GRAPHS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
fi
echo "graph flags: $GRAPHS"

V=base,fused_qkv+reduce,rbg,fused_qkv+reduce+rbg
rm -rf /tmp/hlo /tmp/prof  # a warm machine may hold an earlier run's
STEPS=255  # decode steps of a 256-token call (the first token comes from the prefill)
# 1. Default flags, GPT-2 small: the variants side by side with transformers; compiled HLO
#    (kernels per decode step) and one profiled call per variant.
section small 240 "" -- --sizes gpt2 --variants $V --hf_repeats 2 \
  --hlo_dir /tmp/hlo --profile_dir /tmp/prof
for d in /tmp/prof/*/; do
  [ -d "$d" ] || continue
  echo "--- trace $(basename "$d")"
  python3 benchmarks/trace_summary.py "$d" --steps $STEPS --top 20 | tee "$OUT/trace_$(basename "$d").txt" | head -14
done
tar czf "$OUT/hlo.tgz" -C /tmp hlo 2>/dev/null
# 1b. One online-RL iteration's time split at GPT-2 small (issue 14: generation's share should
#     be under half of an iteration on a GPU), PPO's critic separate and as a value head.
left=$((BUDGET - SECONDS))
if ((left > 230)); then
  echo "=== rl_iteration (at most 200 s)"
  timeout 200 python3 benchmarks/bench_rl_iteration.py --preset gpt2 --prompts 16 --k 4 \
    --prompt_len 64 --new_tokens 128 --repeats 3 --value_model all \
    --out "$OUT/rl_iteration_gpt2.json" > "$OUT/rl_iteration.log" 2>&1
  echo "rc=$?"; grep -E '"(value_model|rollout|scoring|ref\+value|update|iteration)"' \
    "$OUT/rl_iteration.log" | tr -s ' '
fi
# 2. The whole decode loop in one CUDA graph (while/conditional command buffers).
section graphs 120 "$GRAPHS" -- --sizes gpt2 \
  --variants base,fused_qkv+reduce+rbg --skip_transformers --skip_probe
# 3. GPT-2 medium with its transformers baseline (the previous session's run timed out there).
section medium 200 "" -- --sizes gpt2-medium --variants base,fused_qkv+reduce+rbg --hf_repeats 1 \
  --skip_probe
# 4. One while_loop with a per-step exit test (segment_len 0, the commands' default): the
#    loop condition goes back to the host at every step, unless the loop is a CUDA graph.
section seg0 70 "" -- --sizes gpt2 --variants base --segment_len 0 --skip_transformers \
  --skip_probe
section graphs_seg0 70 "$GRAPHS" -- --sizes gpt2 \
  --variants base --segment_len 0 --skip_transformers --skip_probe
# 5. cuBLASLt epilogues (bias and GELU fused into the matmuls).
section cublaslt 100 "--xla_gpu_enable_cublaslt=true" -- --sizes gpt2 \
  --variants base,fused_qkv+reduce+rbg --skip_transformers --skip_probe

# 6. Populations (issue 15): 8 tiny DPO runs as one vmapped program vs one after another (needs runs/quickstart).
((BUDGET - SECONDS > 240)) && [ -d runs/quickstart/sft ] && { timeout 200 python3 benchmarks/bench_population.py --train_steps 40 --quickstart runs/quickstart --out_dir /tmp/bench_population > "$OUT/population.log" 2>&1; tail -6 "$OUT/population.log"; }

left=$((BUDGET - SECONDS))
if ((left > 60)); then
  echo "=== jax 0.11 compatibility: CPU test subset ($left s left)"
  JAX_PLATFORMS=cpu timeout $((left - 10)) python3 -m pytest -q -x -p no:cacheprovider -n 8 \
    tests/models tests/test_partitioning.py tests/test_generate.py tests/ops tests/losses \
    tests/steps 2>&1 | tail -8 | tee "$OUT/pytest.log"
fi
echo "done in $SECONDS s"
