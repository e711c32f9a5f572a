#!/usr/bin/env bash
# One-shot GPU session (see benchmarks/BENCHMARKS.md): sampler benchmark vs transformers,
# SFT step throughput/MFU at GPT-2 small (cuDNN vs XLA attention), and the CPU test subset on
# the GPU machine's jax 0.11 as a compatibility check. Writes everything under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import jax, flax, optax, orbax.checkpoint as o, transformers, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, jax.devices())" | tee -a $OUT/gpu.txt

echo "=== sampler benchmark"
timeout 300 python3 benchmarks/bench_generate.py --sizes gpt2,gpt2-medium --batch 64 \
  --prompt_len 64 --new_tokens 256 --repeats 3 --out $OUT/generate.json 2>&1 | tee $OUT/generate.log | grep -v "^W"

echo "=== SFT step throughput, GPT-2 small, bf16, seq 512, batch 16"
for impl in auto xla; do
  timeout 120 python3 -m rlhf_jax.cli train --gin_file gin/algorithms/sft.gin \
    --gin_file gin/models/gpt2.gin --gin.sft_stage.data=@synthetic_sft_data \
    --gin.synthetic_sft_data.seq_len=512 --gin.synthetic_sft_data.vocab_size=50257 \
    --gin.model_config.attention_impl="'$impl'" --gin.TRAIN_STEPS=60 --gin.BATCH_SIZE=16 \
    --gin.LOG_EVERY=20 --gin.RUN_DIR=/tmp/sft_$impl > $OUT/sft_$impl.log 2>&1
  echo "impl=$impl rc=$?"; cp /tmp/sft_$impl/summary.json $OUT/sft_$impl.json 2>/dev/null
  python3 -c "import json;d=json.load(open('$OUT/sft_$impl.json'));print({k:v for k,v in d.items() if k.startswith(('perf','train/loss','compile'))})" 2>/dev/null || tail -5 $OUT/sft_$impl.log
done

echo "=== jax 0.11 compatibility: CPU test subset"
timeout 150 python3 -m pytest -q -x -p no:cacheprovider -n 8 tests/models tests/test_partitioning.py \
  tests/test_generate.py tests/ops tests/losses tests/steps 2>&1 | tail -8 | tee $OUT/pytest.log
