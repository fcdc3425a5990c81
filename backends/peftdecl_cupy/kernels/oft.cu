// OFT: block-diagonal rotation of row vectors, its weight gradient, and the batched Cayley / Neumann maps.
//
//   rotate_blocks:  y[t, i·b + c] = Σ_k x[t, i·b + k] · R[i, k, c]        (R[i, c, k] when transpose = 1)
//   block_tn:       G[i, k, c]   += Σ_t x[t, i·b + k] · g[t, i·b + c]     (dL/dR_i of rotate_blocks; G zeroed first)
//   skew_solve:     X_m = (I + σ·S_m)⁻¹ · RHS_m                            (Cayley: R = (I + S)⁻¹(I − S))
//   neumann:        R_m = Σ_j c_j · Q_m^j
//
// Activations are float32 or bfloat16 (suffix _f32 / _bf16); rotations and accumulators are float32. bfloat16
// travels as its 16 raw bits (common.cuh).
// Blocks are at most 64 wide (the callers fall back to torch beyond).

#include "common.cuh"

#define MAX_BLOCK 64
#define TILE_ELEMS 4096  // rows · b of one shared-memory tile of x

// grid (ceil(rows / tile_rows), n blocks), any block size; r_stride 0 shares one rotation across blocks
template <typename T>
__device__ void rotate_blocks(const T* __restrict__ x, const float* __restrict__ r, T* __restrict__ y,
                              long long rows, int n, int b, int r_stride, int transpose) {
    __shared__ float rs[MAX_BLOCK * MAX_BLOCK];
    __shared__ float xs[TILE_ELEMS];
    const int blk = blockIdx.y;
    const int tile_rows = TILE_ELEMS / b;
    const long long row0 = (long long)blockIdx.x * tile_rows;
    const long long width = (long long)n * b;
    const float* rb = r + (long long)blk * r_stride;
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) rs[e] = rb[e];
    for (int e = threadIdx.x; e < tile_rows * b; e += blockDim.x) {
        long long t = row0 + e / b;
        xs[e] = t < rows ? load(x, t * width + (long long)blk * b + e % b) : 0.0f;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < tile_rows * b; e += blockDim.x) {
        long long t = row0 + e / b;
        if (t >= rows) continue;
        const int c = e % b;
        const float* xr = xs + (e / b) * b;
        float acc = 0.0f;
        if (transpose) {
            for (int k = 0; k < b; ++k) acc += xr[k] * rs[c * b + k];
        } else {
            for (int k = 0; k < b; ++k) acc += xr[k] * rs[k * b + c];
        }
        store(y, t * width + (long long)blk * b + c, acc);
    }
}

#define TN_ROWS_ELEMS 2048  // rows · b of the x and g tiles in block_tn
#define TN_MAX_ACC 16       // b·b / blockDim (256 threads, b ≤ 64)

// grid (ceil(rows / rows_per_grid_block), n), 256 threads; out [n, b, b] float32, zeroed by the caller
template <typename T>
__device__ void block_tn(const T* __restrict__ x, const T* __restrict__ g, float* __restrict__ out,
                         long long rows, int n, int b, long long rows_per_block) {
    __shared__ float xs[TN_ROWS_ELEMS];
    __shared__ float gs[TN_ROWS_ELEMS];
    const int blk = blockIdx.y;
    const long long width = (long long)n * b;
    const int tile_rows = TN_ROWS_ELEMS / b;
    const long long first = (long long)blockIdx.x * rows_per_block;
    long long last = first + rows_per_block;
    if (last > rows) last = rows;
    float acc[TN_MAX_ACC];
    for (int j = 0; j < TN_MAX_ACC; ++j) acc[j] = 0.0f;
    for (long long row0 = first; row0 < last; row0 += tile_rows) {
        __syncthreads();
        for (int e = threadIdx.x; e < tile_rows * b; e += blockDim.x) {
            long long t = row0 + e / b;
            long long at = t * width + (long long)blk * b + e % b;
            bool in = t < last;
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

// One thread block per matrix: Gauss–Jordan on (I + σS) without pivoting, which is stable when the symmetric
// part of I + σS is positive definite — it is I for the skew-symmetric S that OFT and BOFT pass.
extern "C" __global__ void skew_solve_f32(const float* __restrict__ s, const float* __restrict__ rhs,
                                          float* __restrict__ out, int b, float sign) {
    __shared__ float a[MAX_BLOCK * MAX_BLOCK];
    __shared__ float xm[MAX_BLOCK * MAX_BLOCK];
    __shared__ float factor[MAX_BLOCK];
    const long long base = (long long)blockIdx.x * b * b;
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
        a[e] = sign * s[base + e] + (e / b == e % b ? 1.0f : 0.0f);
        xm[e] = rhs[base + e];
    }
    __syncthreads();
    for (int p = 0; p < b; ++p) {
        const float inv = 1.0f / a[p * b + p];
        __syncthreads();
        for (int c = threadIdx.x; c < b; c += blockDim.x) {
            a[p * b + c] *= inv;
            xm[p * b + c] *= inv;
        }
        __syncthreads();
        for (int r = threadIdx.x; r < b; r += blockDim.x) factor[r] = r == p ? 0.0f : a[r * b + p];
        __syncthreads();
        for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
            const int r = e / b, c = e % b;
            a[e] -= factor[r] * a[p * b + c];
            xm[e] -= factor[r] * xm[p * b + c];
        }
        __syncthreads();
    }
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) out[base + e] = xm[e];
}

// One thread block (256 threads) per matrix: R = Σ_j c_j Q^j, the powers kept in shared memory.
extern "C" __global__ void neumann_f32(const float* __restrict__ q, const float* __restrict__ coeffs, int terms,
                                       float* __restrict__ out, int b) {
    __shared__ float qs[MAX_BLOCK * MAX_BLOCK];
    __shared__ float power[MAX_BLOCK * MAX_BLOCK];
    const long long base = (long long)blockIdx.x * b * b;
    float acc[TN_MAX_ACC];
    float next[TN_MAX_ACC];
#pragma unroll
    for (int j = 0; j < TN_MAX_ACC; ++j) {
        int e = threadIdx.x + j * blockDim.x;
        float eye = (e < b * b && e / b == e % b) ? 1.0f : 0.0f;
        acc[j] = coeffs[0] * eye;
        if (e < b * b) {
            qs[e] = q[base + e];
            power[e] = eye;
        }
    }
    __syncthreads();
    for (int k = 1; k < terms; ++k) {
#pragma unroll
        for (int j = 0; j < TN_MAX_ACC; ++j) {
            int e = threadIdx.x + j * blockDim.x;
            next[j] = 0.0f;
            if (e < b * b) {
                const int r = e / b, c = e % b;
                for (int m = 0; m < b; ++m) next[j] += power[r * b + m] * qs[m * b + c];
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < TN_MAX_ACC; ++j) {
            int e = threadIdx.x + j * blockDim.x;
            if (e < b * b) {
                power[e] = next[j];
                acc[j] += coeffs[k] * next[j];
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < TN_MAX_ACC; ++j) {
        int e = threadIdx.x + j * blockDim.x;
        if (e < b * b) out[base + e] = acc[j];
    }
}

#define ROTATE(T, suffix)                                                                                      \
    extern "C" __global__ void rotate_blocks_##suffix(const T* x, const float* r, T* y, long long rows, int n, \
                                                      int b, int r_stride, int transpose) {                    \
        rotate_blocks<T>(x, r, y, rows, n, b, r_stride, transpose);                                            \
    }                                                                                                          \
    extern "C" __global__ void block_tn_##suffix(const T* x, const T* g, float* out, long long rows, int n,     \
                                                 int b, long long rows_per_block) {                            \
        block_tn<T>(x, g, out, rows, n, b, rows_per_block);                                                    \
    }

ROTATE(float, f32)
ROTATE(bf16_t, bf16)
