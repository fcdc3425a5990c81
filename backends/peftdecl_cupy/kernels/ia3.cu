// IA3: one pass over a [rows, d] activation scaling its columns by l, and its backward in one pass over dy.
//
//   scale_columns:           out[t, c] = y[t, c] · l[c]            (out may be y: in place)
//   scale_columns_backward:  dy_scaled[t, c] = dy[t, c] · l[c];  dl[c] += Σ_t dy[t, c] · y[t, c]   (dl zeroed first)
// y is the base layer's output (attention-type IA3) or its input (feed-forward IA3). Activations are float32 or
// bfloat16 (suffix _f32 / _bf16), l and dl float32: a bfloat16 product is formed in float32 and rounded once.
// bfloat16 travels as its 16 raw bits (common.cuh).

#include "common.cuh"

// 1-D grid over rows · d elements
template <typename T>
__device__ void scale_columns(const T* y, const float* __restrict__ l, T* out, long long rows, int d) {
    const long long total = rows * d;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        store(out, e, load(y, e) * l[e % d]);
    }
}

#define COLS 32  // columns of one thread block (blockDim.x), rows strided by blockDim.y = 8

// grid (ceil(d / 32), row chunks), block (32, 8)
template <typename T>
__device__ void scale_columns_backward(const T* __restrict__ dy, const T* __restrict__ y, const float* __restrict__ l,
                                       T* __restrict__ dy_scaled, float* __restrict__ dl, long long rows, int d,
                                       long long rows_per_block) {
    __shared__ float partial[8][COLS];
    const int c = blockIdx.x * COLS + threadIdx.x;
    const long long first = (long long)blockIdx.y * rows_per_block;
    long long last = first + rows_per_block;
    if (last > rows) last = rows;
    float sum = 0.0f;
    if (c < d) {
        const float lc = l[c];
        for (long long t = first + threadIdx.y; t < last; t += blockDim.y) {
            const long long at = t * d + c;
            const float g = load(dy, at);
            store(dy_scaled, at, g * lc);
            sum += g * load(y, at);
        }
    }
    partial[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        float total = 0.0f;
        for (int j = 0; j < blockDim.y; ++j) total += partial[j][threadIdx.x];
        atomicAdd(dl + c, total);
    }
}

#define IA3(T, suffix)                                                                                          \
    extern "C" __global__ void scale_columns_##suffix(const T* y, const float* l, T* out, long long rows,        \
                                                      int d) {                                                  \
        scale_columns<T>(y, l, out, rows, d);                                                                   \
    }                                                                                                           \
    extern "C" __global__ void scale_columns_backward_##suffix(const T* dy, const T* y, const float* l,          \
                                                               T* dy_scaled, float* dl, long long rows, int d,  \
                                                               long long rows_per_block) {                      \
        scale_columns_backward<T>(dy, y, l, dy_scaled, dl, rows, d, rows_per_block);                            \
    }

IA3(float, f32)
IA3(bf16_t, bf16)
