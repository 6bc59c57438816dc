// CPU sparse linear kernels, torch-free: y[M, N] = x[M, Kp] · Wᵀ (+ bias) for a compactly stored sparse W [N, Kp].
//
// Both layouts describe W in chunks of 16 dense columns (Kp = in_features rounded up to 16; the caller zero-pads x
// to Kp columns). A chunk has a 16-bit "dense mask" (bit j: column 16c + j is stored) and its stored values lie
// consecutively, in ascending column order, in the row's value stream. The kernels expand each chunk's values into
// a 16-lane register (AVX-512 vexpandps / an AVX2 permute table) and multiply it with the dense x chunk of every
// token, so each weight byte is read from memory once per call and reused across all M tokens.
//
// 2:4 layout (is24 = true; documented bit by bit in sparsefast/ops/sparse24_cpu.py):
//   values [N, Kp/2] fp32|bf16, row-major; compressed column 2g + s = W[n, 4g + i_s] with i_0 < i_1.
//   masks  [N, Kp/8] uint8 "meta": bit j of byte b = 1 iff column 8b + j is one of the 2 kept positions of its
//          group, i.e. exactly 2 bits per nibble (4 bits per group, as many as two 2-bit positions).
//   row_offsets unused (row n starts at value n·Kp/2, 8 values per chunk).
// Unstructured layout (is24 = false; sparsefast/ops/sparse_unstructured.py):
//   masks  [N, Kp/8] uint8 bitmask: bit j of byte b = 1 iff W[n, 8b + j] != 0.
//   values flat, fp32|bf16: the nonzeros of row 0, row 1, ... in column order, then 16 zero elements of padding
//          (the vector loads read up to 16 elements past a chunk's start).
//   row_offsets [N + 1] int64: row n's values are values[row_offsets[n] .. row_offsets[n+1]).
#pragma once

#include <cstdint>

namespace sparsefast_cpu {

// Instruction sets, best last. kAuto picks the best the running CPU supports (__builtin_cpu_supports).
enum Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };

struct SparseWeight {
  const void* values;          // fp32 or bf16 (bf16 = the upper 16 bits of an fp32)
  bool bf16;                   // dtype of values
  const uint8_t* masks;        // [N, Kp/8]: 2:4 meta bytes or unstructured bitmask bytes
  const int64_t* row_offsets;  // unstructured only: [N + 1]
  bool is24;
  int64_t n;                   // out_features
  int64_t kp;                  // in_features rounded up to 16
};

// The best instruction set this CPU supports.
int best_isa();
// Whether `isa` (kScalar, kAvx2, kAvx512) can run on this CPU and was compiled in.
bool isa_supported(int isa);

// y[t, row] = sum_k x[t, k] W[row, k] (+ bias[row]) for rows [row_begin, row_end) and every token t < m.
// x: [m, kp] fp32 row-major (zero-padded beyond in_features); y: [m, w.n] fp32 row-major; bias: [w.n] or nullptr.
// Rows are independent: callers run disjoint row ranges on different threads.
void sparse_linear_rows(const SparseWeight& w, const float* x, int64_t m, const float* bias, float* y,
                        int64_t row_begin, int64_t row_end, int isa);

}  // namespace sparsefast_cpu
