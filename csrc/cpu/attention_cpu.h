// Decode attention on the CPU, torch-free: one new query token per sequence attends to the keys and values its
// sequence has in a static KV cache, read in place (no gathered copy of the cache rows, no mask tensor).
//
//   out[b, h, :] = sum_{l <= positions[b]} softmax_l(scale * q[b, h, :] . K[slots[b], h / group, l, :]) V[slots[b], h / group, l, :]
//
// with group = heads / kv_heads (grouped-query attention: query head h reads KV head h / group, as HF's repeat_kv and
// SDPA's enable_gqa). Scores, softmax and the weighted sum are fp32 whatever the storage type (fp32 or bf16); the
// softmax subtracts the row maximum first.
#pragma once

#include <cstdint>

namespace sparsefast_cpu {

constexpr int64_t kMaxHeadDim = 512;  // the largest head_dim the kernel takes

struct DecodeAttentionArgs {
  const void* q;            // [batch, heads, head_dim] contiguous, of the cache's value type
  const void* keys;         // cache [rows, kv_heads, max_len, head_dim] (element strides below)
  const void* values;       // same shape and strides as keys
  int vtype;                // ValueType of q, keys, values and out: kFloat32 or kBf16
  const int64_t* slots;     // [batch] cache row of each sequence
  const int64_t* positions; // [batch] position of the new token: keys 0..positions[b] are read
  int64_t heads, kv_heads, head_dim;
  int64_t row_stride, head_stride, pos_stride;  // element strides of the cache (the last dimension is unit stride)
  float scale;
  void* out;                // [batch, heads, head_dim] contiguous, of vtype
  int64_t head_split = 1;   // parts each KV head's group of query heads is split into (1 .. heads / kv_heads)
};

// Tasks: task = (b * kv_heads + g) * head_split + p is sequence b's query heads g * group + [p * group / head_split,
// (p + 1) * group / head_split), group = heads / kv_heads: the heads of one KV head, which share its key and value
// rows (head_split > 1 makes more, smaller tasks where sequences x KV heads are too few for the threads).
inline int64_t heads_per_task(const DecodeAttentionArgs& a) {  // the most query heads one task holds
  return (a.heads / a.kv_heads + a.head_split - 1) / a.head_split;
}

// Floats of scratch one thread needs for tasks of sequences whose positions are below `longest`.
int64_t decode_attention_scratch(const DecodeAttentionArgs& a, int64_t longest, int isa);

// out for the tasks [task_begin, task_end) (batch * kv_heads * head_split in all); `scratch`: the calling thread's,
// decode_attention_scratch floats. isa: kAuto, kScalar, kAvx2 (AVX2 + FMA, one head at a time; head_dim % 8 == 0)
// or kAvx512 / kAvx512Vbmi (a task's heads together, each key and value row read once; head_dim % 16 == 0, else the
// AVX2 path).
// Other head sizes run the scalar path.
void decode_attention_tasks(const DecodeAttentionArgs& a, int64_t task_begin, int64_t task_end, float* scratch,
                            int isa);

}  // namespace sparsefast_cpu
