// VeRA: a scaled low-rank product added to a matrix in one pass (the scaling fused, no intermediate):
//
//   lowrank_add:  out[m, n] = base[m, n] + α · sm[m] · sn[n] · Σ_k P[m, k] · sk[k] · Q[k, n]
//
// P and Q are float32 with arbitrary strides (slices and transposes of the shared projections are read in place);
// sm, sn, sk may be null (1). base may be null (0) or equal to out (in place). base/out are float32 or bfloat16
// (suffix _f32 / _bf16), accumulation in float32. Uses:
//   expand (tokens):  y += (λ_d ⊙ x Aᵀ)(λ_b ⊙ B)ᵀ  — P = u = x Aᵀ [T, r], sk = λ_d, Q[k, o] = B[o, k], sn = λ_b;
//   merge (weight):   W' = W + diag(λ_b) B diag(λ_d) A — P = B, sm = λ_b, sk = λ_d, Q = A.
// bfloat16 travels as its 16 raw bits (common.cuh).

#include "common.cuh"

#define TM 64  // output tile rows
#define TN 64  // output tile columns
#define TK 16  // reduction chunk

// grid (ceil(cols / 64), ceil(rows / 64)), block 256: each thread owns a 4 × 4 patch of the 64 × 64 tile
template <typename T>
__device__ void lowrank_add(const T* base, const float* __restrict__ p, long long p_sm, long long p_sk,
                            const float* __restrict__ q, long long q_sk, long long q_sn, const float* __restrict__ sm,
                            const float* __restrict__ sn, const float* __restrict__ sk, float alpha, T* out,
                            long long rows, long long cols, int rank) {
    __shared__ float ps[TK][TM];
    __shared__ float qs[TK][TN];
    const long long m0 = (long long)blockIdx.y * TM, n0 = (long long)blockIdx.x * TN;
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;  // patch rows tr + 16i, columns tc + 16j
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int k0 = 0; k0 < rank; k0 += TK) {
        for (int e = threadIdx.x; e < TK * TM; e += blockDim.x) {
            const int k = e / TM, m = e % TM;
            const long long gm = m0 + m;
            const int gk = k0 + k;
            float v = 0.0f;
            if (gm < rows && gk < rank) v = p[gm * p_sm + gk * p_sk] * (sk ? sk[gk] : 1.0f);
            ps[k][m] = v;
        }
        for (int e = threadIdx.x; e < TK * TN; e += blockDim.x) {
            const int k = e / TN, n = e % TN;
            const long long gn = n0 + n;
            const int gk = k0 + k;
            qs[k][n] = (gn < cols && gk < rank) ? q[gk * q_sk + gn * q_sn] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TK; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = ps[k][tr + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = qs[k][tc + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const long long gm = m0 + tr + 16 * i;
        if (gm >= rows) continue;
        const float row_scale = alpha * (sm ? sm[gm] : 1.0f);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const long long gn = n0 + tc + 16 * j;
            if (gn >= cols) continue;
            const long long at = gm * cols + gn;
            const float v = row_scale * (sn ? sn[gn] : 1.0f) * acc[i][j];
            store(out, at, (base ? load(base, at) : 0.0f) + v);
        }
    }
}

#define VERA(T, suffix)                                                                                         \
    extern "C" __global__ void lowrank_add_##suffix(const T* base, const float* p, long long p_sm, long long p_sk,\
                                                    const float* q, long long q_sk, long long q_sn,             \
                                                    const float* sm, const float* sn, const float* sk,          \
                                                    float alpha, T* out, long long rows, long long cols,        \
                                                    int rank) {                                                 \
        lowrank_add<T>(base, p, p_sm, p_sk, q, q_sk, q_sn, sm, sn, sk, alpha, out, rows, cols, rank);           \
    }

VERA(float, f32)
VERA(bf16_t, bf16)
