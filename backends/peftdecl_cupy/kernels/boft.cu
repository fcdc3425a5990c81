// BOFT: one butterfly factor B = P · blockdiag(Q) · Pᵀ applied to row vectors in one pass, the permutation folded
// into the indexing (no gathered copy of x), and the factor's weight gradient.
//
// With idx = p⁻¹ of the factor (a table of n·b int32; null for the identity), writing j = i·b + c:
//   butterfly_factor:     y[t, idx[j]] = Σ_k x[t, idx[i·b + k]] · Q[i, k, c]      (Q[i, c, k] when transpose = 1)
//   butterfly_factor_tn:  G[i, k, c]  += Σ_t x[t, idx[i·b + k]] · g[t, idx[i·b + c]]    (G zeroed by the caller)
// transpose = 1 with the output gradient as x gives dL/dx of the factor, since Bᵀ = P · blockdiag(Qᵀ) · Pᵀ.
// Activations are float32 or bfloat16 (suffix _f32 / _bf16), Q and accumulators float32; bfloat16 travels as its
// 16 raw bits (common.cuh). Blocks are at most 64 wide (callers fall back beyond).

#include "common.cuh"

#define MAX_BLOCK 64
#define TILE_ELEMS 4096     // rows · b of one shared-memory tile in butterfly_factor
#define TN_ROWS_ELEMS 2048  // rows · b of the x and g tiles in butterfly_factor_tn
#define TN_MAX_ACC 16       // b·b / blockDim (256 threads, b ≤ 64)

// grid (ceil(rows / (TILE_ELEMS / b)), n blocks), any block size
template <typename T>
__device__ void butterfly_factor(const T* __restrict__ x, const float* __restrict__ q, const int* __restrict__ idx,
                                 T* __restrict__ y, long long rows, int n, int b, int transpose) {
    __shared__ float qs[MAX_BLOCK * MAX_BLOCK];
    __shared__ float xs[TILE_ELEMS];
    __shared__ int cols[MAX_BLOCK];
    const int blk = blockIdx.y;
    const int tile_rows = TILE_ELEMS / b;
    const long long row0 = (long long)blockIdx.x * tile_rows;
    const long long width = (long long)n * b;
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) qs[e] = q[(long long)blk * b * b + e];
    for (int e = threadIdx.x; e < b; e += blockDim.x) cols[e] = idx ? idx[blk * b + e] : blk * b + e;
    __syncthreads();
    for (int e = threadIdx.x; e < tile_rows * b; e += blockDim.x) {
        long long t = row0 + e / b;
        xs[e] = t < rows ? load(x, t * width + cols[e % b]) : 0.0f;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < tile_rows * b; e += blockDim.x) {
        long long t = row0 + e / b;
        if (t >= rows) continue;
        const int c = e % b;
        const float* xr = xs + (e / b) * b;
        float acc = 0.0f;
        if (transpose) {
            for (int k = 0; k < b; ++k) acc += xr[k] * qs[c * b + k];
        } else {
            for (int k = 0; k < b; ++k) acc += xr[k] * qs[k * b + c];
        }
        store(y, t * width + cols[c], acc);
    }
}

// grid (ceil(rows / rows_per_block), n), 256 threads; out [n, b, b] float32, zeroed by the caller
template <typename T>
__device__ void butterfly_factor_tn(const T* __restrict__ x, const T* __restrict__ g, const int* __restrict__ idx,
                                    float* __restrict__ out, long long rows, int n, int b,
                                    long long rows_per_block) {
    __shared__ float xs[TN_ROWS_ELEMS];
    __shared__ float gs[TN_ROWS_ELEMS];
    __shared__ int cols[MAX_BLOCK];
    const int blk = blockIdx.y;
    const long long width = (long long)n * b;
    const int tile_rows = TN_ROWS_ELEMS / b;
    const long long first = (long long)blockIdx.x * rows_per_block;
    long long last = first + rows_per_block;
    if (last > rows) last = rows;
    for (int e = threadIdx.x; e < b; e += blockDim.x) cols[e] = idx ? idx[blk * b + e] : blk * b + e;
    float acc[TN_MAX_ACC];
    for (int j = 0; j < TN_MAX_ACC; ++j) acc[j] = 0.0f;
    for (long long row0 = first; row0 < last; row0 += tile_rows) {
        __syncthreads();
        for (int e = threadIdx.x; e < tile_rows * b; e += blockDim.x) {
            long long t = row0 + e / b;
            bool in = t < last;
            long long at = t * width + cols[e % b];
            xs[e] = in ? load(x, at) : 0.0f;
            gs[e] = in ? load(g, at) : 0.0f;
        }
        __syncthreads();
        int used = (int)(last - row0 < tile_rows ? last - row0 : tile_rows);
#pragma unroll
        for (int j = 0; j < TN_MAX_ACC; ++j) {
            int e = threadIdx.x + j * blockDim.x;
            if (e >= b * b) break;
            int k = e / b, c = e % b;
            float s = 0.0f;
            for (int t = 0; t < used; ++t) s += xs[t * b + k] * gs[t * b + c];
            acc[j] += s;
        }
    }
#pragma unroll
    for (int j = 0; j < TN_MAX_ACC; ++j) {
        int e = threadIdx.x + j * blockDim.x;
        if (e < b * b) atomicAdd(out + (long long)blk * b * b + e, acc[j]);
    }
}

#define BUTTERFLY(T, suffix)                                                                                    \
    extern "C" __global__ void butterfly_factor_##suffix(const T* x, const float* q, const int* idx, T* y,       \
                                                         long long rows, int n, int b, int transpose) {         \
        butterfly_factor<T>(x, q, idx, y, rows, n, b, transpose);                                               \
    }                                                                                                           \
    extern "C" __global__ void butterfly_factor_tn_##suffix(const T* x, const T* g, const int* idx, float* out,  \
                                                            long long rows, int n, int b,                       \
                                                            long long rows_per_block) {                         \
        butterfly_factor_tn<T>(x, g, idx, out, rows, n, b, rows_per_block);                                    \
    }

BUTTERFLY(float, f32)
BUTTERFLY(bf16_t, bf16)
