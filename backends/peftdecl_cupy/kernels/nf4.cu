// 4-bit (NF4, FP4) dequantisation in bitsandbytes' layout, alone or fused with a LoRA update (QLoRA):
//
// The weight [rows, cols] flattened row-major is cut into blocks of `blocksize`; element e is the nibble
// codes[e / 2] >> 4 for even e and codes[e / 2] & 15 for odd e, worth table[nibble] · absmax[e / blocksize]
// (table: the 16 values of the quant state's code, NF4 or FP4). With double quantisation absmax is itself stored
// as bytes: absmax[i] = code2[q[i]] · absmax2[i / blocksize2] + offset (absmax_dequant).
//   nf4_dequant:  out[e] = table[nibble(e)] · absmax[e / blocksize]
//   nf4_lowrank:  out[o, i] = W[o, i] + s · Σ_k B[o, k] · A[k, i]   (W dequantised on the fly; A, B float32)
// Outputs are float32 or bfloat16 (suffix _f32 / _bf16). bfloat16 travels as its 16 raw bits
// (common.cuh).

#include "common.cuh"

#define MAX_RANK 256

__device__ __forceinline__ float dequant(const unsigned char* __restrict__ codes, const float* __restrict__ absmax,
                                         const float* __restrict__ table, long long e, int blocksize) {
    const unsigned char byte = codes[e >> 1];
    const int nibble = (e & 1) ? (byte & 15) : (byte >> 4);
    return table[nibble] * absmax[e / blocksize];
}

// 1-D grid over the blocks of absmax
extern "C" __global__ void absmax_dequant(const unsigned char* __restrict__ q, const float* __restrict__ code2,
                                          const float* __restrict__ absmax2, float offset, float* __restrict__ out,
                                          long long n, int blocksize2) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = code2[q[i]] * absmax2[i / blocksize2] + offset;
}

// 1-D grid over the n elements
template <typename T>
__device__ void nf4_dequant(const unsigned char* __restrict__ codes, const float* __restrict__ absmax,
                            const float* __restrict__ table, T* __restrict__ out, long long n, int blocksize) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        store(out, e, dequant(codes, absmax, table, e, blocksize));
    }
}

// grid (ceil(cols / blockDim), rows): one output row per grid row, its row of B in shared memory
template <typename T>
__device__ void nf4_lowrank(const unsigned char* __restrict__ codes, const float* __restrict__ absmax,
                            const float* __restrict__ table, int blocksize, const float* __restrict__ b,
                            const float* __restrict__ a, float scale, T* __restrict__ out, long long cols, int rank) {
    __shared__ float brow[MAX_RANK];
    const long long o = blockIdx.y;
    for (int k = threadIdx.x; k < rank; k += blockDim.x) brow[k] = b[o * rank + k];
    __syncthreads();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= cols) return;
    float acc = 0.0f;
    for (int k = 0; k < rank; ++k) acc += brow[k] * a[(long long)k * cols + i];
    const long long e = o * cols + i;
    store(out, e, dequant(codes, absmax, table, e, blocksize) + scale * acc);
}

#define NF4(T, suffix)                                                                                          \
    extern "C" __global__ void nf4_dequant_##suffix(const unsigned char* codes, const float* absmax,            \
                                                    const float* table, T* out, long long n, int blocksize) {   \
        nf4_dequant<T>(codes, absmax, table, out, n, blocksize);                                                \
    }                                                                                                           \
    extern "C" __global__ void nf4_lowrank_##suffix(const unsigned char* codes, const float* absmax,            \
                                                    const float* table, int blocksize, const float* b,          \
                                                    const float* a, float scale, T* out, long long cols,        \
                                                    int rank) {                                                 \
        nf4_lowrank<T>(codes, absmax, table, blocksize, b, a, scale, out, cols, rank);                          \
    }

NF4(float, f32)
NF4(bf16_t, bf16)
