// The optimiser over every LoRA parameter at once: the parameters, gradients
// and both moments of all adapted modules live in four flat fp32 buffers, so
// one launch updates them all. The CPU twin is adamw.rs beside this file.

// Per-block partial sums of squares of g (the host adds the partials in
// order, in f64, so the global norm is deterministic).
extern "C" __global__ void sum_squares(const float* g, long long n, double* partial) {
    __shared__ double block[256];
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        double v = g[i];
        acc += v * v;
    }
    block[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (threadIdx.x < stride) block[threadIdx.x] += block[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = block[0];
}

// One AdamW step with decoupled weight decay; `grad_scale` applies the
// global-norm clip. bias1 = 1 − β₁ᵗ, bias2 = 1 − β₂ᵗ.
extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, long long n, float lr, float beta1,
                                      float beta2, float eps, float weight_decay, float bias1, float bias2,
                                      float grad_scale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float update = (mi / bias1) / (sqrtf(vi / bias2) + eps) + weight_decay * p[i];
        p[i] -= lr * update;
    }
}
