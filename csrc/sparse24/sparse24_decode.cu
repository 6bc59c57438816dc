// 2:4 decode kernel (M <= 32 tokens): y[M, N] = x[M, K] W^T, W in the packed fragment order of sparse24.h.
//
// Memory-bound design: each warp owns one 16-row block and streams its packed values (two 16-byte loads per lane
// per 64 columns, 512 contiguous bytes per warp-load) and metadata (one 4-byte load, 128 contiguous bytes) exactly
// once, U chunks in flight per warp.  The CTA's 8 warps share one K slice of the activations, staged once into
// shared memory (zero rows for tokens >= M, zero columns >= K) and fed to mma.sp through ldmatrix; the sparse
// tensor core does the metadata decoding, so no index arithmetic runs per element.  Split-K across CTAs keeps
// every SM busy on narrow layers; partial sums go to an fp32 workspace and the last CTA of each row group (atomic
// counter) adds them in split order, so the result is deterministic.
#include <algorithm>

#include "common/check.h"
#include "sparse24/sparse24.h"
#include "sparse24/sparse24_tile.cuh"

namespace sparsefast {
namespace {

constexpr int kThreads = kSp24DecodeWarps * 32;
constexpr int kUnroll = 4;  // 64-column chunks per warp in flight: 4 x 1152 bytes

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads) sp24_decode_kernel(const T* __restrict__ x,
                                                               const uint4* __restrict__ vals,
                                                               const uint32_t* __restrict__ meta,
                                                               T* __restrict__ y, float* __restrict__ ws,
                                                               int* __restrict__ counters, int M, int N, int K,
                                                               int cps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int s_is_last;
  T* xs = reinterpret_cast<T*>(smem_raw);

  const int Np = round_up(N, kSp24RowBlock), Kp = round_up(K, kSp24KChunk);
  const int nrb = Np / kSp24RowBlock, KT = Kp / 32, KC = Kp / kSp24KChunk;
  const int stride = cps * kSp24KChunk + 8;
  const int split = blockIdx.y, splits = gridDim.y;
  const int c_begin = split * cps, c_end = min(c_begin + cps, KC);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rb = blockIdx.x * kSp24DecodeWarps + warp;
  const bool active = rb < nrb;  // warp-uniform

  uint4 a[kUnroll][2];
  uint32_t m[kUnroll];
  auto load_group = [&](int c) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (active && c + u < c_end) {
        const uint4* tile = vals + ((size_t)rb * KT + 2 * (c + u)) * 32 + lane;
        a[u][0] = ld_stream_16(tile);
        a[u][1] = ld_stream_16(tile + 32);
        m[u] = ld_stream_4(meta + ((size_t)rb * KC + c + u) * 32 + lane);
      }
    }
  };
  // First weight loads go out before the activation staging so the two latencies overlap.
  load_group(c_begin);

  const int k0 = c_begin * kSp24KChunk, vec_per_row = cps * kSp24KChunk / 8;
  for (int i = threadIdx.x; i < NT * 8 * vec_per_row; i += kThreads) {
    const int n = i / vec_per_row, c = i - n * vec_per_row, kg = k0 + c * 8;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (n < M && kg < K) v = *reinterpret_cast<const uint4*>(x + (size_t)n * K + kg);
    *reinterpret_cast<uint4*>(xs + n * stride + c * 8) = v;
  }
  __syncthreads();

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  if (active) {
    for (int c = c_begin; c < c_end; c += kUnroll) {
      if (c != c_begin) load_group(c);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (c + u < c_end) {
          sp24_block_mma<TypeTraits<T>::kIsBF16, NT>(acc, a[u], m[u], xs, stride, (c + u - c_begin) * kSp24KChunk,
                                                      lane);
        }
      }
    }
  }

  const int g = lane >> 2, t = lane & 3;
  if (splits == 1) {
    if (active) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = rb * kSp24RowBlock + g + 8 * (r >> 1), n = j * 8 + 2 * t + (r & 1);
          if (n < M && row < N) y[(size_t)n * N + row] = TypeTraits<T>::from_float(acc[j][r]);
        }
    }
    return;
  }
  if (active) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = rb * kSp24RowBlock + g + 8 * (r >> 1), n = j * 8 + 2 * t + (r & 1);
        if (n < M) ws[((size_t)split * M + n) * Np + row] = acc[j][r];
      }
  }
  __threadfence();  // make this CTA's partials visible device-wide before signalling
  __syncthreads();
  if (threadIdx.x == 0) s_is_last = atomicAdd(&counters[blockIdx.x], 1) == splits - 1;
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();
  constexpr int kRows = kSp24DecodeWarps * kSp24RowBlock;
  for (int i = threadIdx.x; i < M * kRows; i += kThreads) {
    const int n = i / kRows, row = blockIdx.x * kRows + (i - n * kRows);
    if (row < N) {
      float s = 0.f;
#pragma unroll 8  // independent loads in flight; the adds stay in split order (deterministic)
      for (int sp = 0; sp < splits; ++sp) s += __ldcg(ws + ((size_t)sp * M + n) * Np + row);
      y[(size_t)n * N + row] = TypeTraits<T>::from_float(s);
    }
  }
  if (threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next launch
}

int tokens_per_warp_tiles(int M) { return M <= 8 ? 1 : (M <= 16 ? 2 : 4); }

template <typename T, int NT>
cudaError_t launch(const Sp24Problem& p, const Sp24DecodePlan& plan, float* ws, int* counters, cudaStream_t s) {
  const dim3 grid(plan.row_ctas, plan.splits);
  sp24_decode_kernel<T, NT><<<grid, kThreads, plan.smem_bytes, s>>>(
      static_cast<const T*>(p.x), static_cast<const uint4*>(p.values), p.meta, static_cast<T*>(p.y), ws, counters,
      p.M, p.N, p.K, plan.chunks_per_split);
  SF_CUDA_RETURN_LAUNCH_ERROR();
  return cudaSuccess;
}

}  // namespace

Sp24DecodePlan sp24_decode_plan(int M, int N, int K, int num_sms) {
  const int nrb = ceil_div(N, kSp24RowBlock), KC = ceil_div(K, kSp24KChunk);
  const int nt = tokens_per_warp_tiles(M);
  Sp24DecodePlan plan{};
  plan.row_ctas = ceil_div(nrb, kSp24DecodeWarps);
  // Aim at ~4 CTAs (32 warps) per SM; keep >= 2 chunks per warp (>= 8 when M > 8: the first GPU run had M = 16 at
  // 16 splits, whose fp32 partials (splits*M*N*4 bytes, 4 MB on 4096x4096) and serial last-CTA reduction cost more
  // than the split bought) and the staged activations <= 33 KB of shared memory.
  const int max_cps = 32 / nt, min_cps = std::min(M <= 8 ? 2 : 8, KC);
  const int want_splits = std::max(1, ceil_div(4 * std::max(num_sms, 1), plan.row_ctas));
  int cps = ceil_div(KC, std::min(want_splits, KC));
  cps = std::min(std::max(cps, min_cps), max_cps);
  plan.chunks_per_split = cps;
  plan.splits = ceil_div(KC, cps);
  plan.smem_bytes = (size_t)nt * 8 * (cps * kSp24KChunk + 8) * 2;
  return plan;
}

cudaError_t sp24_decode(const Sp24Problem& p, const Sp24DecodePlan& plan, float* workspace, int* counters,
                        cudaStream_t stream) {
  if (p.M < 1 || p.M > kSp24DecodeMaxM || p.N < 1 || p.K < 1 || p.K % 8 != 0) return cudaErrorInvalidValue;
  if (plan.splits > 1 && (workspace == nullptr || counters == nullptr)) return cudaErrorInvalidValue;
  const int nt = tokens_per_warp_tiles(p.M);
  return SF_DISPATCH_HALF_TYPES(p.dtype, [&]() -> cudaError_t {
    if (nt == 1) return launch<scalar_t, 1>(p, plan, workspace, counters, stream);
    if (nt == 2) return launch<scalar_t, 2>(p, plan, workspace, counters, stream);
    return launch<scalar_t, 4>(p, plan, workspace, counters, stream);
  });
}

}  // namespace sparsefast
