// The three tiled products of low-rank adapters, shared by the LoRA, mixed-batch and DoRA kernels. Each is one
// block's tile (256 threads) staged through shared memory; the caller picks the tile and writes the result, so
// one routine serves a whole batch, a segment of rows or a single adapter. Rows past the end read as zero.
#pragma once
#include "common.cuh"

#define PD_THREADS 256

// shrink: acc[j] = Σ_k X[t, k] · A[r, k] for t = t0 + tid / 32 + 8 j (j < 4) and r = r0 + tid % 32
#define SHRINK_TT 32
#define SHRINK_RT 32
#define SHRINK_KC 32

template <typename T, typename A>
__device__ void shrink_tile(const T* x, long long ldx, const T* a, long long a_sr, long long a_sk, int t0,
                            int t_end, int r0, int rank, int K, A (&acc)[4]) {
    __shared__ A xs[SHRINK_TT][SHRINK_KC + 1];
    __shared__ A as[SHRINK_RT][SHRINK_KC + 1];  // +1: the 32 ranks of a warp read 32 different banks
    const int tid = threadIdx.x, rl = tid % SHRINK_RT, tg = tid / SHRINK_RT;
    for (int j = 0; j < 4; ++j) acc[j] = A(0);
    for (int k0 = 0; k0 < K; k0 += SHRINK_KC) {
        for (int e = tid; e < SHRINK_TT * SHRINK_KC; e += PD_THREADS) {
            const int tl = e / SHRINK_KC, kl = e % SHRINK_KC, t = t0 + tl, k = k0 + kl;
            xs[tl][kl] = (t < t_end && k < K) ? A(load(x, (long long)t * ldx + k)) : A(0);
        }
        for (int e = tid; e < SHRINK_RT * SHRINK_KC; e += PD_THREADS) {
            const int r_tile = e / SHRINK_KC, kl = e % SHRINK_KC, r = r0 + r_tile, k = k0 + kl;
            as[r_tile][kl] = (r < rank && k < K) ? A(load(a, (long long)r * a_sr + (long long)k * a_sk)) : A(0);
        }
        __syncthreads();
        for (int kl = 0; kl < SHRINK_KC; ++kl) {
            const A av = as[rl][kl];
            for (int j = 0; j < 4; ++j) acc[j] += xs[tg + 8 * j][kl] * av;
        }
        __syncthreads();
    }
}

// expand: acc[j] = Σ_r U[t, r] · B[n, r] for t = t0 + tid / 64 + 4 j (j < 8) and n = n0 + tid % 64
#define EXPAND_TT 32
#define EXPAND_NT 64
#define EXPAND_RC 32

template <typename T, typename A>
__device__ void expand_tile(const A* u, long long ldu, const T* b, long long b_sn, long long b_sr, int t0,
                            int t_end, int n0, int N, int rank, A (&acc)[8]) {
    __shared__ A us[EXPAND_TT][EXPAND_RC];
    __shared__ A bs[EXPAND_NT][EXPAND_RC + 1];
    const int tid = threadIdx.x, nl = tid % EXPAND_NT, tg = tid / EXPAND_NT;
    for (int j = 0; j < 8; ++j) acc[j] = A(0);
    for (int r0 = 0; r0 < rank; r0 += EXPAND_RC) {
        for (int e = tid; e < EXPAND_TT * EXPAND_RC; e += PD_THREADS) {
            const int tl = e / EXPAND_RC, rl = e % EXPAND_RC, t = t0 + tl, r = r0 + rl;
            us[tl][rl] = (t < t_end && r < rank) ? u[(long long)t * ldu + r] : A(0);
        }
        for (int e = tid; e < EXPAND_NT * EXPAND_RC; e += PD_THREADS) {
            const int n_tile = e / EXPAND_RC, rl = e % EXPAND_RC, n = n0 + n_tile, r = r0 + rl;
            bs[n_tile][rl] = (n < N && r < rank) ? A(load(b, (long long)n * b_sn + (long long)r * b_sr)) : A(0);
        }
        __syncthreads();
        for (int rl = 0; rl < EXPAND_RC; ++rl) {
            const A bv = bs[nl][rl];
            for (int j = 0; j < 8; ++j) acc[j] += us[tg + 4 * j][rl] * bv;
        }
        __syncthreads();
    }
}

// outer (the gradients of A and B): acc[j] = Σ_{t_lo <= t < t_hi} U[t, r] · X[t, n]
// for r = r0 + tid / 64 + 4 j (j < 8) and n = n0 + tid % 64
#define OUTER_TC 32
#define OUTER_RT 32
#define OUTER_NT 64

template <typename T, typename A>
__device__ void outer_tile(const A* u, long long ldu, const T* x, long long ldx, int t_lo, int t_hi, int r0,
                           int rank, int n0, int N, A (&acc)[8]) {
    __shared__ A us[OUTER_TC][OUTER_RT + 1];
    __shared__ A xs[OUTER_TC][OUTER_NT + 1];
    const int tid = threadIdx.x, nl = tid % OUTER_NT, rg = tid / OUTER_NT;
    for (int j = 0; j < 8; ++j) acc[j] = A(0);
    for (int t0 = t_lo; t0 < t_hi; t0 += OUTER_TC) {
        for (int e = tid; e < OUTER_TC * OUTER_RT; e += PD_THREADS) {
            const int tl = e / OUTER_RT, rl = e % OUTER_RT, t = t0 + tl, r = r0 + rl;
            us[tl][rl] = (t < t_hi && r < rank) ? u[(long long)t * ldu + r] : A(0);
        }
        for (int e = tid; e < OUTER_TC * OUTER_NT; e += PD_THREADS) {
            const int tl = e / OUTER_NT, n_tile = e % OUTER_NT, t = t0 + tl, n = n0 + n_tile;
            xs[tl][n_tile] = (t < t_hi && n < N) ? A(load(x, (long long)t * ldx + n)) : A(0);
        }
        __syncthreads();
        for (int tl = 0; tl < OUTER_TC; ++tl) {
            const A xv = xs[tl][nl];
            for (int j = 0; j < 8; ++j) acc[j] += us[tl][rg + 4 * j] * xv;
        }
        __syncthreads();
    }
}
