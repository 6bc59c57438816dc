// Decode attention kernel (contract in attention_cpu.h). One task = one sequence, one KV head and a range of the
// query heads that read it (attention_cpu.h: the head split). On AVX-512 with head_dim % 16 == 0 the task reads each
// key and value row once for all its query heads: per key, the heads' 16-lane partial dot products go to a 16 x 16
// block, and every 16 keys a transposing reduction turns the block into 16 scores (15 shuffle-blend-add steps where a
// horizontal sum per key and head took 5-6 each); the softmax's exponentials are vectorised; the weighted sum of the
// values runs over the key rows once, into one accumulator row per head (bf16 rows are widened as they are read: a
// widened copy in scratch was slower). The AVX2 and scalar paths run the task's heads one at a time (each reads the
// rows again, from cache). All arithmetic is fp32. SmolLM2's shapes, 8 sequences: fp32 1.46x at ~160 positions, 1.18x
// at ~1000, bf16 1.2x (bench/results/2026-12-07-cpu-decode-attention-gqa-ab.txt).
//
// Why a kernel of our own: in a batch-1 decode step of a small model, torch's SDPA ran over a gathered copy of the
// cache rows with a mask, a few hundred KB at most, and made the key count a dynamic dimension of the compiled graph.
// This kernel reads the cache rows in place: 11-12 us per layer call, the SmolLM2 step 1.05-1.12x faster than with
// SDPA (2-core Xeon; bench/results/2026-12-07-cpu-decode-step-profile.txt, -decode-attention-ab.json).
#include "cpu/attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/linear_cpu.h"
#include "cpu/simd_cpu.h"

namespace sparsefast_cpu {
namespace {

inline float load_scalar(const void* p, int vtype, int64_t i) {
  return vtype == kBf16 ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// out[bh] = acc * inv in the output type (bh = b * heads + h: sequence b's query head h)
inline void store_row(const DecodeAttentionArgs& a, int64_t bh, const float* acc, float inv) {
  const int64_t d = a.head_dim;
  if (a.vtype == kBf16) {
    uint16_t* out = static_cast<uint16_t*>(a.out) + bh * d;
    for (int64_t i = 0; i < d; ++i) out[i] = f32_to_bf16(acc[i] * inv);
  } else {
    float* out = static_cast<float*>(a.out) + bh * d;
    for (int64_t i = 0; i < d; ++i) out[i] = acc[i] * inv;
  }
}

// scores[0..len) -> exp(scores - max), returns their sum
inline float softmax_numerators(float* scores, int64_t len) {
  float mx = scores[0];
  for (int64_t l = 1; l < len; ++l) mx = std::max(mx, scores[l]);
  float sum = 0.f;
  for (int64_t l = 0; l < len; ++l) {
    scores[l] = std::exp(scores[l] - mx);
    sum += scores[l];
  }
  return sum;
}

void head_scalar(const DecodeAttentionArgs& a, int64_t bh, float* scores) {
  const int64_t b = bh / a.heads, h = bh % a.heads, d = a.head_dim;
  const int64_t g = h / (a.heads / a.kv_heads), len = a.positions[b] + 1;
  const int64_t base = a.slots[b] * a.row_stride + g * a.head_stride;
  float q[kMaxHeadDim], acc[kMaxHeadDim];
  for (int64_t i = 0; i < d; ++i) q[i] = load_scalar(a.q, a.vtype, bh * d + i);
  for (int64_t l = 0; l < len; ++l) {
    float dot = 0.f;
    for (int64_t i = 0; i < d; ++i) dot += q[i] * load_scalar(a.keys, a.vtype, base + l * a.pos_stride + i);
    scores[l] = dot * a.scale;
  }
  const float sum = softmax_numerators(scores, len);
  std::fill(acc, acc + d, 0.f);
  for (int64_t l = 0; l < len; ++l)
    for (int64_t i = 0; i < d; ++i) acc[i] += scores[l] * load_scalar(a.values, a.vtype, base + l * a.pos_stride + i);
  store_row(a, bh, acc, 1.f / sum);
}

#ifdef SF_X86
// head_dim % 8 == 0
template <int VT>
SF_AVX2 void head_avx2(const DecodeAttentionArgs& a, int64_t bh, float* scores) {
  const int64_t b = bh / a.heads, h = bh % a.heads, d = a.head_dim;
  const int64_t g = h / (a.heads / a.kv_heads), len = a.positions[b] + 1;
  const int64_t base = a.slots[b] * a.row_stride + g * a.head_stride;
  alignas(32) float q[kMaxHeadDim], acc[kMaxHeadDim];
  for (int64_t i = 0; i < d; i += 8) _mm256_store_ps(q + i, load8_256<VT>(a.q, bh * d + i));
  for (int64_t l = 0; l < len; ++l) {
    const int64_t row = base + l * a.pos_stride;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
      s0 = _mm256_fmadd_ps(_mm256_load_ps(q + i), load8_256<VT>(a.keys, row + i), s0);
      s1 = _mm256_fmadd_ps(_mm256_load_ps(q + i + 8), load8_256<VT>(a.keys, row + i + 8), s1);
    }
    if (i < d) s0 = _mm256_fmadd_ps(_mm256_load_ps(q + i), load8_256<VT>(a.keys, row + i), s0);
    scores[l] = hsum256(_mm256_add_ps(s0, s1)) * a.scale;
  }
  const float sum = softmax_numerators(scores, len);
  for (int64_t i = 0; i < d; i += 8) _mm256_store_ps(acc + i, _mm256_setzero_ps());
  for (int64_t l = 0; l < len; ++l) {
    const int64_t row = base + l * a.pos_stride;
    const __m256 p = _mm256_set1_ps(scores[l]);
    for (int64_t i = 0; i < d; i += 8)
      _mm256_store_ps(acc + i, _mm256_fmadd_ps(p, load8_256<VT>(a.values, row + i), _mm256_load_ps(acc + i)));
  }
  store_row(a, bh, acc, 1.f / sum);
}

// 16 partial-sum vectors (part[j * 16 .. j * 16 + 16) = key j's 16 lanes) -> one vector whose lane j is the sum of
// key j's lanes. Each level adds pairs of vectors after swapping lane groups of 1, 2, 4 and 8 lanes, and blends so
// that lane j of the result always belongs to key j's partial sums.
SF_AVX512 inline __m512 combine(__m512 a, __m512 b, __m512 a_swapped, __m512 b_swapped, __mmask16 upper) {
  return _mm512_add_ps(_mm512_mask_blend_ps(upper, a, b), _mm512_mask_blend_ps(upper, a_swapped, b_swapped));
}

SF_AVX512 inline __m512 reduce16(const float* part) {
  __m512 v[16];
  for (int j = 0; j < 16; ++j) v[j] = _mm512_loadu_ps(part + 16 * j);
  for (int j = 0; j < 8; ++j)  // lanes 2i, 2i+1 swapped
    v[j] = combine(v[2 * j], v[2 * j + 1], _mm512_permute_ps(v[2 * j], 0xB1), _mm512_permute_ps(v[2 * j + 1], 0xB1),
                   0xAAAA);
  for (int j = 0; j < 4; ++j)  // lane pairs swapped
    v[j] = combine(v[2 * j], v[2 * j + 1], _mm512_permute_ps(v[2 * j], 0x4E), _mm512_permute_ps(v[2 * j + 1], 0x4E),
                   0xCCCC);
  for (int j = 0; j < 2; ++j)  // 128-bit quarters swapped
    v[j] = combine(v[2 * j], v[2 * j + 1], _mm512_shuffle_f32x4(v[2 * j], v[2 * j], 0xB1),
                   _mm512_shuffle_f32x4(v[2 * j + 1], v[2 * j + 1], 0xB1), 0xF0F0);
  return combine(v[0], v[1], _mm512_shuffle_f32x4(v[0], v[0], 0x4E), _mm512_shuffle_f32x4(v[1], v[1], 0x4E), 0xFF00);
}

// exp(x) for x <= 0 (softmax numerators: scores minus their maximum), 16 lanes: x = n ln2 + f with |f| <= ln2 / 2,
// e^f by its Taylor polynomial of degree 7 (truncation error < 1e-8 relative), times 2^n (scalef). x is clamped at
// -87 (e^-87 ~ 1.6e-38, just above the smallest normal float): no denormal results, whose arithmetic is slow, and a
// key that far below the maximum weighs nothing next to the maximum's 1 either way. NaN stays NaN (vmaxps returns its
// second operand when one is NaN), as in the other paths.
SF_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 split in two: exact n * hi
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// query heads [h0, h0 + nh) of sequence b, all reading KV head g; head_dim % 16 == 0; decode_attention_scratch floats
// of scratch
template <int VT>
SF_AVX512 void group_avx512(const DecodeAttentionArgs& a, int64_t b, int64_t g, int64_t h0, int64_t nh,
                            float* scratch) {
  const int64_t d = a.head_dim, len = a.positions[b] + 1, padded = (len + 15) / 16 * 16;
  const int64_t base = a.slots[b] * a.row_stride + g * a.head_stride;
  float* scores = scratch;              // [nh][padded]
  float* part = scores + nh * padded;   // [nh][16 keys][16 lanes]
  float* q = part + nh * 256;           // [nh][d], times the scale
  float* acc = q + nh * d;              // [nh][d]
  float* inv = acc + nh * d;            // [nh]: 1 / each head's sum of softmax numerators
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t i = 0; i < d; i += 16)
      _mm512_storeu_ps(q + h * d + i, _mm512_mul_ps(load16_512<VT>(a.q, (b * a.heads + h0 + h) * d + i), scale));
  // scores: per key (its row read once), each head's products summed to 16 lanes; per 16 keys, one reduction per head
  for (int64_t l0 = 0; l0 < len; l0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - l0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t k = base + (l0 + j) * a.pos_stride;  // the key row (widened per use: bf16 -> fp32 is a shift)
      for (int64_t h = 0; h < nh; ++h) {
        const float* qh = q + h * d;
        __m512 s0 = _mm512_mul_ps(_mm512_loadu_ps(qh), load16_512<VT>(a.keys, k)), s1 = _mm512_setzero_ps();
        int64_t i = 16;
        for (; i + 32 <= d; i += 32) {
          s1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), load16_512<VT>(a.keys, k + i), s1);
          s0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i + 16), load16_512<VT>(a.keys, k + i + 16), s0);
        }
        if (i < d) s1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), load16_512<VT>(a.keys, k + i), s1);
        _mm512_storeu_ps(part + h * 256 + 16 * j, _mm512_add_ps(s0, s1));
      }
    }
    for (int64_t h = 0; h < nh; ++h) {
      for (int64_t j = n; j < 16; ++j) _mm512_storeu_ps(part + h * 256 + 16 * j, _mm512_setzero_ps());
      _mm512_storeu_ps(scores + h * padded + l0, reduce16(part + h * 256));
    }
  }
  // softmax numerators per head (the padding lanes past len: -inf for the maximum, 0 after exp); 1 / their sum later
  for (int64_t h = 0; h < nh; ++h) {
    float* s = scores + h * padded;
    for (int64_t l = len; l < padded; ++l) s[l] = -INFINITY;
    __m512 mx = _mm512_loadu_ps(s);
    for (int64_t l = 16; l < padded; l += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + l));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < padded; l += 16) {
      const __mmask16 keys = len - l >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (len - l)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(keys, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + l), m)));
      _mm512_storeu_ps(s + l, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv[h] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // values: each row read once, added into every head's accumulator with that head's weight
  for (int64_t i = 0; i < nh * d; i += 16) _mm512_storeu_ps(acc + i, _mm512_setzero_ps());
  for (int64_t l = 0; l < len; ++l) {
    const int64_t v = base + l * a.pos_stride;
    for (int64_t h = 0; h < nh; ++h) {
      const __m512 p = _mm512_set1_ps(scores[h * padded + l]);
      float* ah = acc + h * d;
      for (int64_t i = 0; i < d; i += 16)
        _mm512_storeu_ps(ah + i, _mm512_fmadd_ps(p, load16_512<VT>(a.values, v + i), _mm512_loadu_ps(ah + i)));
    }
  }
  for (int64_t h = 0; h < nh; ++h) store_row(a, b * a.heads + h0 + h, acc + h * d, inv[h]);
}
#endif

// query heads [first, last) of the group of task `task` (attention_cpu.h's split)
inline void task_heads(const DecodeAttentionArgs& a, int64_t task, int64_t* b, int64_t* g, int64_t* first,
                       int64_t* last) {
  const int64_t group = a.heads / a.kv_heads, part = task % a.head_split, bg = task / a.head_split;
  *b = bg / a.kv_heads;
  *g = bg % a.kv_heads;
  *first = *g * group + part * group / a.head_split;
  *last = *g * group + (part + 1) * group / a.head_split;
}

bool group_path(const DecodeAttentionArgs& a, int isa) {
#ifdef SF_X86
  return isa >= kAvx512 && a.head_dim % 16 == 0;
#else
  (void)a;
  (void)isa;
  return false;
#endif
}

}  // namespace

int64_t decode_attention_scratch(const DecodeAttentionArgs& a, int64_t longest, int isa) {
  if (isa == kAuto) isa = best_isa();
  if (!group_path(a, isa)) return longest;
  return heads_per_task(a) * ((longest + 15) / 16 * 16 + 256 + 2 * a.head_dim + 1);
}

void decode_attention_tasks(const DecodeAttentionArgs& a, int64_t task_begin, int64_t task_end, float* scratch,
                            int isa) {
  if (isa == kAuto) isa = best_isa();
  for (int64_t t = task_begin; t < task_end; ++t) {
    int64_t b, g, first, last;
    task_heads(a, t, &b, &g, &first, &last);
#ifdef SF_X86
    if (group_path(a, isa)) {
      if (a.vtype == kBf16)
        group_avx512<kBf16>(a, b, g, first, last - first, scratch);
      else
        group_avx512<kFloat32>(a, b, g, first, last - first, scratch);
      continue;
    }
    if (isa >= kAvx2 && a.head_dim % 8 == 0) {
      for (int64_t h = first; h < last; ++h) {
        if (a.vtype == kBf16)
          head_avx2<kBf16>(a, b * a.heads + h, scratch);
        else
          head_avx2<kFloat32>(a, b * a.heads + h, scratch);
      }
      continue;
    }
#endif
    for (int64_t h = first; h < last; ++h) head_scalar(a, b * a.heads + h, scratch);
  }
}

}  // namespace sparsefast_cpu
