// Affine-quantized dot products shared by every kernel body (dialect: metal.h / cuda.h).
//
// Packing is mx.quantize's: a row of n values is n * BITS / 32 little-endian uint32 words,
// value j in bits [j * BITS, (j + 1) * BITS) of the row's bit stream (3-, 5- and 6-bit
// values straddle words), and w = q * scale + bias per group of GROUP_SIZE values.
//
// Work unit: a chunk of 32 consecutive values, i.e. BITS words. GROUP_SIZE % 32 == 0, so
// a chunk has one scale s and one bias b, and
//     sum_j (q_j * s + b) * x_j  =  s * sum_j q_j * x_j  +  b * sum_j x_j :
// one FMA per weight. This is the seed's FMA rearrangement (fma(q, s*x, b*x)) taken one
// step further: sum_j x_j is computed once per chunk and shared by every row a thread
// handles, so neither s*x_j nor b*x_j is formed per weight.
//
// x sits in shared memory as float, chunk c at c * XS_STRIDE: the pad word puts the 32
// chunks that a warp's 32 lanes read at once on 32 different banks.

#define CHUNK 32
#define XS_STRIDE 33

// q as a float without an int-to-float instruction (quarter rate on NVIDIA GPUs):
// 0x4B000000 is 2^23, and q fits in its mantissa.
FN float q_to_float(uint q) {
  return AS_FLOAT(0x4B000000u | q) - 8388608.0f;
}

// The BITS words of one chunk. Row starts and chunks are multiples of BITS words, so
// p is 16-byte aligned when BITS % 4 == 0 and 8-byte aligned when BITS % 2 == 0.
template <int BITS>
FN void load_chunk_words(const DEVICE uint32_t* p, THREAD uint32_t* wv) {
  if constexpr (BITS % 4 == 0) {
    UNROLL
    for (int i = 0; i < BITS / 4; ++i) {
      const uint4 v = reinterpret_cast<const DEVICE uint4*>(p)[i];
      wv[4 * i] = v.x;
      wv[4 * i + 1] = v.y;
      wv[4 * i + 2] = v.z;
      wv[4 * i + 3] = v.w;
    }
  } else if constexpr (BITS % 2 == 0) {
    UNROLL
    for (int i = 0; i < BITS / 2; ++i) {
      const uint2 v = reinterpret_cast<const DEVICE uint2*>(p)[i];
      wv[2 * i] = v.x;
      wv[2 * i + 1] = v.y;
    }
  } else {
    UNROLL
    for (int i = 0; i < BITS; ++i) {
      wv[i] = p[i];
    }
  }
}

// Value j of a chunk; j is a constant once the caller's loop is unrolled.
template <int BITS>
FN uint chunk_value(THREAD const uint32_t* wv, const int j) {
  const int bit = j * BITS;
  const int word = bit / 32;
  const int shift = bit % 32;
  uint q = wv[word] >> shift;
  if (shift + BITS > 32) {
    q |= wv[word + 1] << (32 - shift);
  }
  return q & ((1u << BITS) - 1u);
}

// One chunk of one row: w, scales, biases point at the row; xv holds the chunk's x.
template <int BITS, typename ST>
FN float qdot_chunk(
    const DEVICE uint32_t* w,
    const DEVICE ST* scales,
    const DEVICE ST* biases,
    const int chunk,
    const int group,
    THREAD const float* xv,
    const float xsum) {
  uint32_t wv[BITS];
  load_chunk_words<BITS>(w + chunk * BITS, wv);
  float d0 = 0.0f;
  float d1 = 0.0f;
  UNROLL
  for (int j = 0; j < CHUNK; j += 2) {
    d0 = FMA(q_to_float(chunk_value<BITS>(wv, j)), xv[j], d0);
    d1 = FMA(q_to_float(chunk_value<BITS>(wv, j + 1)), xv[j + 1], d1);
  }
  return FMA(to_float(scales[group]), d0 + d1, to_float(biases[group]) * xsum);
}

// Chunk c of the staged x into registers; returns its sum.
FN float load_x_chunk(const TG float* xs, const int c, THREAD float* xv) {
  float sum = 0.0f;
  UNROLL
  for (int j = 0; j < CHUNK; ++j) {
    xv[j] = xs[c * XS_STRIDE + j];
    sum += xv[j];
  }
  return sum;
}

// count values of x (a multiple of CHUNK), times scale, into xs in the padded layout.
template <typename XT>
FN void stage_x(
    TG float* xs,
    const DEVICE XT* x,
    const int count,
    const uint tid,
    const uint nthreads,
    const float scale) {
  for (int i = tid; i < count; i += nthreads) {
    xs[(i / CHUNK) * XS_STRIDE + i % CHUNK] = to_float(x[i]) * scale;
  }
}
