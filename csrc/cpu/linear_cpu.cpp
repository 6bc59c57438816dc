// CPU linear kernels (layouts in linear_cpu.h). One code path per instruction set, each compiled with
// a target attribute so one binary carries all of them and picks at run time (the CI CPU may be Intel or AMD, with
// or without AVX-512):
//   2:4, avx512: per 32-column block, x is permuted onto the 16 stored values (vpermt2ps with indices decoded from the
//                2-bit positions by one variable shift and one ternary-logic op) and multiplied by one 16-lane FMA;
//   2:4, avx2:   the same per 16-column half with two vpermps and a blend;
//   unstructured, avx512: per row, a 16-column chunk = one vexpandps of its stored values, one FMA per token;
//   unstructured int8 / bf16, avx512vbmi: one vpexpandb / vpexpandw per 4 / 2 rows of a chunk, then per row one
//                zeroing vpermb / vpermw that widens (int8: + vcvtdq2ps) and one FMA per token;
//   unstructured, avx2:   two 8-column halves, each expanded with a permute table (vpermps) and a lane mask;
//   both layouts are tiled (8 rows), so a call reads each tile's values as one sequential stream;
//   dense, avx512 / avx2: 8 rows of W [N, K] side by side, one 16- (8-) column chunk of each per step, one FMA per row
//                and token; bf16 weights are widened to fp32 by a shift (exact), x stays fp32;
//   scalar: plain loops, for other CPUs and as the readable statement of what the vector paths compute.
// Register blocking: the 8 rows of a tile x 1 or 2 tokens of accumulators; a tile's weights come from memory once per
// call and from L1/L2 for further token pairs. From 8 tokens on, the dense and unstructured AVX-512 paths walk a row
// pair once per 8 tokens instead (2 x 8 accumulators): at M = 8 the FMAs bound a tile, and one walk keeps the weight
// stream running under them (compiled SmolLM2 fp32 batch-8 step 38-40 -> 30 ms, dense). 2:4 keeps token pairs: its
// permuted x (two registers per token) leaves room for one row at 8 tokens, and that measured slower for bf16.
//
// Why 2:4 permutes x instead of expanding W (ad-hoc timings, not a committed result, on the 2-core AMD EPYC (Zen 4)
// this project develops on, one thread, 1536x576 fp32, M = 1): the expand kernel ran at 20 GB/s of packed weight
// with the weight in L2 (vexpandps is slow on Zen 4; the AVX2 permute-table path was faster there), about the DRAM
// rate, so from DRAM it reached only 8.5 GB/s; the permute kernel runs at 60-80 GB/s from L2, and with the tiled
// layout (one sequential stream instead of 4 interleaved row streams) at 20 GB/s from DRAM. The committed per-linear
// results are in bench/results/2026-12-03-cpu-sparse-linear-*.json.
#include "cpu/linear_cpu.h"

#include <cstring>

#include "cpu/simd_cpu.h"

namespace sparsefast_cpu {
namespace {

template <int VT>
constexpr int64_t kBytes = VT == kInt8 ? 1 : VT == kBf16 ? 2 : 4;  // bytes per stored value

template <int VT>
inline float value_at(const void* values, int64_t i) {
  if (VT == kInt8) return static_cast<float>(static_cast<const int8_t*>(values)[i]);
  if (VT == kBf16) return bf16_to_f32(static_cast<const uint16_t*>(values)[i]);
  return static_cast<const float*>(values)[i];
}

// ================================================================ 2:4
constexpr int64_t kTileValues = kTileRows * 16;  // stored values of one tile's 32-column block

template <int VT>
void tiles24_scalar(const Sparse24Weight& w, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                    int64_t t1) {
  const int64_t blocks = w.kp / kBlockCols;
  for (int64_t tile = t0; tile < t1; ++tile) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      const int64_t row = tile * kTileRows + r;
      if (row >= w.n) break;
      for (int64_t t = 0; t < m; ++t) {
        const float* xt = x + t * w.kp;
        float acc[16] = {};  // one partial sum per value lane, summed pairwise: the vector paths' rounding
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t slot = (tile * blocks + b) * kTileRows + r;
          const uint32_t meta = w.meta[slot];
          for (int j = 0; j < 16; ++j) {
            const int64_t col = kBlockCols * b + 4 * (j / 2) + ((meta >> (2 * j)) & 3);
            acc[j] += value_at<VT>(w.values, slot * 16 + j) * xt[col];
          }
        }
        for (int width = 8; width >= 1; width /= 2)
          for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
        y[t * w.n + row] = scaled(w.scales, row, acc[0]) + (bias ? bias[row] : 0.f);
      }
    }
  }
}

#ifdef SF_X86
// ---------------------------------------------------------------- 2:4, AVX-512
// Rows r0..r0+RN-1 of `tile` for tokens t0..t0+TB-1.
template <int RN, int TB, int VT>
SF_AVX512 void tile24_512(const Sparse24Weight& w, int64_t tile, int r0, const float* x, int64_t t0, const float* bias,
                          float* y) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i group_base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i two_bits = _mm512_set1_epi32(3);
  __m512 acc[RN][TB];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t blocks = w.kp / kBlockCols;
  const uint32_t* meta = w.meta + tile * blocks * kTileRows + r0;
  const int64_t v0 = tile * blocks * kTileValues + r0 * 16;
  const float* xb = x + t0 * w.kp;
  const int64_t tile_values = blocks * kTileValues;
  for (int64_t b = 0; b < blocks; ++b) {
    if (b % 2 == 0) prefetch_l2(meta, (blocks + b) * kTileRows * 4);  // a line holds 2 blocks' metas
    __m512 xlo[TB], xhi[TB];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      xlo[t] = _mm512_loadu_ps(xb + t * w.kp + kBlockCols * b);
      xhi[t] = _mm512_loadu_ps(xb + t * w.kp + kBlockCols * b + 16);
    }
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      // lane j = 2g + s: column 4g + i_s of the block, i_s = bits 2j, 2j+1 of the meta word ((A & B) | C = 0xEA)
      const __m512i pos = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(meta[b * kTileRows + r])), shifts);
      const __m512i idx = _mm512_ternarylogic_epi32(pos, two_bits, group_base, 0xEA);
      const int64_t at = v0 + b * kTileValues + r * 16;
      prefetch_l2(w.values, (at + tile_values) * kBytes<VT>);  // the same value of the next tile
      const __m512 v = load16_512<VT>(w.values, at);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t)
        acc[r][t] = _mm512_fmadd_ps(v, _mm512_permutex2var_ps(xlo[t], idx, xhi[t]), acc[r][t]);
    }
  }
  store_reduced_rows<RN, TB>(acc, w.n, tile * kTileRows + r0, t0, w.scales, bias, y);
}

// Token pairs with all 8 rows of the tile in registers (16 accumulators + 4 x registers + the decode constants), then
// a single token. Measured against 4 tokens x 4 rows per pass (re-reading the tile from L1): pairs were faster at
// M = 4 and 8 and equal above.
template <int VT>
SF_AVX512 void tiles24_512(const Sparse24Weight& w, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                           int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    int64_t t = 0;
    for (; t + 2 <= m; t += 2) tile24_512<8, 2, VT>(w, tile, 0, x, t, bias, y);
    if (t < m) tile24_512<8, 1, VT>(w, tile, 0, x, t, bias, y);
  }
}

// ---------------------------------------------------------------- 2:4, AVX2
// A 16-column half h of a block: lanes 0-3 (groups 0, 1) read x columns 0-7 of the half, lanes 4-7 columns 8-15;
// vpermps uses the low 3 index bits, so one index vector (4g' + i, g' = group mod 2) serves both permutes.
template <int RN, int TB, int VT>
SF_AVX2 void tile24_256(const Sparse24Weight& w, int64_t tile, int r0, const float* x, int64_t t0, const float* bias,
                        float* y) {
  const __m256i shifts_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i shifts_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  const __m256i group_base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i two_bits = _mm256_set1_epi32(3);
  __m256 acc[RN][TB];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t blocks = w.kp / kBlockCols;
  const uint32_t* meta = w.meta + tile * blocks * kTileRows + r0;
  const int64_t v0 = tile * blocks * kTileValues + r0 * 16;
  const float* xb = x + t0 * w.kp;
  for (int64_t b = 0; b < blocks; ++b) {
    if (b % 2 == 0) prefetch_l2(meta, (blocks + b) * kTileRows * 4);
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      const __m256i word = _mm256_set1_epi32(static_cast<int>(meta[b * kTileRows + r]));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i pos = _mm256_srlv_epi32(word, h ? shifts_hi : shifts_lo);
        const __m256i idx = _mm256_or_si256(_mm256_and_si256(pos, two_bits), group_base);
        const int64_t at = v0 + b * kTileValues + r * 16 + 8 * h;
        if (h == 0) prefetch_l2(w.values, (at + blocks * kTileValues) * kBytes<VT>);  // the next tile's
        const __m256 v = load8_256<VT>(w.values, at);
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) {
          const float* xh = xb + t * w.kp + kBlockCols * b + 16 * h;
          const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xh), idx);
          const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xh + 8), idx);
          acc[r][t] = _mm256_fmadd_ps(v, _mm256_blend_ps(lo, hi, 0xF0), acc[r][t]);
        }
      }
    }
  }
  float sums[RN][TB];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) sums[r][t] = hsum256(acc[r][t]);
  store_rows<RN, TB>(w.n, tile * kTileRows + r0, t0, sums, w.scales, bias, y);
}

// 16 ymm: 8 rows x 1 token, or 4 rows x 2 tokens, of accumulators beside the decode constants.
template <int VT>
SF_AVX2 void tiles24_256(const Sparse24Weight& w, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                         int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    int64_t t = 0;
    for (; t + 2 <= m; t += 2) {
      tile24_256<4, 2, VT>(w, tile, 0, x, t, bias, y);
      tile24_256<4, 2, VT>(w, tile, 4, x, t, bias, y);
    }
    if (t < m) tile24_256<8, 1, VT>(w, tile, 0, x, t, bias, y);
  }
}
#endif  // SF_X86

// ================================================================ unstructured
template <int VT>
void tiles_u_scalar(const UnstructuredWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                    int64_t t1) {
  const int64_t chunks = w.kp / 16;
  for (int64_t tile = t0; tile < t1; ++tile) {
    const uint16_t* mk = w.masks + tile * chunks * kTileRows;
    for (int64_t t = 0; t < m; ++t) {
      const float* xt = x + t * w.kp;
      float acc[kTileRows][16] = {};  // one partial sum per column lane, summed pairwise: the vector paths' rounding
      int64_t vi = w.tile_offsets[tile];
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t r = 0; r < kTileRows; ++r) {
          for (uint32_t mask = mk[c * kTileRows + r]; mask; mask &= mask - 1, ++vi) {
            const int lane = __builtin_ctz(mask);
            acc[r][lane] += value_at<VT>(w.values, vi) * xt[16 * c + lane];
          }
        }
      }
      for (int64_t r = 0; r < kTileRows; ++r) {
        const int64_t row = tile * kTileRows + r;
        if (row >= w.n) break;
        for (int width = 8; width >= 1; width /= 2)
          for (int j = 0; j < width; ++j) acc[r][j] += acc[r][j + width];
        y[t * w.n + row] = scaled(w.scales, row, acc[r][0]) + (bias ? bias[row] : 0.f);
      }
    }
  }
}

#ifdef SF_X86
// ---------------------------------------------------------------- unstructured, AVX-512
constexpr int64_t kPrefetchValues = 2048;  // how far ahead of the value being read its stream is prefetched
// Rows r0..r0+RN-1 of one tile for tokens t0..t0+TB-1: the tile's values are walked in order with one pointer, the
// other rows' values of each chunk skipped by their masks' popcounts (the 8 masks of a chunk are two 64-bit words).
template <int RN, int TB, int VT>
SF_AVX512 void tile_u_512(const UnstructuredWeight& w, int64_t tile, int r0, const float* x, int64_t t0,
                          const float* bias, float* y) {
  __m512 acc[RN][TB];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t chunks = w.kp / 16;
  const uint16_t* mk = w.masks + tile * chunks * kTileRows;
  int64_t vi = w.tile_offsets[tile];
  const float* xb = x + t0 * w.kp;
  // bits of the rows before r0 (skipped before the row subset) in the chunk's two mask words; after it, the rest
  const unsigned __int128 all = ~static_cast<unsigned __int128>(0);
  const unsigned __int128 before = RN == kTileRows ? 0 : (static_cast<unsigned __int128>(1) << (16 * r0)) - 1;
  const unsigned __int128 after = r0 + RN < kTileRows ? all << (16 * (r0 + RN)) : 0;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512 xv[TB];
    if (c % 4 == 0) prefetch_l2(mk, (c + 64) * kTileRows * 2);  // a line holds 4 chunks' masks
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_loadu_ps(xb + t * w.kp + 16 * c);
    unsigned __int128 words = 0;
    if (RN != kTileRows) {
      std::memcpy(&words, mk + c * kTileRows, sizeof words);
      vi += __builtin_popcountll(static_cast<uint64_t>(words & before)) +
            __builtin_popcountll(static_cast<uint64_t>((words & before) >> 64));
    }
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      const uint32_t mask = mk[c * kTileRows + r0 + r];
      prefetch_l2(w.values, (vi + kPrefetchValues) * kBytes<VT>);
      const __m512 v = _mm512_maskz_expand_ps(static_cast<__mmask16>(mask), load16_512<VT>(w.values, vi));
      vi += __builtin_popcount(mask);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_fmadd_ps(v, xv[t], acc[r][t]);
    }
    if (RN != kTileRows)
      vi += __builtin_popcountll(static_cast<uint64_t>(words & after)) +
            __builtin_popcountll(static_cast<uint64_t>((words & after) >> 64));
  }
  store_reduced_rows<RN, TB>(acc, w.n, tile * kTileRows + r0, t0, w.scales, bias, y);
}

// ---------------------------------------------------------------- unstructured int8 / bf16, AVX-512 VBMI/VBMI2
// The layout read several rows at a time: a chunk's rows have adjacent masks and adjacent values, so one expand from
// memory (vpexpandb / vpexpandw: it reads only the masks' popcount of values) puts 4 int8 rows (2 bf16 rows) of 16
// columns each, zeros included, into one 64-byte register, under those rows' masks taken as one 64-bit (32-bit) word.
// Each row's lanes are then widened by one permute with zeroing (vpermb / vpermw) that moves column i's value to the
// top of dword i: for bf16 that is the fp32 value itself; for int8 it is the int32 q * 2^24, which vcvtdq2ps makes
// exact, and the row's sum is multiplied by 2^-24 at the end: every product and partial sum is the plain kernel's
// times a power of two, so the result bits are the plain kernel's unless a partial sum passes FLT_MAX * 2^-24 (~2e31:
// inf here, finite there) or products fall below FLT_MIN (subnormal there, exact here) — fp32's edges, not activations.
// Per row and chunk: one permute (+ one vcvtdq2ps for int8) and one FMA, plus a fraction of an expand, against the
// plain path's widening + vexpandps + FMA. On a 2-core AMD EPYC (Zen 4), SmolLM2's 4 linear shapes at 50%, M = 1,
// from DRAM, same output bits: int8 1.31-1.39x, bf16 1.20-1.54x the avx512 path; int8 still 1.2-1.7x the 2:4 int8
// kernel's time at the same bytes (bench/results/2026-12-08-cpu-unstructured-vbmi-kernel-ab.txt).
constexpr float kQ24Inverse = 1.0f / 16777216.0f;  // 2^-24

template <int VT>
constexpr int kRowsPerExpand = VT == kInt8 ? 4 : 2;  // rows of 16 values in 64 bytes

// Permute indices that move row j's column i (of the expanded register) to the top of dword i (the permutes zero
// the other bytes / words).
struct WidenIndices {
  alignas(64) uint8_t int8[4][64];
  alignas(64) uint16_t bf16[2][32];
  WidenIndices() {
    for (int j = 0; j < 4; ++j)
      for (int b = 0; b < 64; ++b) int8[j][b] = static_cast<uint8_t>(16 * j + b / 4);
    for (int j = 0; j < 2; ++j)
      for (int h = 0; h < 32; ++h) bf16[j][h] = static_cast<uint16_t>(16 * j + h / 2);
  }
};
const WidenIndices kWiden;

template <int VT, int TB>
SF_AVX512_VBMI void tile_u_512vbmi(const UnstructuredWeight& w, int64_t tile, const float* x, int64_t t0,
                                   const float* bias, float* y) {
  constexpr int R = kRowsPerExpand<VT>;
  __m512 acc[kTileRows][TB];
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  __m512i widen[R];
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j)
    widen[j] = _mm512_load_si512(VT == kInt8 ? static_cast<const void*>(kWiden.int8[j]) : kWiden.bf16[j]);
  const int64_t chunks = w.kp / 16;
  const uint16_t* mk = w.masks + tile * chunks * kTileRows;
  int64_t vi = w.tile_offsets[tile];
  const float* xb = x + t0 * w.kp;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512 xv[TB];
    if (c % 4 == 0) prefetch_l2(mk, (c + 64) * kTileRows * 2);  // a line holds 4 chunks' masks
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_loadu_ps(xb + t * w.kp + 16 * c);
#pragma GCC unroll 4
    for (int g = 0; g < kTileRows / R; ++g) {
      prefetch_l2(w.values, (vi + kPrefetchValues) * kBytes<VT>);
      __m512i rows;
      if constexpr (VT == kInt8) {
        uint64_t mask;
        std::memcpy(&mask, mk + c * kTileRows + R * g, sizeof mask);
        rows = _mm512_maskz_expandloadu_epi8(mask, static_cast<const int8_t*>(w.values) + vi);
        vi += __builtin_popcountll(mask);
      } else {
        uint32_t mask;
        std::memcpy(&mask, mk + c * kTileRows + R * g, sizeof mask);
        rows = _mm512_maskz_expandloadu_epi16(mask, static_cast<const uint16_t*>(w.values) + vi);
        vi += __builtin_popcount(mask);
      }
#pragma GCC unroll 4
      for (int j = 0; j < R; ++j) {
        __m512 v;
        if constexpr (VT == kInt8)
          v = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(0x8888888888888888ull, widen[j], rows));
        else
          v = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, widen[j], rows));
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) acc[R * g + j][t] = _mm512_fmadd_ps(v, xv[t], acc[R * g + j][t]);
      }
    }
  }
  float sums[kTileRows][TB];
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t)
      sums[r][t] = _mm512_reduce_add_ps(acc[r][t]) * (VT == kInt8 ? kQ24Inverse : 1.0f);
  store_rows<kTileRows, TB>(w.n, tile * kTileRows, t0, sums, w.scales, bias, y);
}

// Every tile of [t0, t1) at AVX-512: from 8 tokens on, each row pair once per 8 tokens (as the dense kernel); token
// pairs and a single token all 8 rows at once, with the several-row expand where kVbmi. No target attribute: it only
// calls the tile functions (one call per tile and token block), so the avx512 instantiation never meets VBMI code.
template <int VT, bool kVbmi>
void tiles_u_512(const UnstructuredWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                 int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    int64_t t = 0;
    for (; t + 8 <= m; t += 8)
      for (int r = 0; r < kTileRows; r += 2) tile_u_512<2, 8, VT>(w, tile, r, x, t, bias, y);
    for (; t + 2 <= m; t += 2) {
      if constexpr (kVbmi)
        tile_u_512vbmi<VT, 2>(w, tile, x, t, bias, y);
      else
        tile_u_512<kTileRows, 2, VT>(w, tile, 0, x, t, bias, y);
    }
    if (t < m) {
      if constexpr (kVbmi)
        tile_u_512vbmi<VT, 1>(w, tile, x, t, bias, y);
      else
        tile_u_512<kTileRows, 1, VT>(w, tile, 0, x, t, bias, y);
    }
  }
}

// ---------------------------------------------------------------- unstructured, AVX2
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

template <int VT>
SF_AVX2 inline __m256 load_half256(const void* values, int64_t vi, uint32_t m8) {
  const __m256 v = load8_256<VT>(values, vi);
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPerm.idx[m8]));
  const __m256i bits = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m8)),
                                        _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128));
  const __m256i unset = _mm256_cmpeq_epi32(bits, _mm256_setzero_si256());
  return _mm256_andnot_ps(_mm256_castsi256_ps(unset), _mm256_permutevar8x32_ps(v, idx));
}

// One token of one tile: 8 accumulators (16 ymm leave no room for a second token's), x as FMA memory operands.
template <int VT>
SF_AVX2 void tile_u_256(const UnstructuredWeight& w, int64_t tile, const float* x, int64_t t0, const float* bias,
                        float* y) {
  __m256 acc[kTileRows];
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r) acc[r] = _mm256_setzero_ps();
  const int64_t chunks = w.kp / 16;
  const uint16_t* mk = w.masks + tile * chunks * kTileRows;
  int64_t vi = w.tile_offsets[tile];
  const float* xt = x + t0 * w.kp;
  for (int64_t c = 0; c < chunks; ++c) {
    if (c % 4 == 0) prefetch_l2(mk, (c + 64) * kTileRows * 2);
#pragma GCC unroll 8
    for (int r = 0; r < kTileRows; ++r) {
      const uint32_t mask = mk[c * kTileRows + r];
      const uint32_t lo = mask & 0xFF, hi = mask >> 8;
      prefetch_l2(w.values, (vi + kPrefetchValues) * kBytes<VT>);
      const __m256 v0 = load_half256<VT>(w.values, vi, lo);
      vi += __builtin_popcount(lo);
      const __m256 v1 = load_half256<VT>(w.values, vi, hi);
      vi += __builtin_popcount(hi);
      acc[r] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(xt + 16 * c), acc[r]);
      acc[r] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(xt + 16 * c + 8), acc[r]);
    }
  }
  float sums[kTileRows][1];
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r) sums[r][0] = hsum256(acc[r]);
  store_rows<kTileRows, 1>(w.n, tile * kTileRows, t0, sums, w.scales, bias, y);
}

template <int VT>
SF_AVX2 void tiles_u_256(const UnstructuredWeight& w, const float* x, int64_t m, const float* bias, float* y,
                         int64_t t0, int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile)
    for (int64_t t = 0; t < m; ++t) tile_u_256<VT>(w, tile, x, t, bias, y);
}
#endif  // SF_X86

// ================================================================ dense
// Row `row`'s columns [16c, 16c + 16) as fp32, the columns beyond k zero (the last chunk of a row whose k % 16 != 0).
template <int VT>
inline void dense_chunk_padded(const DenseWeight& w, int64_t row, int64_t c, float (&out)[16]) {
  for (int j = 0; j < 16; ++j) {
    const int64_t col = 16 * c + j;
    out[j] = col < w.k ? value_at<VT>(w.values, row * w.ld + col) : 0.f;
  }
}

template <int VT>
void tiles_dense_scalar(const DenseWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                        int64_t t1) {
  const int64_t chunks = w.kp / 16;
  for (int64_t tile = t0; tile < t1; ++tile) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      const int64_t row = tile * kTileRows + r;
      if (row >= w.n) break;
      for (int64_t t = 0; t < m; ++t) {
        const float* xt = x + t * w.kp;
        float acc[16] = {};  // one partial sum per column lane, summed pairwise: the vector paths' rounding
        for (int64_t c = 0; c < chunks; ++c) {
          float v[16];
          dense_chunk_padded<VT>(w, row, c, v);
          for (int j = 0; j < 16; ++j) acc[j] += v[j] * xt[16 * c + j];
        }
        for (int width = 8; width >= 1; width /= 2)
          for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
        y[t * w.n + row] = scaled(w.scales, row, acc[0]) + (bias ? bias[row] : 0.f);
      }
    }
  }
}

#ifdef SF_X86
// ---------------------------------------------------------------- dense, AVX-512
// Rows row0..row0+RN-1 (all < n) for tokens t0..t0+TB-1.
template <int RN, int TB, int VT>
SF_AVX512 void rows_dense_512(const DenseWeight& w, int64_t row0, const float* x, int64_t t0, const float* bias,
                              float* y) {
  __m512 acc[RN][TB];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t full = w.k / 16;
  const float* xb = x + t0 * w.kp;
  for (int64_t c = 0; c < full; ++c) {
    __m512 xv[TB];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) xv[t] = _mm512_loadu_ps(xb + t * w.kp + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      const int64_t at = (row0 + r) * w.ld + 16 * c;
      prefetch_l2(w.values, (at + kTileRows * w.ld) * kBytes<VT>);  // the same column of the next tile
      const __m512 v = load16_512<VT>(w.values, at);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_fmadd_ps(v, xv[t], acc[r][t]);
    }
  }
  if (full * 16 < w.k) {
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      float tail[16];
      dense_chunk_padded<VT>(w, row0 + r, full, tail);
      const __m512 v = _mm512_loadu_ps(tail);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t)
        acc[r][t] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xb + t * w.kp + 16 * full), acc[r][t]);
    }
  }
  store_reduced_rows<RN, TB>(acc, w.n, row0, t0, w.scales, bias, y);
}

// Whole tiles: 8 tokens at a time over row pairs (16 accumulators), then 8 rows x token pairs, then a single token;
// the last, shorter tile row by row (its rows beyond n are not W's). With 8 tokens the FMAs (not the weight bytes)
// bound a tile; walking it once per 8 tokens keeps the weight stream running under them, where 8 rows x 2 tokens
// read the tile from memory in the first pass and from cache in three more, with the stream idle meanwhile.
template <int VT>
SF_AVX512 void tiles_dense_512(const DenseWeight& w, const float* x, int64_t m, const float* bias, float* y,
                               int64_t t0, int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t row0 = tile * kTileRows;
    if (row0 + kTileRows <= w.n) {
      int64_t t = 0;
      for (; t + 8 <= m; t += 8)
#pragma GCC unroll 4
        for (int r = 0; r < kTileRows; r += 2) rows_dense_512<2, 8, VT>(w, row0 + r, x, t, bias, y);
      for (; t + 2 <= m; t += 2) rows_dense_512<8, 2, VT>(w, row0, x, t, bias, y);
      if (t < m) rows_dense_512<8, 1, VT>(w, row0, x, t, bias, y);
    } else {
      for (int64_t row = row0; row < w.n; ++row)
        for (int64_t t = 0; t < m; ++t) rows_dense_512<1, 1, VT>(w, row, x, t, bias, y);
    }
  }
}

// ---------------------------------------------------------------- dense, AVX2
// Rows row0..row0+RN-1 (all < n) for tokens t0..t0+TB-1; a 16-column chunk as two 8-lane halves into one
// accumulator per row and token (the scalar path's 16 lanes folded to 8 by the final sum).
template <int RN, int TB, int VT>
SF_AVX2 void rows_dense_256(const DenseWeight& w, int64_t row0, const float* x, int64_t t0, const float* bias,
                            float* y) {
  __m256 acc[RN][TB];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t full = w.k / 16;
  const float* xb = x + t0 * w.kp;
  for (int64_t c = 0; c < full; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int64_t at = (row0 + r) * w.ld + 16 * c + 8 * h;
        if (h == 0) prefetch_l2(w.values, (at + kTileRows * w.ld) * kBytes<VT>);
        const __m256 v = load8_256<VT>(w.values, at);
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t)
          acc[r][t] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xb + t * w.kp + 16 * c + 8 * h), acc[r][t]);
      }
    }
  }
  if (full * 16 < w.k) {
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      float tail[16];
      dense_chunk_padded<VT>(w, row0 + r, full, tail);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t)
          acc[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(tail + 8 * h),
                                      _mm256_loadu_ps(xb + t * w.kp + 16 * full + 8 * h), acc[r][t]);
    }
  }
  float sums[RN][TB];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) sums[r][t] = hsum256(acc[r][t]);
  store_rows<RN, TB>(w.n, row0, t0, sums, w.scales, bias, y);
}

// 16 ymm: 8 rows x 1 token, or 4 rows x 2 tokens, of accumulators beside the loaded values.
template <int VT>
SF_AVX2 void tiles_dense_256(const DenseWeight& w, const float* x, int64_t m, const float* bias, float* y,
                             int64_t t0, int64_t t1) {
  for (int64_t tile = t0; tile < t1; ++tile) {
    const int64_t row0 = tile * kTileRows;
    if (row0 + kTileRows <= w.n) {
      int64_t t = 0;
      for (; t + 2 <= m; t += 2) {
        rows_dense_256<4, 2, VT>(w, row0, x, t, bias, y);
        rows_dense_256<4, 2, VT>(w, row0 + 4, x, t, bias, y);
      }
      if (t < m) rows_dense_256<8, 1, VT>(w, row0, x, t, bias, y);
    } else {
      for (int64_t row = row0; row < w.n; ++row)
        for (int64_t t = 0; t < m; ++t) rows_dense_256<1, 1, VT>(w, row, x, t, bias, y);
    }
  }
}
#endif  // SF_X86

template <int VT>
void run_tiles24(const Sparse24Weight& w, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                 int64_t t1, int isa) {
#ifdef SF_X86
  if (isa >= kAvx512) return tiles24_512<VT>(w, x, m, bias, y, t0, t1);
  if (isa == kAvx2) return tiles24_256<VT>(w, x, m, bias, y, t0, t1);
#endif
  tiles24_scalar<VT>(w, x, m, bias, y, t0, t1);
}

template <int VT>
void run_tiles_u(const UnstructuredWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                 int64_t t1, int isa) {
#ifdef SF_X86
  if constexpr (VT != kFloat32) {
    if (isa == kAvx512Vbmi) return tiles_u_512<VT, true>(w, x, m, bias, y, t0, t1);
  }
  if (isa >= kAvx512) return tiles_u_512<VT, false>(w, x, m, bias, y, t0, t1);
  if (isa == kAvx2) return tiles_u_256<VT>(w, x, m, bias, y, t0, t1);
#endif
  tiles_u_scalar<VT>(w, x, m, bias, y, t0, t1);
}

template <int VT>
void run_tiles_dense(const DenseWeight& w, const float* x, int64_t m, const float* bias, float* y, int64_t t0,
                     int64_t t1, int isa) {
#ifdef SF_X86
  if (isa >= kAvx512) return tiles_dense_512<VT>(w, x, m, bias, y, t0, t1);
  if (isa == kAvx2) return tiles_dense_256<VT>(w, x, m, bias, y, t0, t1);
#endif
  tiles_dense_scalar<VT>(w, x, m, bias, y, t0, t1);
}

}  // namespace

int best_isa() {
#ifdef SF_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
      __builtin_cpu_supports("avx512vnni"))
    return kAvx512Vbmi;
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

bool isa_supported(int isa) { return isa >= kScalar && isa <= best_isa(); }

void sparse24_linear_tiles(const Sparse24Weight& w, const float* x, int64_t m, const float* bias, float* y,
                           int64_t tile_begin, int64_t tile_end, int isa) {
  if (isa == kAuto) isa = best_isa();
  if (w.vtype == kBf16) return run_tiles24<kBf16>(w, x, m, bias, y, tile_begin, tile_end, isa);
  if (w.vtype == kInt8) return run_tiles24<kInt8>(w, x, m, bias, y, tile_begin, tile_end, isa);
  run_tiles24<kFloat32>(w, x, m, bias, y, tile_begin, tile_end, isa);
}

void unstructured_linear_tiles(const UnstructuredWeight& w, const float* x, int64_t m, const float* bias, float* y,
                               int64_t tile_begin, int64_t tile_end, int isa) {
  if (isa == kAuto) isa = best_isa();
  if (w.vtype == kBf16) return run_tiles_u<kBf16>(w, x, m, bias, y, tile_begin, tile_end, isa);
  if (w.vtype == kInt8) return run_tiles_u<kInt8>(w, x, m, bias, y, tile_begin, tile_end, isa);
  run_tiles_u<kFloat32>(w, x, m, bias, y, tile_begin, tile_end, isa);
}

void dense_linear_tiles(const DenseWeight& w, const float* x, int64_t m, const float* bias, float* y,
                        int64_t tile_begin, int64_t tile_end, int isa) {
  if (isa == kAuto) isa = best_isa();
  if (w.vtype == kBf16) return run_tiles_dense<kBf16>(w, x, m, bias, y, tile_begin, tile_end, isa);
  if (w.vtype == kInt8) return run_tiles_dense<kInt8>(w, x, m, bias, y, tile_begin, tile_end, isa);
  run_tiles_dense<kFloat32>(w, x, m, bias, y, tile_begin, tile_end, isa);
}

}  // namespace sparsefast_cpu
