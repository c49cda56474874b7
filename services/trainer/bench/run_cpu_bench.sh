#!/usr/bin/env bash
# The CPU trainer and server against PyTorch on the same cores, in one run,
# alternating the two so both see the same machine: training steps (LoRA
# r=16 on all seven projections, REINFORCE, AdamW) at the ~110M Llama and
# SmolLM2-135M shapes, ours with bf16-stored weights, f32 and bf16 and
# PyTorch + PEFT in fp32 and bf16; then batched generation on the real model (ours vs transformers
# `generate`), then the transformers + PEFT log-probability parity check.
# Each configuration runs in its own process (peak RSS is per process).
# Usage: run_cpu_bench.sh BIN_DIR PYTHON MODEL_DIR [STEPS]
# (env SHAPES: the training shapes to run, default "medium smollm2").
set -euo pipefail
bin=${1:?directory with train_bench, generate_bench and hf_parity}
python=${2:?python with torch, peft and transformers}
model=${3:?model directory (flywheel model import-gguf)}
steps=${4:-4}
here=$(cd "$(dirname "$0")" && pwd)
threads=$(nproc)
export OMP_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads
echo "== machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $threads threads; $(date -u +%F)"
"$bin/gemm_bench" | sed -n 1,2p  # sed reads to the end: head would break the pipe
# Without AVX512_BF16 neither side has bf16 arithmetic: PyTorch's bf16 step
# ran at 3.3 tokens/s at ~110M on an AVX2-only Zen 3 (a 4-step run takes
# minutes) and ours falls back to portable dot products, so those variants
# are skipped there, and said so.
bf16=yes
grep -qw avx512_bf16 /proc/cpuinfo || bf16=
[ -n "$bf16" ] || echo "== no AVX512_BF16 on this CPU: the bf16 variants (ours and PyTorch's) are skipped"
for shape in ${SHAPES:-medium smollm2}; do
  echo "== training step, $shape"
  for round in 1 2; do
    "$bin/train_bench" "$shape" bf16-weights "$steps"
    [ -z "$bf16" ] || "$python" "$here/peft_cpu_bench.py" "$shape" bf16 "$steps" 2>/dev/null
    "$bin/train_bench" "$shape" f32 "$steps"
    "$python" "$here/peft_cpu_bench.py" "$shape" fp32 "$steps" 2>/dev/null
    [ -z "$bf16" ] || "$bin/train_bench" "$shape" bf16 "$steps"
  done
done
echo "== batched generation on $model"
for batch in 16 48; do
  "$bin/generate_bench" "$model" "$batch" 48 | tail -1
  "$python" "$here/hf_generate_bench.py" "$model" "$batch" 48 2>/dev/null
done
echo "== transformers + PEFT read our model and adapter and agree on log-probabilities"
"$bin/hf_parity" "$model" "$python"
