// CUDA dialect of the shared kernel sources (quant.h, *.body); metal.h is its twin.
// MLX puts cuda_bf16.h, cuda_fp16.h and <cuda/std/...> before this header (NVRTC).

typedef unsigned int uint;

#define FN __device__ __forceinline__
#define DEVICE
#define TG
#define THREAD
#define SHARED __shared__
#define UNROLL _Pragma("unroll")
#define BARRIER() __syncthreads()
#define FMA(a, b, c) fmaf(a, b, c)
#define EXP(v) expf(v)
#define LOG(v) logf(v)
#define RSQRT(v) rsqrtf(v)
#define AS_FLOAT(u) __uint_as_float(u)

FN float warp_sum(float v) {
  UNROLL
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Lane i's v from lane i ^ mask (butterfly reductions that carry more than a sum).
template <typename T>
FN T shuffle_xor(T v, uint mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

FN float to_float(float v) {
  return v;
}
FN float to_float(__half v) {
  return __half2float(v);
}
FN float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

FN void store_float(float* p, float v) {
  *p = v;
}
FN void store_float(__half* p, float v) {
  *p = __float2half(v);
}
FN void store_float(__nv_bfloat16* p, float v) {
  *p = __float2bfloat16(v);
}
