// Mixed-adapter batches: each row of the batch runs its own LoRA adapter (its own rank and scale), or none.
//   segmented (prefill): a segment is a run of consecutive tokens on one adapter; a block takes one tile of
//     one segment, so the adapter's A or B is staged once per tile as in lora.cu (SGMV-style)
//   gathered (decode): every token names its adapter; a block takes one token (BGMV-style)
// Adapter tables: a_ptrs[i] / b_ptrs[i] device addresses of adapter i's A [rank_i, K] and B [N, rank_i] (both
// row-major), ranks[i], scales[i]. U is [tokens, ldu] in the accumulation type; columns past a token's rank are
// left unwritten and never read. Tokens without an adapter (index -1, "__base__") are left alone in Y.
#include "common.cuh"
#include "lowrank_tiles.cuh"

#define GATHER_MAX_RANK 256

// grid (token tiles of the longest segment, segments, rank tiles of the largest rank)
template <typename T>
__device__ void sgmv_shrink(const T* x, long long ldx, const unsigned long long* a_ptrs, const int* ranks,
                            const int* seg_start, const int* seg_end, const int* seg_adapter,
                            typename acc_of<T>::type* u, long long ldu, int K) {
    typedef typename acc_of<T>::type A;
    const int adapter = seg_adapter[blockIdx.y];
    const int rank = ranks[adapter];
    const int t0 = seg_start[blockIdx.y] + blockIdx.x * SHRINK_TT, t_end = seg_end[blockIdx.y];
    const int r0 = blockIdx.z * SHRINK_RT;
    if (t0 >= t_end || r0 >= rank) return;  // the same for the whole block, so before any barrier
    const T* a = reinterpret_cast<const T*>(a_ptrs[adapter]);
    A acc[4];
    shrink_tile<T, A>(x, ldx, a, K, 1, t0, t_end, r0, rank, K, acc);
    const int r = r0 + threadIdx.x % SHRINK_RT, tg = threadIdx.x / SHRINK_RT;
    if (r >= rank) return;
    for (int j = 0; j < 4; ++j) {
        const int t = t0 + tg + 8 * j;
        if (t < t_end) u[(long long)t * ldu + r] = acc[j];
    }
}

// grid (token tiles of the longest segment, segments, column tiles of N)
template <typename T>
__device__ void sgmv_expand(const typename acc_of<T>::type* u, long long ldu, const unsigned long long* b_ptrs,
                            const int* ranks, const double* scales, const int* seg_start, const int* seg_end,
                            const int* seg_adapter, T* y, long long ldy, int N) {
    typedef typename acc_of<T>::type A;
    const int adapter = seg_adapter[blockIdx.y];
    const int rank = ranks[adapter];
    const int t0 = seg_start[blockIdx.y] + blockIdx.x * EXPAND_TT, t_end = seg_end[blockIdx.y];
    const int n0 = blockIdx.z * EXPAND_NT;
    if (t0 >= t_end) return;
    const T* b = reinterpret_cast<const T*>(b_ptrs[adapter]);
    A acc[8];
    expand_tile<T, A>(u, ldu, b, rank, 1, t0, t_end, n0, N, rank, acc);
    const int n = n0 + threadIdx.x % EXPAND_NT, tg = threadIdx.x / EXPAND_NT;
    if (n >= N) return;
    const A scale = A(scales[adapter]);
    for (int j = 0; j < 8; ++j) {
        const int t = t0 + tg + 4 * j;
        if (t >= t_end) continue;
        const long long i = (long long)t * ldy + n;
        store(y, i, A(load(y, i)) + scale * acc[j]);
    }
}

// grid (tokens): warp w computes ranks w, w + 8, ... of its token's adapter
template <typename T>
__device__ void bgmv_shrink(const T* x, long long ldx, const unsigned long long* a_ptrs, const int* ranks,
                            const int* index, typename acc_of<T>::type* u, long long ldu, int K) {
    typedef typename acc_of<T>::type A;
    const int t = blockIdx.x, adapter = index[t];
    if (adapter < 0) return;
    const int rank = ranks[adapter], lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const T* a = reinterpret_cast<const T*>(a_ptrs[adapter]);
    const long long row = (long long)t * ldx;
    for (int r = warp; r < rank; r += PD_THREADS / 32) {
        A sum = A(0);
        for (int k = lane; k < K; k += 32) sum += A(load(x, row + k)) * A(load(a, (long long)r * K + k));
        sum = warp_sum(sum);
        if (lane == 0) u[(long long)t * ldu + r] = sum;
    }
}

// grid (tokens, column tiles of 256): thread n adds scale · Σ_r U[t, r] B[n, r] to Y[t, n]
template <typename T>
__device__ void bgmv_expand(const typename acc_of<T>::type* u, long long ldu, const unsigned long long* b_ptrs,
                            const int* ranks, const double* scales, const int* index, T* y, long long ldy,
                            int N) {
    typedef typename acc_of<T>::type A;
    __shared__ A us[GATHER_MAX_RANK];
    const int t = blockIdx.x, adapter = index[t];
    if (adapter < 0) return;
    const int rank = min(ranks[adapter], GATHER_MAX_RANK);  // the host refuses larger ranks
    for (int r = threadIdx.x; r < rank; r += blockDim.x) us[r] = u[(long long)t * ldu + r];
    __syncthreads();
    const int n = blockIdx.y * PD_THREADS + threadIdx.x;
    if (n >= N) return;
    const T* b = reinterpret_cast<const T*>(b_ptrs[adapter]);
    A sum = A(0);
    for (int r = 0; r < rank; ++r) sum += us[r] * A(load(b, (long long)n * rank + r));
    const long long i = (long long)t * ldy + n;
    store(y, i, A(load(y, i)) + A(scales[adapter]) * sum);
}

#define PD_MIXED_ENTRIES(SUFFIX, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                                    \
        sgmv_shrink_##SUFFIX(const T* x, long long ldx, const unsigned long long* a_ptrs, const int* ranks,    \
                             const int* seg_start, const int* seg_end, const int* seg_adapter,                 \
                             acc_of<T>::type* u, long long ldu, int K) {                                        \
        sgmv_shrink<T>(x, ldx, a_ptrs, ranks, seg_start, seg_end, seg_adapter, u, ldu, K);                      \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                                    \
        sgmv_expand_##SUFFIX(const acc_of<T>::type* u, long long ldu, const unsigned long long* b_ptrs,        \
                             const int* ranks, const double* scales, const int* seg_start, const int* seg_end, \
                             const int* seg_adapter, T* y, long long ldy, int N) {                              \
        sgmv_expand<T>(u, ldu, b_ptrs, ranks, scales, seg_start, seg_end, seg_adapter, y, ldy, N);              \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                                    \
        bgmv_shrink_##SUFFIX(const T* x, long long ldx, const unsigned long long* a_ptrs, const int* ranks,    \
                             const int* index, acc_of<T>::type* u, long long ldu, int K) {                      \
        bgmv_shrink<T>(x, ldx, a_ptrs, ranks, index, u, ldu, K);                                                \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                                    \
        bgmv_expand_##SUFFIX(const acc_of<T>::type* u, long long ldu, const unsigned long long* b_ptrs,        \
                             const int* ranks, const double* scales, const int* index, T* y, long long ldy,    \
                             int N) {                                                                           \
        bgmv_expand<T>(u, ldu, b_ptrs, ranks, scales, index, y, ldy, N);                                        \
    }

PD_MIXED_ENTRIES(f32, float)
PD_MIXED_ENTRIES(f64, double)
PD_MIXED_ENTRIES(bf16, bf16_t)
