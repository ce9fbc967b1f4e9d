// Stand-ins for the Metal Shading Language, so that clang can parse flash_moe's Metal
// kernels as C++17 on machines without Apple's compiler (tests/test_kernels.py).
// It checks names, types and templates; address spaces are erased, so it cannot catch
// errors that only Metal's address-space rules would.
#pragma once

#include <cstdint>

#define device
#define threadgroup
#define thread
#define constant

typedef unsigned int uint;
typedef unsigned short ushort;
struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };
struct uint4 { uint x, y, z, w; };

struct half {
  half() = default;
  half(float);
  operator float() const;
};
typedef half float16_t;

struct bfloat16_t {
  bfloat16_t() = default;
  bfloat16_t(float);
  operator float() const;
};

namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
void threadgroup_barrier(mem_flags);
float fma(float, float, float);
float exp(float);
float log(float);
float rsqrt(float);
float simd_sum(float);
template <typename T>
T simd_shuffle_xor(T, unsigned short);
template <typename T, typename U>
T as_type(U);
}  // namespace metal
using namespace metal;
