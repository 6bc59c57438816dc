// 2:4 tiled GEMM, version 2 (kernel id 3): y[M, N] = x[M, K] W^T, W packed in the fragment order of sparse24.h.
//
// What changed against sparse24_gemm.cu (version 1, kept for A/B timing as kernel id 2), and why:
//  * split-K over gridDim.z when the output has fewer tiles than the SMs can hold (kv_proj, down_proj, M = 9..512):
//    each split writes fp32 partials [split][M][N] and a second kernel adds them in split order (deterministic).
//    Measured on the H100 (CUDA-graph device time): M = 64 down_proj 70B 0.33 -> 0.11 ms, kv_proj 0.096 -> 0.015.
//  * a small config (128 rows x 64 tokens, warp 32 x 32, two CTAs per SM) for M <= 128 so padding tokens waste
//    fewer MMAs; it also beats the decode kernel at M = 16 and 32 on every LLaMA shape.
//  * 4 cp.async stages in dynamic shared memory (>48 KB needs cudaFuncSetAttribute).
//  * tried and dropped: a 256-row x 128-token tile with 64 x 64 warp tiles (235 registers, one CTA per SM): 0.65-0.9x
//    of v1 at M >= 512 on most shapes (1.15-1.2x only on the 70B MLP at M = 4096), so M > 128 uses v1's 128 x 128
//    tile (2 x 4 warps, two CTAs per SM) with the 4-stage pipeline and split-K.
// Unchanged: fragment-order A loads (one conflict-free 16-byte shared load per lane), metadata one word per lane
// (lane ^ 2 for the second k tile), activations through ldmatrix.x4 from an XOR-swizzled tile, fp16/bf16 epilogue
// staged through shared memory with 16-byte stores.
#include <algorithm>

#include "common/check.h"
#include "common/ptx.h"
#include "sparse24/sparse24.h"

namespace sparsefast {
namespace {

constexpr int kThreads = 256;
constexpr int kBK = 64;  // dense columns per stage (one metadata block)

template <int BM_, int BN_, int WM_, int WN_, int STAGES_, int MINB_>
struct Gemm2Config {
  static constexpr int BM = BM_, BN = BN_, WM = WM_, WN = WN_, STAGES = STAGES_, MINB = MINB_;
  static constexpr int MI = BM / WM / kSp24RowBlock;  // row blocks per warp
  static constexpr int NJ = BN / WN / 8;              // 8-token slices per warp
  static constexpr int kRowBlocks = BM / kSp24RowBlock;
  static constexpr int kABytes = kRowBlocks * 2 * 512;
  static constexpr int kEBytes = kRowBlocks * 32 * 4;
  static constexpr int kBBytes = BN * kBK * 2;
  static constexpr int kStageBytes = kABytes + kEBytes + kBBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static constexpr int kCStride = BM + 8;
  static_assert(WM * WN * 32 == kThreads, "8 warps");
  static_assert(BN * kCStride * 2 <= kSmemBytes, "epilogue tile must fit in the pipeline buffers");
  static_assert(kABytes / 16 % kThreads == 0 && kBBytes / 16 % kThreads == 0 && kEBytes / 16 <= kThreads, "copies");
};

using CfgSmall = Gemm2Config<128, 64, 4, 2, 4, 2>;
using CfgLarge = Gemm2Config<128, 128, 2, 4, 4, 2>;

template <typename T, typename C>
__global__ void __launch_bounds__(kThreads, C::MINB) sp24_gemm2_kernel(const T* __restrict__ x,
                                                                      const uint4* __restrict__ vals,
                                                                      const uint32_t* __restrict__ meta,
                                                                      T* __restrict__ y, float* __restrict__ ws,
                                                                      int M, int N, int K, int cps) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int Np = round_up(N, kSp24RowBlock), Kp = round_up(K, kSp24KChunk);
  const int nrb = Np / kSp24RowBlock, KT = Kp / 32, KC = Kp / kSp24KChunk;
  const int rb0 = blockIdx.x * C::kRowBlocks, n0 = blockIdx.y * C::BN;
  const int kc0 = blockIdx.z * cps, nk = min(cps, KC - kc0);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int warp_m = warp / C::WN, warp_n = warp % C::WN;

  auto stage_a = [&](int s) { return smem + s * C::kStageBytes; };
  auto stage_e = [&](int s) { return reinterpret_cast<uint32_t*>(smem + s * C::kStageBytes + C::kABytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * C::kStageBytes + C::kABytes + C::kEBytes); };

  auto load_stage = [&](int s, int kc) {
    unsigned char* as = stage_a(s);
#pragma unroll
    for (int i = 0; i < C::kABytes / 16 / kThreads; ++i) {  // row block q/64, 16-byte piece q%64
      const int q = tid + i * kThreads, rbl = q >> 6, piece = q & 63;
      const bool ok = rb0 + rbl < nrb;
      const uint4* src = vals + (ok ? ((size_t)(rb0 + rbl) * KT + 2 * kc) * 32 + piece : 0);
      cp_async_16(as + q * 16, src, ok);
    }
    if (tid < C::kEBytes / 16) {  // row block tid/8, 16-byte piece tid%8
      const int rbl = tid >> 3, piece = tid & 7;
      const bool ok = rb0 + rbl < nrb;
      const uint32_t* src = meta + (ok ? ((size_t)(rb0 + rbl) * KC + kc) * 32 + piece * 4 : 0);
      cp_async_16(stage_e(s) + tid * 4, src, ok);
    }
    T* bs = stage_b(s);
#pragma unroll
    for (int i = 0; i < C::kBBytes / 16 / kThreads; ++i) {  // token q/8, 16-byte chunk q%8
      const int q = tid + i * kThreads, n = q >> 3, c = q & 7;
      const int token = n0 + n, kg = kc * kBK + c * 8;
      const bool ok = token < M && kg < K;
      const T* src = x + (ok ? (size_t)token * K + kg : 0);
      cp_async_16(bs + n * kBK + ((c ^ (n & 7)) * 8), src, ok);
    }
  };

  float acc[C::MI][C::NJ][4];
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NJ; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  auto compute_stage = [&](int s) {
    const unsigned char* as = stage_a(s);
    const uint32_t* es = stage_e(s);
    const T* bs = stage_b(s);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t af[C::MI][4], e[C::MI], bf[C::NJ][4];
#pragma unroll
      for (int i = 0; i < C::MI; ++i) {
        const int rbl = warp_m * C::MI + i;
        const uint4 v = *reinterpret_cast<const uint4*>(as + ((rbl * 2 + h) * 32 + lane) * 16);
        af[i][0] = v.x; af[i][1] = v.y; af[i][2] = v.z; af[i][3] = v.w;
        e[i] = rb0 + rbl < nrb ? es[rbl * 32 + (lane ^ (2 * h))] : (uint32_t)kSp24MetaPad;  // zero fill is invalid
      }
#pragma unroll
      for (int j = 0; j < C::NJ; ++j) {
        const int n = warp_n * (C::NJ * 8) + j * 8 + (lane & 7), c = h * 4 + (lane >> 3);
        ldmatrix_x4(bf[j], bs + n * kBK + ((c ^ (n & 7)) * 8));
      }
#pragma unroll
      for (int i = 0; i < C::MI; ++i)
#pragma unroll
        for (int j = 0; j < C::NJ; ++j) mma_sp_16832<TypeTraits<T>::kIsBF16>(acc[i][j], af[i], bf[j], e[i]);
    }
  };

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < nk) load_stage(s, kc0 + s);
    cp_async_commit();
  }
  for (int i = 0; i < nk; ++i) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // stage i landed for every thread; the stage read in iteration i - 1 is free to refill
    const int next = i + C::STAGES - 1;
    if (next < nk) load_stage(next % C::STAGES, kc0 + next);
    cp_async_commit();
    compute_stage(i % C::STAGES);
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
  if (gridDim.z > 1) {  // split-K: fp32 partials [split][M][N], summed in split order by sp24_splitk_reduce
    float* part = ws + (size_t)blockIdx.z * M * N;
#pragma unroll
    for (int i = 0; i < C::MI; ++i)
#pragma unroll
      for (int j = 0; j < C::NJ; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int row = (rb0 + warp_m * C::MI + i) * kSp24RowBlock + g + 8 * (r >> 1);
          const int token = n0 + warp_n * (C::NJ * 8) + j * 8 + 2 * t + (r & 1);
          if (token < M && row < N) part[(size_t)token * N + row] = acc[i][j][r];
        }
    return;
  }
  __syncthreads();  // every warp is done reading the pipeline buffers

  T* cs = reinterpret_cast<T*>(smem);  // acc -> T, token-major like y, then 16-byte coalesced stores
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NJ; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = (warp_m * C::MI + i) * kSp24RowBlock + g + 8 * (r >> 1);
        const int n = warp_n * (C::NJ * 8) + j * 8 + 2 * t + (r & 1);
        cs[n * C::kCStride + row] = TypeTraits<T>::from_float(acc[i][j][r]);
      }
  __syncthreads();
  const int row0 = blockIdx.x * C::BM;
  const bool vec_ok = (N % 8) == 0;
  for (int q = tid; q < C::BN * (C::BM / 8); q += kThreads) {
    const int n = q / (C::BM / 8), c = q % (C::BM / 8), token = n0 + n, row = row0 + c * 8;
    if (token >= M || row >= N) continue;
    const T* src = cs + n * C::kCStride + c * 8;
    T* dst = y + (size_t)token * N + row;
    if (vec_ok) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && row + e < N; ++e) dst[e] = src[e];
    }
  }
}

template <typename T>
__global__ void sp24_splitk_reduce(const float* __restrict__ ws, T* __restrict__ y, size_t count, int splits) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count; i += (size_t)gridDim.x * blockDim.x) {
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += __ldcg(ws + z * count + i);
    y[i] = TypeTraits<T>::from_float(s);
  }
}

template <typename C>
int tiles_of(int M, int N) {
  return ceil_div(N, C::BM) * ceil_div(M, C::BN);
}

template <typename T, typename C>
cudaError_t launch(const Sp24Problem& p, const Sp24GemmPlan& plan, float* ws, cudaStream_t s) {
  auto kernel = sp24_gemm2_kernel<T, C>;
  SF_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes));
  const dim3 grid(ceil_div(p.N, C::BM), ceil_div(p.M, C::BN), plan.splits);
  kernel<<<grid, kThreads, C::kSmemBytes, s>>>(static_cast<const T*>(p.x), static_cast<const uint4*>(p.values),
                                               p.meta, static_cast<T*>(p.y), ws, p.M, p.N, p.K,
                                               plan.chunks_per_split);
  SF_CUDA_RETURN_LAUNCH_ERROR();
  if (plan.splits > 1) {
    const size_t count = (size_t)p.M * p.N;
    const int blocks = (int)std::min<size_t>((count + 255) / 256, 4096);
    sp24_splitk_reduce<T><<<blocks, 256, 0, s>>>(ws, static_cast<T*>(p.y), count, plan.splits);
    SF_CUDA_RETURN_LAUNCH_ERROR();
  }
  return cudaSuccess;
}

}  // namespace

Sp24GemmPlan sp24_gemm2_plan(int M, int N, int K, int num_sms) {
  Sp24GemmPlan plan{};
  plan.config = M <= 128 ? 0 : 1;
  const int tiles = plan.config == 0 ? tiles_of<CfgSmall>(M, N) : tiles_of<CfgLarge>(M, N);
  const int slots = std::max(num_sms, 1) * (plan.config == 0 ? CfgSmall::MINB : CfgLarge::MINB);
  const int KC = ceil_div(K, kSp24KChunk);
  // Pick the split count with the fewest waves per unit of work: cost(s) = ceil(tiles*s / slots) / s, plus 5% per
  // extra split for the fp32 partials; every split keeps >= 4 chunks (256 columns).
  const int max_splits = std::max(1, std::min(KC / 4, 16));
  int best = 1;
  double best_cost = 1e30;
  for (int s = 1; s <= max_splits; ++s) {
    const double cost = (double)ceil_div(tiles * s, slots) / s * (1.0 + 0.05 * (s - 1));
    if (cost < best_cost - 1e-9) best_cost = cost, best = s;
  }
  plan.chunks_per_split = ceil_div(KC, best);
  plan.splits = ceil_div(KC, plan.chunks_per_split);
  return plan;
}

cudaError_t sp24_gemm2(const Sp24Problem& p, const Sp24GemmPlan& plan, float* workspace, cudaStream_t stream) {
  if (p.M < 1 || p.N < 1 || p.K < 1 || p.K % 8 != 0 || plan.splits < 1 || plan.chunks_per_split < 1)
    return cudaErrorInvalidValue;
  if (plan.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  if (ceil_div(p.M, plan.config == 0 ? CfgSmall::BN : CfgLarge::BN) > 65535) return cudaErrorInvalidConfiguration;
  return SF_DISPATCH_HALF_TYPES(p.dtype, [&]() -> cudaError_t {
    if (plan.config == 0) return launch<scalar_t, CfgSmall>(p, plan, workspace, stream);
    return launch<scalar_t, CfgLarge>(p, plan, workspace, stream);
  });
}

}  // namespace sparsefast
