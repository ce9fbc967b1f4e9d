// Metal dialect of the shared kernel sources (quant.h, *.body); cuda.h is its twin.
// MLX puts metal_stdlib and its bfloat16_t / float16_t types before this header.

#define FN inline
#define DEVICE device             // global memory pointers
#define TG threadgroup            // pointers to shared (threadgroup) memory
#define THREAD thread             // pointers to registers / private memory
#define SHARED threadgroup        // declaration of a shared array
#define UNROLL _Pragma("clang loop unroll(full)")
#define BARRIER() threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define FMA(a, b, c) metal::fma(a, b, c)
#define EXP(v) metal::exp(v)
#define LOG(v) metal::log(v)
#define RSQRT(v) metal::rsqrt(v)
#define AS_FLOAT(u) metal::as_type<float>(u)

inline float warp_sum(float v) {
  return metal::simd_sum(v);
}

// Lane i's v from lane i ^ mask (butterfly reductions that carry more than a sum).
template <typename T>
inline T shuffle_xor(T v, uint mask) {
  return metal::simd_shuffle_xor(v, ushort(mask));
}

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
inline void store_float(device T* p, float v) {
  *p = static_cast<T>(v);
}
