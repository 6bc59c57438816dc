// One launch gathers the kept rows / columns of every coupled matrix of a layer (see structured_gather.h).
// grid = (row blocks, matrices): blockIdx.y picks the descriptor, blocks stride over dst rows, threads over
// columns, so a row copy is coalesced on both sides for axis 0 and coalesced on the write side for axis 1
// (kept column indices are sorted, so reads stay mostly within the same cache lines).
#include <algorithm>

#include "common/check.h"
#include "slice/structured_gather.h"

namespace sparsefast {
namespace {

struct GatherBatch {
  GatherDesc d[kGatherMaxMatrices];
};

template <typename T>
__device__ __forceinline__ void gather_matrix(const GatherDesc& g) {
  const T* __restrict__ src = static_cast<const T*>(g.src);
  T* __restrict__ dst = static_cast<T*>(g.dst);
  for (int64_t r = blockIdx.x; r < g.rows; r += gridDim.x) {
    const int64_t sr = g.axis == 0 ? g.idx[r] : r;
    const T* srow = src + sr * g.src_cols;
    T* drow = dst + r * g.cols;
    if (g.axis == 0) {
      for (int64_t c = threadIdx.x; c < g.cols; c += blockDim.x) drow[c] = srow[c];
    } else {
      for (int64_t c = threadIdx.x; c < g.cols; c += blockDim.x) drow[c] = srow[g.idx[c]];
    }
  }
}

__global__ void __launch_bounds__(kGatherThreads) structured_gather_kernel(const __grid_constant__ GatherBatch batch) {
  const GatherDesc& g = batch.d[blockIdx.y];
  switch (g.elem_bytes) {
    case 1: gather_matrix<uint8_t>(g); break;
    case 2: gather_matrix<uint16_t>(g); break;
    case 4: gather_matrix<uint32_t>(g); break;
    case 8: gather_matrix<uint2>(g); break;
    case 16: gather_matrix<uint4>(g); break;
    default: break;  // rejected by the launcher
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t structured_gather(const GatherDesc* descs, int n, cudaStream_t stream) {
  for (int start = 0; start < n; start += kGatherMaxMatrices) {
    GatherBatch batch;
    const int count = std::min(kGatherMaxMatrices, n - start);
    int64_t max_rows = 1;
    for (int i = 0; i < count; ++i) {
      GatherDesc g = descs[start + i];
      if (g.elem_bytes != 1 && g.elem_bytes != 2 && g.elem_bytes != 4 && g.elem_bytes != 8) {
        return cudaErrorInvalidValue;
      }
      // whole-row copies as 16-byte vectors when sizes and addresses allow
      const int64_t row_bytes = g.cols * g.elem_bytes, src_row_bytes = g.src_cols * g.elem_bytes;
      if (g.axis == 0 && row_bytes % 16 == 0 && src_row_bytes % 16 == 0 && aligned16(g.src) && aligned16(g.dst)) {
        g.cols = row_bytes / 16;
        g.src_cols = src_row_bytes / 16;
        g.elem_bytes = 16;
      }
      batch.d[i] = g;
      max_rows = std::max(max_rows, g.rows);
    }
    const dim3 grid(static_cast<unsigned>(std::min<int64_t>(max_rows, kGatherMaxRowBlocks)), count);
    structured_gather_kernel<<<grid, kGatherThreads, 0, stream>>>(batch);
    SF_CUDA_RETURN_LAUNCH_ERROR();
  }
  return cudaSuccess;
}

}  // namespace sparsefast
