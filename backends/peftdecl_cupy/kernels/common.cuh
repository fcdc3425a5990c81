// What every peftdecl kernel shares: element types, loads and stores, warp sums.
// No system headers: NVRTC compiles these without a host toolchain (peftdecl_cupy._modules expands the include).
#pragma once

// bfloat16 storage: the upper 16 bits of an IEEE float32 (CuPy has no bfloat16 dtype: uint16 arrays hold it)
struct bf16_t {
    unsigned short bits;
};

// accumulation type: float for float32 and bfloat16, double for float64
template <typename T>
struct acc_of {
    typedef float type;
};
template <>
struct acc_of<double> {
    typedef double type;
};

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ double load(const double* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const bf16_t* p, long long i) {
    return __uint_as_float(((unsigned int)p[i].bits) << 16);
}

__device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void store(double* p, long long i, double v) { p[i] = v; }
__device__ __forceinline__ void store(bf16_t* p, long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN instead of rounding to infinity
        p[i].bits = (unsigned short)((u >> 16) | 0x0040u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    p[i].bits = (unsigned short)(u >> 16);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// the sum of v over a block of blockDim.x threads (a multiple of 32, at most 1024), valid in thread 0
template <typename A>
__device__ A block_sum(A v) {
    __shared__ A partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = (threadIdx.x < blockDim.x / 32) ? partial[lane] : A(0);
    return warp == 0 ? warp_sum(v) : A(0);
}
