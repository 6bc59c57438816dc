// Decode attention kernel (contract in attention_cpu.h). One task = one (sequence, query head): its scores over the
// sequence's keys, the softmax, and the probability-weighted sum of its values, all in fp32.
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

inline void store_row(const DecodeAttentionArgs& a, int64_t task, const float* acc, float inv) {
  const int64_t d = a.head_dim;
  if (a.vtype == kBf16) {
    uint16_t* out = static_cast<uint16_t*>(a.out) + task * d;
    for (int64_t i = 0; i < d; ++i) out[i] = f32_to_bf16(acc[i] * inv);
  } else {
    float* out = static_cast<float*>(a.out) + task * d;
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

void task_scalar(const DecodeAttentionArgs& a, int64_t task, float* scores) {
  const int64_t b = task / a.heads, h = task % a.heads, d = a.head_dim;
  const int64_t g = h / (a.heads / a.kv_heads), len = a.positions[b] + 1;
  const int64_t base = a.slots[b] * a.row_stride + g * a.head_stride;
  float q[kMaxHeadDim], acc[kMaxHeadDim];
  for (int64_t i = 0; i < d; ++i) q[i] = load_scalar(a.q, a.vtype, task * d + i);
  for (int64_t l = 0; l < len; ++l) {
    float dot = 0.f;
    for (int64_t i = 0; i < d; ++i) dot += q[i] * load_scalar(a.keys, a.vtype, base + l * a.pos_stride + i);
    scores[l] = dot * a.scale;
  }
  const float sum = softmax_numerators(scores, len);
  std::fill(acc, acc + d, 0.f);
  for (int64_t l = 0; l < len; ++l)
    for (int64_t i = 0; i < d; ++i) acc[i] += scores[l] * load_scalar(a.values, a.vtype, base + l * a.pos_stride + i);
  store_row(a, task, acc, 1.f / sum);
}

#ifdef SF_X86
// head_dim % 8 == 0
template <int VT>
SF_AVX2 void task_avx2(const DecodeAttentionArgs& a, int64_t task, float* scores) {
  const int64_t b = task / a.heads, h = task % a.heads, d = a.head_dim;
  const int64_t g = h / (a.heads / a.kv_heads), len = a.positions[b] + 1;
  const int64_t base = a.slots[b] * a.row_stride + g * a.head_stride;
  alignas(32) float q[kMaxHeadDim], acc[kMaxHeadDim];
  for (int64_t i = 0; i < d; i += 8) _mm256_store_ps(q + i, load8_256<VT>(a.q, task * d + i));
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
  store_row(a, task, acc, 1.f / sum);
}
#endif

}  // namespace

void decode_attention_tasks(const DecodeAttentionArgs& a, int64_t task_begin, int64_t task_end, float* scores,
                            int isa) {
  if (isa == kAuto) isa = best_isa();
#ifdef SF_X86
  if (isa >= kAvx2 && a.head_dim % 8 == 0) {
    for (int64_t t = task_begin; t < task_end; ++t) {
      if (a.vtype == kBf16)
        task_avx2<kBf16>(a, t, scores);
      else
        task_avx2<kFloat32>(a, t, scores);
    }
    return;
  }
#endif
  for (int64_t t = task_begin; t < task_end; ++t) task_scalar(a, t, scores);
}

}  // namespace sparsefast_cpu
