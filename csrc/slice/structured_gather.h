// Structured slice gather: copy the kept rows (axis 0) or kept columns (axis 1) of many row-major matrices in one
// launch -- all coupled weights of one decoder layer after LLM-Pruner-style structural pruning.
// Torch-free: raw device pointers + a stream; the launcher returns cudaError_t (launch error included).
//
// Per matrix d (a 1-D bias/norm vector is a 1 x n matrix gathered along axis 1):
//   axis 0:  dst[r, c] = src[idx[r], c]   r < rows (kept rows), c < cols (= src cols)
//   axis 1:  dst[r, c] = src[r, idx[c]]   r < rows (= src rows), c < cols (kept cols)
// src has src_cols columns (row stride), dst is dense [rows, cols]. idx is int64 on the device, each value in
// range (the binding checks). Elements are copied as raw bytes (elem_bytes 1, 2, 4, 8), so any dtype works;
// rows whose byte size is a multiple of 16 on 16-byte aligned buffers are copied as 16-byte vectors.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace sparsefast {

constexpr int kGatherMaxMatrices = 48;  // descriptors per launch, passed by value (48 * 56 B < 4 KiB param space)
constexpr int kGatherThreads = 256;
constexpr int kGatherMaxRowBlocks = 4096;

struct GatherDesc {
  const void* src;
  void* dst;
  const int64_t* idx;
  int64_t rows;      // rows of dst
  int64_t cols;      // columns of dst (in elements of elem_bytes)
  int64_t src_cols;  // columns of src
  int32_t axis;      // 0: gather rows, 1: gather columns
  int32_t elem_bytes;
};

// Gather n descriptors (host array) on `stream`; splits into launches of kGatherMaxMatrices.
cudaError_t structured_gather(const GatherDesc* descs, int n, cudaStream_t stream);

}  // namespace sparsefast
