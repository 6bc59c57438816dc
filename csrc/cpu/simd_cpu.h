// Small helpers shared by the torch-free CPU kernels (linear_cpu.cpp, linear_int8_act_cpu.cpp, attention_cpu.cpp): the
// per-function instruction-set attributes (one binary carries every path and picks at run time), the exact bf16 -> fp32
// widening and the fp32 -> bf16 rounding (ops_cpu.cpp, the torch file, converts with c10::BFloat16, which rounds the
// same way), the scaled stores of a tile's row sums, the L2 prefetch of a weight stream, the loads of 16 (AVX-512) or
// 8 (AVX2) stored values as fp32, and the horizontal sum of 8 lanes.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/linear_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SF_X86 1
#define SF_AVX512 __attribute__((target("avx512f,avx2,fma,popcnt")))
#define SF_AVX512_VBMI \
  __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vbmi2,avx512vnni,avx2,fma,popcnt")))
#define SF_AVX2 __attribute__((target("avx2,fma,popcnt")))
#endif

namespace sparsefast_cpu {

// bf16 is the upper half of an fp32: widening is a 16-bit shift (exact)
inline float bf16_to_f32(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// fp32 -> bf16, round to nearest even (as torch's Tensor.to and c10::BFloat16); NaN stays NaN (quiet).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// A row's sum of value x input times the row's scale: int8 values are q with W[row, :] = scales[row] * q[row, :]
// (symmetric, per output row), so the scale multiplies the fp32 sum once instead of every value.
inline float scaled(const float* scales, int64_t row, float sum) { return scales ? sum * scales[row] : sum; }

// y[t0 + t, row] = sums[r][t] + bias[row] for the rows first_row + r < n (the last tile's padding rows are dropped).
template <int RN, int TB>
inline void store_rows(int64_t n, int64_t first_row, int64_t t0, const float (&sums)[RN][TB], const float* scales,
                       const float* bias, float* y) {
  for (int r = 0; r < RN; ++r) {
    const int64_t row = first_row + r;
    if (row >= n) break;
    const float bv = bias ? bias[row] : 0.f;
    for (int t = 0; t < TB; ++t) y[(t0 + t) * n + row] = scaled(scales, row, sums[r][t]) + bv;
  }
}

#ifdef SF_X86
// Software prefetch into L2 of the cache line `offset` bytes after `base`, issued a fixed distance ahead of the
// stream being read. The hardware prefetcher alone left the weight streams at 15-25 GB/s where a plain read of the
// same buffer runs at 28 (ad-hoc layer walks on a 2-core Xeon); with it the kernels read at the plain-read rate.
// The address is computed as an integer: it may lie past the end of the array (a prefetch never faults).
inline void prefetch_l2(const void* base, int64_t offset) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(base) + offset), _MM_HINT_T1);
}

// store_rows of the horizontal sums of RN x TB 16-lane accumulators (row r, token t).
template <int RN, int TB>
SF_AVX512 inline void store_reduced_rows(const __m512 (&acc)[RN][TB], int64_t n, int64_t first_row, int64_t t0,
                                         const float* scales, const float* bias, float* y) {
  float sums[RN][TB];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) sums[r][t] = _mm512_reduce_add_ps(acc[r][t]);
  store_rows<RN, TB>(n, first_row, t0, sums, scales, bias, y);
}

// values[i .. i+16) of value type VT (fp32, bf16 or int8) as 16 fp32 lanes
template <int VT>
SF_AVX512 inline __m512 load16_512(const void* values, int64_t i) {
  if (VT == kInt8) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + i));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
  }
  if (VT == kBf16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(values) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(static_cast<const float*>(values) + i);
}

// values[i .. i+8) of value type VT (fp32, bf16 or int8) as 8 fp32 lanes
template <int VT>
SF_AVX2 inline __m256 load8_256(const void* values, int64_t i) {
  if (VT == kInt8) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(values) + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  }
  if (VT == kBf16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(values) + i);
}

SF_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace sparsefast_cpu
