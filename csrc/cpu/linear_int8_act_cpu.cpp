// Linear kernels for int8 weights with int8 activations (linear_cpu.h, "int8 activations": per token and 32-column
// block scales): the dense, 2:4 and unstructured layouts of linear_cpu.cpp read as they are, multiplied by AVX-512 VNNI
// (vpdpbusd: 64 unsigned x signed byte products summed in fours into 16 int32 lanes) instead of widened to fp32. A
// register of 64 weight bytes holds 4 rows x 16 values (2:4: one 32-column block's stored values; unstructured: one
// 16-column chunk, expanded with its zeros), so int32 lane i sums row i / 4; dense: 64 columns of one row (two blocks,
// lanes 0-7 and 8-15).
//   2:4:          the 16 kept positions of each row become byte indices (4g + i_s) with one vpmultishiftqb of the
//                 rows' meta words, and one vpermb per 4 rows gathers the block's 32 input bytes onto the values;
//   unstructured: one vpexpandb from memory per 4 rows (zeros where the masks are 0), the chunk's 16 input bytes
//                 broadcast to the 4 rows; a block is two chunks;
//   dense:        64 columns of a row against 64 input bytes.
// The input is q_x + 128 (vpdpbusd needs one unsigned operand); the 128 * sum(q_w) this adds to a block's sums is
// taken back with one more vpdpbusd of the weights against a register of 128s, shared by the tokens of the pass.
// Each block's int32 sums are converted once and multiplied into fp32 accumulators by the token's block scale.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu/linear_cpu.h"
#include "cpu/simd_cpu.h"

namespace sparsefast_cpu {
namespace {

constexpr float kInt8Max = 127.f;

#ifdef SF_X86
// y for the 8 rows of a tile from 2 registers of 4 rows per token (lane i of acc[g][t] belongs to row 4g + i / 4).
template <int TB>
SF_AVX512_VBMI void store_tile_rows(const __m512 (&acc)[2][TB], int64_t n, int64_t row0, int64_t t0, const float* ws,
                                    const float* bias, float* y) {
  float sums[kTileRows][TB];
  for (int t = 0; t < TB; ++t) {
    for (int g = 0; g < 2; ++g) {
      alignas(64) float lanes[16];
      _mm512_store_ps(lanes, acc[g][t]);
      for (int r = 0; r < 4; ++r)
        sums[4 * g + r][t] = (lanes[4 * r] + lanes[4 * r + 1]) + (lanes[4 * r + 2] + lanes[4 * r + 3]);
    }
  }
  store_rows<kTileRows, TB>(n, row0, t0, sums, ws, bias, y);
}

// acc += (float) (dots - offset) * scale: one block's int32 sums into the fp32 accumulator.
SF_AVX512_VBMI inline __m512 add_block(__m512 acc, __m512i dots, __m512i offset, __m512 scale) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dots, offset)), scale, acc);
}

// Byte b of a 4-row register of 2:4 values is value j = b % 16 of row b / 16: its input column within the block is
// 4 (j / 2) + i_j, i_j = bits 2j, 2j + 1 of the row's meta word. vpmultishiftqb takes, for each byte, 8 bits at a
// byte-chosen offset of the same qword: qword k holds row k / 2's meta word, the offset is 2j.
struct Meta24Bytes {
  alignas(64) uint8_t shift[64];
  alignas(64) uint8_t base[64];
  Meta24Bytes() {
    for (int b = 0; b < 64; ++b) {
      shift[b] = static_cast<uint8_t>(2 * (b % 16));
      base[b] = static_cast<uint8_t>(4 * ((b % 16) / 2));
    }
  }
};
const Meta24Bytes kMeta24;

// Tokens t0..t0+TB-1 of one 2:4 tile: 2 registers of 4 rows each per 32-column block (= one activation block).
template <int TB>
SF_AVX512_VBMI void tile24_int8_act(const Sparse24Weight& w, int64_t tile, const uint8_t* q, const float* xs,
                                    int64_t kq, int64_t t0, const float* bias, float* y) {
  const __m512i shift = _mm512_load_si512(kMeta24.shift), base = _mm512_load_si512(kMeta24.base);
  const __m512i row_of_qword = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i two_bits = _mm512_set1_epi8(3), ones128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[2][TB];
#pragma GCC unroll 2
  for (int g = 0; g < 2; ++g)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[g][t] = _mm512_setzero_ps();
  const int64_t blocks = w.kp / kBlockCols, nb = kq / kActBlock;
  const uint32_t* meta = w.meta + tile * blocks * kTileRows;
  const int8_t* values = static_cast<const int8_t*>(w.values) + tile * blocks * kTileRows * 16;
  const uint8_t* qb = q + t0 * kq;
  const float* sb = xs + t0 * nb;
  for (int64_t b = 0; b < blocks; ++b) {
    if (b % 2 == 0) prefetch_l2(meta, (blocks + b) * kTileRows * 4);
    __m512i xv[TB];
    __m512 scale[TB];
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      xv[t] = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qb + t * kq + 32 * b)));
      scale[t] = _mm512_set1_ps(sb[t * nb + b]);
    }
#pragma GCC unroll 2
    for (int g = 0; g < 2; ++g) {
      const __m128i four_words = _mm_loadu_si128(reinterpret_cast<const __m128i*>(meta + 8 * b + 4 * g));
      const __m512i words = _mm512_permutexvar_epi32(row_of_qword, _mm512_castsi128_si512(four_words));
      const __m512i idx = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shift, words), two_bits, base, 0xEA);
      const int8_t* at = values + 128 * b + 64 * g;
      prefetch_l2(at, blocks * kTileRows * 16);  // the same block of the next tile
      const __m512i wv = _mm512_loadu_si512(at);
      const __m512i offset = _mm512_dpbusd_epi32(zero, ones128, wv);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t)
        acc[g][t] = add_block(acc[g][t], _mm512_dpbusd_epi32(zero, _mm512_permutexvar_epi8(idx, xv[t]), wv), offset,
                              scale[t]);
    }
  }
  store_tile_rows<TB>(acc, w.n, tile * kTileRows, t0, w.scales, bias, y);
}

// Tokens t0..t0+TB-1 of one unstructured tile: per 16-column chunk, 2 expands of 4 rows each; a block's two chunks
// summed in int32 before its scale.
template <int TB>
SF_AVX512_VBMI void tile_u_int8_act(const UnstructuredWeight& w, int64_t tile, const uint8_t* q, const float* xs,
                                    int64_t kq, int64_t t0, const float* bias, float* y) {
  constexpr int64_t kPrefetchBytes = 2048;
  const __m512i ones128 = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[2][TB];
#pragma GCC unroll 2
  for (int g = 0; g < 2; ++g)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[g][t] = _mm512_setzero_ps();
  const int64_t chunks = w.kp / 16, nb = kq / kActBlock;
  const uint16_t* mk = w.masks + tile * chunks * kTileRows;
  const int8_t* values = static_cast<const int8_t*>(w.values);
  int64_t vi = w.tile_offsets[tile];
  const uint8_t* qb = q + t0 * kq;
  const float* sb = xs + t0 * nb;
  for (int64_t c0 = 0; c0 < chunks; c0 += 2) {
    __m512i dots[2][TB], offset[2];
#pragma GCC unroll 2
    for (int g = 0; g < 2; ++g) {
      offset[g] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t) dots[g][t] = _mm512_setzero_si512();
    }
    for (int64_t c = c0; c < std::min(c0 + 2, chunks); ++c) {
      if (c % 4 == 0) prefetch_l2(mk, (c + 64) * kTileRows * 2);  // a line holds 4 chunks' masks
      __m512i xv[TB];
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t)
        xv[t] = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + t * kq + 16 * c)));
#pragma GCC unroll 2
      for (int g = 0; g < 2; ++g) {
        uint64_t mask;
        std::memcpy(&mask, mk + c * kTileRows + 4 * g, sizeof mask);
        prefetch_l2(values, vi + kPrefetchBytes);
        const __m512i wv = _mm512_maskz_expandloadu_epi8(mask, values + vi);
        vi += __builtin_popcountll(mask);
        offset[g] = _mm512_dpbusd_epi32(offset[g], ones128, wv);
#pragma GCC unroll 8
        for (int t = 0; t < TB; ++t) dots[g][t] = _mm512_dpbusd_epi32(dots[g][t], xv[t], wv);
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      const __m512 scale = _mm512_set1_ps(sb[t * nb + c0 / 2]);
#pragma GCC unroll 2
      for (int g = 0; g < 2; ++g) acc[g][t] = add_block(acc[g][t], dots[g][t], offset[g], scale);
    }
  }
  store_tile_rows<TB>(acc, w.n, tile * kTileRows, t0, w.scales, bias, y);
}

// Rows row0..row0+RN-1 (all < n) of a dense int8 weight for tokens t0..t0+TB-1, 64 columns (two blocks) per step, the
// last step's weight load masked to k (the bytes beyond are the next row's: their products with the input's padding
// would cancel against the offset, but the last row's would be read past the tensor).
template <int RN, int TB>
SF_AVX512_VBMI void rows_dense_int8_act(const DenseWeight& w, int64_t row0, const uint8_t* q, const float* xs,
                                        int64_t kq, int64_t t0, const float* bias, float* y) {
  const __m512i ones128 = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  __m512 acc[RN][TB];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  const int8_t* values = static_cast<const int8_t*>(w.values);
  const int64_t nb = kq / kActBlock;
  const uint8_t* qb = q + t0 * kq;
  const float* sb = xs + t0 * nb;
  for (int64_t c = 0; c < w.k; c += 64) {
    const __mmask64 cols = w.k - c >= 64 ? ~static_cast<__mmask64>(0) : (static_cast<__mmask64>(1) << (w.k - c)) - 1;
    __m512i xv[TB];
    __m512 scale[TB];  // lanes 0-7: block c / 32, lanes 8-15: the next
#pragma GCC unroll 8
    for (int t = 0; t < TB; ++t) {
      xv[t] = _mm512_loadu_si512(qb + t * kq + c);
      const float* s = sb + t * nb + c / kActBlock;
      scale[t] = _mm512_shuffle_f32x4(_mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]), 0x44);
    }
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      const int8_t* at = values + (row0 + r) * w.ld + c;
      prefetch_l2(at, kTileRows * w.ld);  // the same columns of the next tile
      const __m512i wv = _mm512_maskz_loadu_epi8(cols, at);
      const __m512i offset = _mm512_dpbusd_epi32(zero, ones128, wv);
#pragma GCC unroll 8
      for (int t = 0; t < TB; ++t)
        acc[r][t] = add_block(acc[r][t], _mm512_dpbusd_epi32(zero, xv[t], wv), offset, scale[t]);
    }
  }
  store_reduced_rows<RN, TB>(acc, w.n, row0, t0, w.scales, bias, y);
}
// quantize_input_int8 (linear_cpu.h) 16 columns at a time: the same division, round half to even (vcvtps2dq in the
// default rounding mode, as nearbyint) and clamp as the rule, so the bytes equal sparsefast.ops.int8_rows'.
SF_AVX512_VBMI void quantize_input_int8_512(const float* x, int64_t m, int64_t k, int64_t ldx, int64_t kq, uint8_t* q,
                                            float* xs) {
  const int64_t nb = kq / kActBlock;
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), bias128 = _mm512_set1_epi32(128);
  for (int64_t t = 0; t < m; ++t) {
    const float* xt = x + t * ldx;
    uint8_t* qt = q + t * kq;
    for (int64_t b = 0; b < nb; ++b) {
      __m512 v[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t c = b * kActBlock + 16 * h;
        const __mmask16 cols = c >= k ? 0 : k - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (k - c)) - 1);
        v[h] = _mm512_maskz_loadu_ps(cols, xt + c);  // columns beyond k are 0: q = 0, stored as 128
      }
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
      const float scale = amax > 0.f ? amax / kInt8Max : 1.f;
      xs[t * nb + b] = scale;
      const __m512 sv = _mm512_set1_ps(scale);
      for (int h = 0; h < 2; ++h) {
        const __m512i qi = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_div_ps(v[h], sv)), lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qt + b * kActBlock + 16 * h),
                         _mm512_cvtepi32_epi8(_mm512_add_epi32(qi, bias128)));
      }
    }
  }
}
#endif  // SF_X86

}  // namespace

void quantize_input_int8(const float* x, int64_t m, int64_t k, int64_t ldx, int64_t kq, uint8_t* q, float* xs) {
#ifdef SF_X86
  quantize_input_int8_512(x, m, k, ldx, kq, q, xs);
#else
  (void)x, (void)m, (void)k, (void)ldx, (void)kq, (void)q, (void)xs;
#endif
}

namespace {
// tile(block, tile index, first token) for every tile of [tile_begin, tile_end): tokens 4 at a time, then a pair, then
// a single token (block: std::integral_constant of the token count), every tile's 8 rows in registers.
template <typename Tile>
void token_blocks(int64_t m, int64_t tile_begin, int64_t tile_end, Tile tile) {
  for (int64_t i = tile_begin; i < tile_end; ++i) {
    int64_t t = 0;
    for (; t + 4 <= m; t += 4) tile(std::integral_constant<int, 4>{}, i, t);
    for (; t + 2 <= m; t += 2) tile(std::integral_constant<int, 2>{}, i, t);
    if (t < m) tile(std::integral_constant<int, 1>{}, i, t);
  }
}
}  // namespace

void sparse24_linear_tiles_int8_act(const Sparse24Weight& w, const uint8_t* q, const float* xs, int64_t kq, int64_t m,
                                    const float* bias, float* y, int64_t tile_begin, int64_t tile_end) {
#ifdef SF_X86
  token_blocks(m, tile_begin, tile_end, [&](auto tb, int64_t tile, int64_t t) {
    tile24_int8_act<decltype(tb)::value>(w, tile, q, xs, kq, t, bias, y);
  });
#endif
}

void unstructured_linear_tiles_int8_act(const UnstructuredWeight& w, const uint8_t* q, const float* xs, int64_t kq,
                                        int64_t m, const float* bias, float* y, int64_t tile_begin, int64_t tile_end) {
#ifdef SF_X86
  token_blocks(m, tile_begin, tile_end, [&](auto tb, int64_t tile, int64_t t) {
    tile_u_int8_act<decltype(tb)::value>(w, tile, q, xs, kq, t, bias, y);
  });
#endif
}

void dense_linear_tiles_int8_act(const DenseWeight& w, const uint8_t* q, const float* xs, int64_t kq, int64_t m,
                                 const float* bias, float* y, int64_t tile_begin, int64_t tile_end) {
#ifdef SF_X86
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t row0 = tile * kTileRows;
    if (row0 + kTileRows <= w.n) {
      int64_t t = 0;
      for (; t + 2 <= m; t += 2) {
        rows_dense_int8_act<4, 2>(w, row0, q, xs, kq, t, bias, y);
        rows_dense_int8_act<4, 2>(w, row0 + 4, q, xs, kq, t, bias, y);
      }
      if (t < m) rows_dense_int8_act<8, 1>(w, row0, q, xs, kq, t, bias, y);
    } else {
      for (int64_t row = row0; row < w.n; ++row)
        for (int64_t t = 0; t < m; ++t) rows_dense_int8_act<1, 1>(w, row, q, xs, kq, t, bias, y);
    }
  }
#endif
}

}  // namespace sparsefast_cpu
