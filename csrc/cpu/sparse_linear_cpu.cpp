// CPU sparse linear kernels (layouts in sparse_linear_cpu.h). One code path per instruction set, each compiled with
// a target attribute so one binary carries all of them and picks at run time (the CI CPU may be Intel or AMD, with
// or without AVX-512):
//   avx512: a 16-column chunk = one vexpandps of the chunk's stored values into a zmm, then one FMA per token;
//   avx2:   two 8-column halves, each expanded with a permute table (vpermps) and a lane mask;
//   scalar: bit loops, for other CPUs and as the readable statement of what the vector paths compute.
// Register blocking: R output rows x TB tokens of accumulators. Each expanded weight register is used by TB tokens,
// each x register by R rows, so a weight byte comes from memory once per call whatever M is.
#include "cpu/sparse_linear_cpu.h"

#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SF_X86 1
#define SF_AVX512 __attribute__((target("avx512f,avx2,fma,popcnt")))
#define SF_AVX2 __attribute__((target("avx2,fma,popcnt")))
#endif

namespace sparsefast_cpu {
namespace {

// The 16-bit dense mask of chunk c (two little-endian bytes of the row's mask).
inline uint32_t chunk_mask(const uint8_t* mk, int64_t c) {
  return mk[2 * c] | (static_cast<uint32_t>(mk[2 * c + 1]) << 8);
}

// Software prefetch distance along a row's value stream. R rows in flight are R interleaved streams (plus their
// masks), more than the hardware prefetchers keep ahead of on the CPUs measured (the dense matrix is one stream).
constexpr int kPrefetchBytes = 1024;

template <bool BF16>
inline void prefetch_values(const void* values, int64_t vi) {
  __builtin_prefetch(static_cast<const char*>(values) + vi * (BF16 ? 2 : 4) + kPrefetchBytes);
}

inline int64_t row_start(const SparseWeight& w, int64_t row) {
  return w.is24 ? row * (w.kp / 2) : w.row_offsets[row];
}

inline float bf16_to_f32(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <bool BF16, bool IS24>
void rows_scalar(const SparseWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t r0,
                 int64_t r1) {
  const int64_t chunks = w.kp / 16;
  for (int64_t row = r0; row < r1; ++row) {
    const uint8_t* mk = w.masks + row * (w.kp / 8);
    for (int64_t t = 0; t < m; ++t) {
      const float* xt = x + t * w.kp;
      int64_t vi = row_start(w, row);
      float acc[16] = {};  // one partial sum per column lane, summed pairwise: the vector paths' rounding
      for (int64_t c = 0; c < chunks; ++c) {
        for (uint32_t mask = chunk_mask(mk, c); mask; mask &= mask - 1, ++vi) {
          const float v = BF16 ? bf16_to_f32(static_cast<const uint16_t*>(w.values)[vi])
                               : static_cast<const float*>(w.values)[vi];
          const int lane = __builtin_ctz(mask);
          acc[lane] += v * xt[16 * c + lane];
        }
      }
      for (int width = 8; width >= 1; width /= 2)
        for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
      y[t * w.n + row] = acc[0] + (bias ? bias[row] : 0.f);
    }
  }
}

#ifdef SF_X86
// ---------------------------------------------------------------- AVX-512
template <bool BF16, bool IS24>
SF_AVX512 inline __m512 load_chunk512(const void* values, int64_t vi, uint32_t mask) {
  __m512 v;
  if (BF16) {
    const uint16_t* p = static_cast<const uint16_t*>(values) + vi;
    // 2:4 reads exactly its 8 values (the last row ends there); upper lanes are never selected by the expand.
    const __m256i h = IS24 ? _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    const float* p = static_cast<const float*>(values) + vi;
    v = IS24 ? _mm512_castps256_ps512(_mm256_loadu_ps(p)) : _mm512_loadu_ps(p);
  }
  return _mm512_maskz_expand_ps(static_cast<__mmask16>(mask), v);
}

template <int R, int TB, bool BF16, bool IS24>
SF_AVX512 void block512(const SparseWeight& w, int64_t row, const float* x, int64_t t0, const float* bias, float* y) {
  __m512 acc[R][TB];
  const uint8_t* mk[R];
  int64_t vi[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    mk[r] = w.masks + (row + r) * (w.kp / 8);
    vi[r] = row_start(w, row + r);
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  }
  const float* xb = x + t0 * w.kp;
  const int64_t chunks = w.kp / 16;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512 xv[TB];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_loadu_ps(xb + t * w.kp + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint32_t mask = chunk_mask(mk[r], c);
      prefetch_values<BF16>(w.values, vi[r]);
      const __m512 v = load_chunk512<BF16, IS24>(w.values, vi[r], mask);
      vi[r] += IS24 ? 8 : __builtin_popcount(mask);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_fmadd_ps(v, xv[t], acc[r][t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[row + r] : 0.f;
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) y[(t0 + t) * w.n + row + r] = _mm512_reduce_add_ps(acc[r][t]) + b;
  }
}

// All tokens of rows row..row+R-1: blocks of 8 tokens where the 32 zmm registers hold R x 8 accumulators.
template <int R, bool BF16, bool IS24>
SF_AVX512 void tokens512(const SparseWeight& w, int64_t row, const float* x, int64_t m, const float* bias, float* y) {
  int64_t t0 = 0;
  if constexpr (R <= 2) {
    for (; t0 + 8 <= m; t0 += 8) block512<R, 8, BF16, IS24>(w, row, x, t0, bias, y);
  }
  for (; t0 + 4 <= m; t0 += 4) block512<R, 4, BF16, IS24>(w, row, x, t0, bias, y);
  if (m - t0 >= 2) {
    block512<R, 2, BF16, IS24>(w, row, x, t0, bias, y);
    t0 += 2;
  }
  if (m - t0 >= 1) block512<R, 1, BF16, IS24>(w, row, x, t0, bias, y);
}

template <bool BF16, bool IS24>
SF_AVX512 void rows512(const SparseWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t r0,
                       int64_t r1) {
  int64_t row = r0;
  if (m >= 4) {
    for (; row + 2 <= r1; row += 2) tokens512<2, BF16, IS24>(w, row, x, m, bias, y);
  } else {  // few tokens: more rows in flight keep the FMA pipes and the memory streams busy
    for (; row + 4 <= r1; row += 4) tokens512<4, BF16, IS24>(w, row, x, m, bias, y);
  }
  for (; row < r1; ++row) tokens512<1, BF16, IS24>(w, row, x, m, bias, y);
}

// ---------------------------------------------------------------- AVX2
struct PermLut {  // 8-bit mask -> vpermps indices that move stored value k to the k-th set lane
  alignas(32) int32_t idx[256][8];
  PermLut() {
    for (int mask = 0; mask < 256; ++mask) {
      int k = 0;
      for (int j = 0; j < 8; ++j) idx[mask][j] = (mask >> j) & 1 ? k++ : 0;
    }
  }
};
const PermLut kPerm;

template <bool BF16, bool IS24>
SF_AVX2 inline __m256 load_half256(const void* values, int64_t vi, uint32_t m8) {
  __m256 v;
  if (BF16) {
    const uint16_t* p = static_cast<const uint16_t*>(values) + vi;
    const __m128i h = IS24 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))
                           : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    const float* p = static_cast<const float*>(values) + vi;
    v = IS24 ? _mm256_castps128_ps256(_mm_loadu_ps(p)) : _mm256_loadu_ps(p);
  }
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[m8]));
  const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m8)),
                                        _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128));
  const __m256i unset = _mm256_cmpeq_epi32(bits, _mm256_setzero_si256());
  return _mm256_andnot_ps(_mm256_castsi256_ps(unset), _mm256_permutevar8x32_ps(v, idx));
}

SF_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int TB, bool BF16, bool IS24>
SF_AVX2 void block256(const SparseWeight& w, int64_t row, const float* x, int64_t t0, const float* bias, float* y) {
  __m256 acc[R][TB];
  const uint8_t* mk[R];
  int64_t vi[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    mk[r] = w.masks + (row + r) * (w.kp / 8);
    vi[r] = row_start(w, row + r);
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  }
  const float* xb = x + t0 * w.kp;
  const int64_t chunks = w.kp / 16;
  for (int64_t c = 0; c < chunks; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint32_t mask = chunk_mask(mk[r], c);
      const uint32_t lo = mask & 0xFF, hi = mask >> 8;
      prefetch_values<BF16>(w.values, vi[r]);
      const __m256 v0 = load_half256<BF16, IS24>(w.values, vi[r], lo);
      vi[r] += IS24 ? 4 : __builtin_popcount(lo);
      const __m256 v1 = load_half256<BF16, IS24>(w.values, vi[r], hi);
      vi[r] += IS24 ? 4 : __builtin_popcount(hi);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) {
        const float* xt = xb + t * w.kp + 16 * c;
        acc[r][t] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xt), acc[r][t]);
        acc[r][t] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xt + 8), acc[r][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[row + r] : 0.f;
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) y[(t0 + t) * w.n + row + r] = hsum256(acc[r][t]) + b;
  }
}

// 16 ymm registers: R x TB <= 8 accumulators, x comes in as FMA memory operands.
template <int R, bool BF16, bool IS24>
SF_AVX2 void tokens256(const SparseWeight& w, int64_t row, const float* x, int64_t m, const float* bias, float* y) {
  int64_t t0 = 0;
  if constexpr (R <= 2) {
    for (; t0 + 4 <= m; t0 += 4) block256<R, 4, BF16, IS24>(w, row, x, t0, bias, y);
  }
  for (; t0 + 2 <= m; t0 += 2) block256<R, 2, BF16, IS24>(w, row, x, t0, bias, y);
  if (m - t0 >= 1) block256<R, 1, BF16, IS24>(w, row, x, t0, bias, y);
}

template <bool BF16, bool IS24>
SF_AVX2 void rows256(const SparseWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t r0,
                     int64_t r1) {
  int64_t row = r0;
  if (m >= 4) {
    for (; row + 2 <= r1; row += 2) tokens256<2, BF16, IS24>(w, row, x, m, bias, y);
  } else {
    for (; row + 4 <= r1; row += 4) tokens256<4, BF16, IS24>(w, row, x, m, bias, y);
  }
  for (; row < r1; ++row) tokens256<1, BF16, IS24>(w, row, x, m, bias, y);
}
#endif  // SF_X86

template <bool BF16, bool IS24>
void run_rows(const SparseWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t r0, int64_t r1,
              int isa) {
#ifdef SF_X86
  if (isa == kAvx512) return rows512<BF16, IS24>(w, x, m, bias, y, r0, r1);
  if (isa == kAvx2) return rows256<BF16, IS24>(w, x, m, bias, y, r0, r1);
#endif
  rows_scalar<BF16, IS24>(w, x, m, bias, y, r0, r1);
}

}  // namespace

int best_isa() {
#ifdef SF_X86
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

bool isa_supported(int isa) { return isa >= kScalar && isa <= best_isa(); }

void sparse_linear_rows(const SparseWeight& w, const float* x, int64_t m, const float* bias, float* y,
                        int64_t row_begin, int64_t row_end, int isa) {
  if (isa == kAuto) isa = best_isa();
  if (w.bf16) {
    if (w.is24) return run_rows<true, true>(w, x, m, bias, y, row_begin, row_end, isa);
    return run_rows<true, false>(w, x, m, bias, y, row_begin, row_end, isa);
  }
  if (w.is24) return run_rows<false, true>(w, x, m, bias, y, row_begin, row_end, isa);
  run_rows<false, false>(w, x, m, bias, y, row_begin, row_end, isa);
}

}  // namespace sparsefast_cpu
