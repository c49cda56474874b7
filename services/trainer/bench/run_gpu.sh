#!/usr/bin/env bash
# The GPU checks of issue 8, on a machine with an NVIDIA GPU, CUDA 13 and
# PyTorch + PEFT: kernel/plan parity against the CPU twins, then the fused
# LoRA benchmark and its PyTorch + PEFT counterpart in the same run.
# Usage: run_gpu.sh <dir with kernel_parity and lora_bench> [arch] [cuda include dir]
set -euo pipefail
bin=${1:?directory holding the kernel_parity and lora_bench binaries}
arch=${2:-sm_90}
include=${3:-/usr/local/cuda/include}
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== parity: every kernel and every GEMM of the fused LoRA plan vs the CPU twins"
"$bin/kernel_parity" "$arch" "$include"
echo "== fused LoRA linear (ours)"
"$bin/lora_bench" "$arch" "$include"
echo "== PyTorch + PEFT, same shapes"
python3 "$here/peft_lora_bench.py"
echo "== whole training step, PyTorch + PEFT (issue 9's baseline; our CUDA step is not built yet)"
python3 "$here/peft_step_bench.py" "${STEP_SHAPES:-all}"
