// DoRA's two passes (peftdecl_cupy.dora launches these; W Aᵀ and A Aᵀ are lora.cu shrinks):
//   row norm  n[o] = sqrt(max(0, ‖W[o]‖² + 2s ⟨B[o], (W Aᵀ)[o]⟩ + s² ⟨B[o], (B A Aᵀ)[o]⟩))   never forming B A
//   output    D = Y − b + s · U Bᵀ,  Y' = b + g ⊙ D  with g = m / n (1 where n = 0), one pass over Y;
//             D is kept for the magnitude's gradient (dL/dm = Σ_t dY' ⊙ D / n)
// ‖W[o]‖² comes from dora_row_sumsq (one block per row). Norms are in the accumulation type.
#include "common.cuh"
#include "lowrank_tiles.cuh"

// grid (rows): out[o] = Σ_i W[o, i]²
template <typename T>
__device__ void dora_row_sumsq(const T* w, long long ldw, typename acc_of<T>::type* out, int K) {
    typedef typename acc_of<T>::type A;
    const long long row = (long long)blockIdx.x * ldw;
    A sum = A(0);
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
        const A v = A(load(w, row + i));
        sum += v * v;
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

// grid (ceil(rows / 8)), 256 threads: one warp per row o; wa = W Aᵀ [rows, rank], aat = A Aᵀ [rank, rank]
template <typename T>
__device__ void dora_norm(const typename acc_of<T>::type* wsq, const typename acc_of<T>::type* wa, const T* b,
                          const typename acc_of<T>::type* aat, typename acc_of<T>::type* n_out, int rows, int rank,
                          double s) {
    typedef typename acc_of<T>::type A;
    const int o = blockIdx.x * (PD_THREADS / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (o >= rows) return;  // a whole warp leaves together: the warp sum below has every lane or none
    const long long brow = (long long)o * rank;
    A term = A(0);
    for (int r = lane; r < rank; r += 32) {
        A baat = A(0);  // (B A Aᵀ)[o, r]
        for (int q = 0; q < rank; ++q) baat += A(load(b, brow + q)) * aat[(long long)q * rank + r];
        term += A(load(b, brow + r)) * (A(2.0 * s) * wa[brow + r] + A(s * s) * baat);
    }
    term = warp_sum(term);
    if (lane == 0) {
        const A squared = wsq[o] + term;
        n_out[o] = sqrt(squared > A(0) ? squared : A(0));  // cancellation can round a zero row below 0
    }
}

// grid (token tiles, column tiles of N) as lora_expand; bias may be null (a layer without one)
template <typename T>
__device__ void dora_output(const typename acc_of<T>::type* u, long long ldu, const T* b, const T* y,
                            long long ldy, const T* bias, const T* m, const typename acc_of<T>::type* norm,
                            T* out, T* direction, int tokens, int N, int rank, double s) {
    typedef typename acc_of<T>::type A;
    const int t0 = blockIdx.x * EXPAND_TT, n0 = blockIdx.y * EXPAND_NT;
    A acc[8];
    expand_tile<T, A>(u, ldu, b, rank, 1, t0, tokens, n0, N, rank, acc);
    const int n = n0 + threadIdx.x % EXPAND_NT, tg = threadIdx.x / EXPAND_NT;
    if (n >= N) return;
    const A bn = bias != nullptr ? A(load(bias, n)) : A(0), nn = norm[n];
    const A g = nn > A(0) ? A(load(m, n)) / nn : A(1);
    for (int j = 0; j < 8; ++j) {
        const int t = t0 + tg + 4 * j;
        if (t >= tokens) continue;
        const long long i = (long long)t * ldy + n;
        const A d = A(load(y, i)) - bn + A(s) * acc[j];
        store(direction, i, d);
        store(out, i, bn + g * d);
    }
}

#define PD_DORA_ENTRIES(SUFFIX, T)                                                                              \
    extern "C" __global__ void dora_row_sumsq_##SUFFIX(const T* w, long long ldw, acc_of<T>::type* out, int K) { \
        dora_row_sumsq<T>(w, ldw, out, K);                                                                      \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                                    \
        dora_norm_##SUFFIX(const acc_of<T>::type* wsq, const acc_of<T>::type* wa, const T* b,                  \
                           const acc_of<T>::type* aat, acc_of<T>::type* n_out, int rows, int rank, double s) {  \
        dora_norm<T>(wsq, wa, b, aat, n_out, rows, rank, s);                                                    \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(PD_THREADS)                                                    \
        dora_output_##SUFFIX(const acc_of<T>::type* u, long long ldu, const T* b, const T* y, long long ldy,   \
                             const T* bias, const T* m, const acc_of<T>::type* norm, T* out, T* direction,     \
                             int tokens, int N, int rank, double s) {                                           \
        dora_output<T>(u, ldu, b, y, ldy, bias, m, norm, out, direction, tokens, N, rank, s);                   \
    }

PD_DORA_ENTRIES(f32, float)
PD_DORA_ENTRIES(f64, double)
PD_DORA_ENTRIES(bf16, bf16_t)
