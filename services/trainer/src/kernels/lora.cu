// Fused LoRA linear pieces around the frozen base GEMM (cuBLAS):
//   forward   Y  = X·Wᵀ (cuBLAS)  then  Y += s·T·Bᵀ  with  T = X·Aᵀ saved
//   backward  dX = dY·W (cuBLAS)  then  dX += s·U·A  with  U = dY·B
//             dB = s·dYᵀ·T (reuses the saved T),  dA = s·Uᵀ·X
// Activations and their gradients are bf16; A, B, T, U and every sum are
// fp32. Shapes: X [m×k], W [n×k], A [r×k], B [n×r], Y [m×n], all row-major.
// The CPU twin of every kernel is lora.rs beside this file.
#include <cuda_bf16.h>

#define WARP 32

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// T[i, j] = Σ_c X[i, c] · A[j, c]. One block per row i; warps take ranks j.
extern "C" __global__ void lora_down(const __nv_bfloat16* x, const float* a, float* t, int m, int k, int r) {
    int i = blockIdx.x;
    if (i >= m) return;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    const __nv_bfloat16* row = x + (size_t)i * k;
    for (int j = warp; j < r; j += warps) {
        const float* aj = a + (size_t)j * k;
        float acc = 0.0f;
        for (int c = lane; c < k; c += WARP) acc += __bfloat162float(row[c]) * aj[c];
        acc = warp_sum(acc);
        if (lane == 0) t[(size_t)i * r + j] = acc;
    }
}

// Y[i, c] += s · Σ_j T[i, j] · B[c, j], in place on the bf16 output of the
// base GEMM. Grid (ceil(n / blockDim), m); T's row is staged in shared memory.
extern "C" __global__ void lora_up_add(__nv_bfloat16* y, const float* t, const float* b, float scale, int m, int n, int r) {
    extern __shared__ float t_row[];
    int i = blockIdx.y;
    if (i >= m) return;
    for (int j = threadIdx.x; j < r; j += blockDim.x) t_row[j] = t[(size_t)i * r + j];
    __syncthreads();
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    const float* bc = b + (size_t)c * r;
    float acc = 0.0f;
    for (int j = 0; j < r; ++j) acc += t_row[j] * bc[j];
    size_t at = (size_t)i * n + c;
    y[at] = __float2bfloat16_rn(__bfloat162float(y[at]) + scale * acc);
}

// U[i, j] = Σ_c dY[i, c] · B[c, j]. One block per row i; warps take ranks j.
extern "C" __global__ void lora_grad_u(const __nv_bfloat16* dy, const float* b, float* u, int m, int n, int r) {
    int i = blockIdx.x;
    if (i >= m) return;
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    const __nv_bfloat16* row = dy + (size_t)i * n;
    for (int j = warp; j < r; j += warps) {
        float acc = 0.0f;
        for (int c = lane; c < n; c += WARP) acc += __bfloat162float(row[c]) * b[(size_t)c * r + j];
        acc = warp_sum(acc);
        if (lane == 0) u[(size_t)i * r + j] = acc;
    }
}

// dX[i, c] += s · Σ_j U[i, j] · A[j, c], in place on the bf16 output of the
// base dX GEMM. Grid (ceil(k / blockDim), m).
extern "C" __global__ void lora_dx_add(__nv_bfloat16* dx, const float* u, const float* a, float scale, int m, int k, int r) {
    extern __shared__ float u_row[];
    int i = blockIdx.y;
    if (i >= m) return;
    for (int j = threadIdx.x; j < r; j += blockDim.x) u_row[j] = u[(size_t)i * r + j];
    __syncthreads();
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= k) return;
    float acc = 0.0f;
    for (int j = 0; j < r; ++j) acc += u_row[j] * a[(size_t)j * k + c];
    size_t at = (size_t)i * k + c;
    dx[at] = __float2bfloat16_rn(__bfloat162float(dx[at]) + scale * acc);
}

// dB[c, j] = s · Σ_i dY[i, c] · T[i, j]. Grid (ceil(n / blockDim), r): each
// thread owns one (c, j) and walks the rows; dY is read coalesced along c.
extern "C" __global__ void lora_grad_b(const __nv_bfloat16* dy, const float* t, float* db, float scale, int m, int n, int r) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int j = blockIdx.y;
    if (c >= n || j >= r) return;
    float acc = 0.0f;
    for (int i = 0; i < m; ++i) acc += __bfloat162float(dy[(size_t)i * n + c]) * t[(size_t)i * r + j];
    db[(size_t)c * r + j] = scale * acc;
}

// dA[j, c] = s · Σ_i U[i, j] · X[i, c]. Grid (ceil(k / blockDim), r).
extern "C" __global__ void lora_grad_a(const float* u, const __nv_bfloat16* x, float* da, float scale, int m, int k, int r) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    int j = blockIdx.y;
    if (c >= k || j >= r) return;
    float acc = 0.0f;
    for (int i = 0; i < m; ++i) acc += u[(size_t)i * r + j] * __bfloat162float(x[(size_t)i * k + c]);
    da[(size_t)j * k + c] = scale * acc;
}
