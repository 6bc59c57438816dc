// Diagnostic probe: one warp, one packed 16x64 block, exactly the decode kernel's inner step (sp24_block_mma).
// The GPU tests feed it crafted blocks (one kept value at a time, identity-like activations) to tell a wrong
// metadata selector / nibble order / fragment order apart from tiling bugs in the full kernels.
#include "common/check.h"
#include "sparse24/sparse24.h"
#include "sparse24/sparse24_tile.cuh"

namespace sparsefast {
namespace {

constexpr int kProbeStride = 64 + 8;

template <typename T>
__global__ void sp24_probe_kernel(const uint4* __restrict__ vals, const uint32_t* __restrict__ meta,
                                  const T* __restrict__ x, float* __restrict__ out) {
  __shared__ __align__(16) T xs[8 * kProbeStride];
  const int lane = threadIdx.x;
  for (int i = lane; i < 8 * 8; i += 32) {  // 8 tokens x 8 vectors of 8 elements
    const int n = i / 8, c = i % 8;
    *reinterpret_cast<uint4*>(xs + n * kProbeStride + c * 8) = reinterpret_cast<const uint4*>(x + n * 64)[c];
  }
  __syncwarp();
  const uint4 a[2] = {vals[lane], vals[32 + lane]};
  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  sp24_block_mma<TypeTraits<T>::kIsBF16, 1>(acc, a, meta[lane], xs, kProbeStride, 0, lane);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int r = 0; r < 4; ++r) out[(2 * t + (r & 1)) * 16 + g + 8 * (r >> 1)] = acc[0][r];
}

}  // namespace

cudaError_t sp24_probe_tile(const void* values, const uint32_t* meta, const void* x, float* out, DType dtype,
                            cudaStream_t stream) {
  return SF_DISPATCH_HALF_TYPES(dtype, [&]() -> cudaError_t {
    sp24_probe_kernel<scalar_t><<<1, 32, 0, stream>>>(static_cast<const uint4*>(values), meta,
                                                      static_cast<const scalar_t*>(x), out);
    SF_CUDA_RETURN_LAUNCH_ERROR();
    return cudaSuccess;
  });
}

}  // namespace sparsefast
