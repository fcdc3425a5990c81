// LoHa: ΔW built in one kernel, the two low-rank products and their Hadamard product never stored.
//
//   loha_delta:     out[o, i] = base[o, i] + s · (Σ_k a1[o, k] b1[k, i]) · (Σ_k a2[o, k] b2[k, i])
//   loha_backward:  dp1 = s · g ⊙ (a2 b2),  dp2 = s · g ⊙ (a1 b1)   (then dA = dp Bᵀ, dB = Aᵀ dp as GEMMs)
// base may be null. Factors, g and outputs are float32 or bfloat16 (suffix _f32 / _bf16), accumulation float32;
// ranks up to 256. bfloat16 travels as its 16 raw bits (common.cuh).

#include "common.cuh"

#define MAX_RANK 256

// Σ_k a_row[k] · b[k, i] over the rank, b row-major [rank, cols]
template <typename T>
__device__ __forceinline__ float row_product(const float* a_row, const T* __restrict__ b, int rank, long long cols,
                                             long long i) {
    float acc = 0.0f;
    for (int k = 0; k < rank; ++k) acc += a_row[k] * load(b, (long long)k * cols + i);
    return acc;
}

// grid (ceil(cols / blockDim), rows); one output row per grid row, its a1/a2 rows in shared memory
template <typename T>
__device__ void load_rows(const T* __restrict__ a1, const T* __restrict__ a2, float* r1s, float* r2s, int r1, int r2) {
    const long long o = blockIdx.y;
    for (int k = threadIdx.x; k < r1; k += blockDim.x) r1s[k] = load(a1, o * r1 + k);
    for (int k = threadIdx.x; k < r2; k += blockDim.x) r2s[k] = load(a2, o * r2 + k);
    __syncthreads();
}

template <typename T>
__device__ void loha_delta(const T* __restrict__ a1, const T* __restrict__ b1, const T* __restrict__ a2,
                           const T* __restrict__ b2, const T* base, T* out, long long cols, int r1, int r2,
                           float scale) {
    __shared__ float r1s[MAX_RANK];
    __shared__ float r2s[MAX_RANK];
    load_rows(a1, a2, r1s, r2s, r1, r2);
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cols) return;
    const long long at = (long long)blockIdx.y * cols + i;
    const float v = scale * row_product(r1s, b1, r1, cols, i) * row_product(r2s, b2, r2, cols, i);
    store(out, at, (base ? load(base, at) : 0.0f) + v);
}

template <typename T>
__device__ void loha_backward(const T* __restrict__ g, const T* __restrict__ a1, const T* __restrict__ b1,
                              const T* __restrict__ a2, const T* __restrict__ b2, T* __restrict__ dp1,
                              T* __restrict__ dp2, long long cols, int r1, int r2, float scale) {
    __shared__ float r1s[MAX_RANK];
    __shared__ float r2s[MAX_RANK];
    load_rows(a1, a2, r1s, r2s, r1, r2);
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cols) return;
    const long long at = (long long)blockIdx.y * cols + i;
    const float sg = scale * load(g, at);
    store(dp1, at, sg * row_product(r2s, b2, r2, cols, i));
    store(dp2, at, sg * row_product(r1s, b1, r1, cols, i));
}

#define LOHA(T, suffix)                                                                                         \
    extern "C" __global__ void loha_delta_##suffix(const T* a1, const T* b1, const T* a2, const T* b2,          \
                                                   const T* base, T* out, long long cols, int r1, int r2,       \
                                                   float scale) {                                               \
        loha_delta<T>(a1, b1, a2, b2, base, out, cols, r1, r2, scale);                                          \
    }                                                                                                           \
    extern "C" __global__ void loha_backward_##suffix(const T* g, const T* a1, const T* b1, const T* a2,        \
                                                      const T* b2, T* dp1, T* dp2, long long cols, int r1,      \
                                                      int r2, float scale) {                                    \
        loha_backward<T>(g, a1, b1, a2, b2, dp1, dp2, cols, r1, r2, scale);                                     \
    }

LOHA(float, f32)
LOHA(bf16_t, bf16)
