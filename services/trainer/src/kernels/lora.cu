// The fused LoRA linear runs as cuBLAS GEMMs over padded buffers (see the
// plan in lora.rs: X′ = [X | X·Aᵀ], W′ = [W | s·B ; A | ·]), so the LoRA term
// is summed inside the base GEMM instead of in a pass over Y. The one kernel
// it needs copies the fp32 master A and B into W′'s bf16 blocks after each
// optimiser step. The CPU twin is `lora_pack_block` in lora.rs.
#include <cuda_bf16.h>

// dst[(row0 + i)·ld + col0 + j] = bf16(scale · src[i·cols + j]).
// Grid (ceil(cols / blockDim.x), ceil(rows / blockDim.y)).
extern "C" __global__ void lora_pack_block(__nv_bfloat16* dst, long long ld, long long row0, long long col0,
                                           const float* src, int rows, int cols, float scale) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int i = blockIdx.y * blockDim.y + threadIdx.y;
    if (i >= rows || j >= cols) return;
    dst[(row0 + i) * ld + col0 + j] = __float2bfloat16_rn(scale * src[(size_t)i * cols + j]);
}
