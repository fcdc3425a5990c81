// LoKr: ΔW = s · kron(w1, w2) built in one kernel, and its backward.
//
// w1 [m1, n1], w2 [p, q], ΔW [m1·p, n1·q]:
//   kron_delta:       out[i·p + j, k·q + l] = base[...] + s · w1[i, k] · w2[j, l]           (base may be null)
//   kron_backward_w1: dw1[i, k] = s · Σ_{j,l} g[i·p + j, k·q + l] · w2[j, l]
//   kron_backward_w2: dw2[j, l] = s · Σ_{i,k} g[i·p + j, k·q + l] · w1[i, k]
// Factors, g and outputs are float32 or bfloat16 (suffix _f32 / _bf16), accumulation float32. bfloat16 travels as
// its 16 raw bits (common.cuh).

#include "common.cuh"

// 1-D grid over the m1·p × n1·q elements
template <typename T>
__device__ void kron_delta(const T* __restrict__ w1, const T* __restrict__ w2, const T* base, T* out, int n1, int p,
                           int q, long long total, float scale) {
    const long long cols = (long long)n1 * q;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long row = e / cols, col = e % cols;
        const float v = scale * load(w1, (row / p) * n1 + col / q) * load(w2, (row % p) * q + col % q);
        store(out, e, (base ? load(base, e) : 0.0f) + v);
    }
}

// one thread block (256 threads) per entry of w1: a block reduction over its p × q patch of g
template <typename T>
__device__ void kron_backward_w1(const T* __restrict__ g, const T* __restrict__ w2, T* __restrict__ dw1, int n1, int p,
                                 int q, float scale) {
    __shared__ float partial[256];
    const int i = blockIdx.x / n1, k = blockIdx.x % n1;
    const long long cols = (long long)n1 * q;
    float sum = 0.0f;
    for (int e = threadIdx.x; e < p * q; e += blockDim.x) {
        const int j = e / q, l = e % q;
        sum += load(g, ((long long)i * p + j) * cols + (long long)k * q + l) * load(w2, e);
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) store(dw1, blockIdx.x, scale * partial[0]);
}

// 1-D grid over the p·q entries of w2, each summing over the m1 × n1 blocks
template <typename T>
__device__ void kron_backward_w2(const T* __restrict__ g, const T* __restrict__ w1, T* __restrict__ dw2, int m1,
                                 int n1, int p, int q, float scale) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= p * q) return;
    const int j = e / q, l = e % q;
    const long long cols = (long long)n1 * q;
    float sum = 0.0f;
    for (int i = 0; i < m1; ++i)
        for (int k = 0; k < n1; ++k)
            sum += load(g, ((long long)i * p + j) * cols + (long long)k * q + l) * load(w1, (long long)i * n1 + k);
    store(dw2, e, scale * sum);
}

#define LOKR(T, suffix)                                                                                         \
    extern "C" __global__ void kron_delta_##suffix(const T* w1, const T* w2, const T* base, T* out, int n1,     \
                                                   int p, int q, long long total, float scale) {                \
        kron_delta<T>(w1, w2, base, out, n1, p, q, total, scale);                                               \
    }                                                                                                           \
    extern "C" __global__ void kron_backward_w1_##suffix(const T* g, const T* w2, T* dw1, int n1, int p, int q, \
                                                         float scale) {                                         \
        kron_backward_w1<T>(g, w2, dw1, n1, p, q, scale);                                                       \
    }                                                                                                           \
    extern "C" __global__ void kron_backward_w2_##suffix(const T* g, const T* w1, T* dw2, int m1, int n1, int p,\
                                                         int q, float scale) {                                  \
        kron_backward_w2<T>(g, w1, dw2, m1, n1, p, q, scale);                                                   \
    }

LOKR(float, f32)
LOKR(bf16_t, bf16)
