// 2:4 tiled GEMM for larger M: y[M, N] = x[M, K] W^T with W packed in the fragment order of sparse24.h.
//
// CTA tile: 128 weight rows x 128 tokens x 64 dense columns, 8 warps as 2 (rows) x 4 (tokens); each warp owns
// 64 rows x 32 tokens = 4 x 4 m16n8k32 sparse MMAs per k tile.  A 3-stage cp.async pipeline (16-byte copies,
// zero-filled past M, N and K) feeds shared memory.  A fragments are one conflict-free 16-byte shared load per lane
// (the packed order is the fragment order); metadata one 4-byte load (word lane, then lane ^ 2); activation
// fragments come through ldmatrix from an XOR-swizzled tile (16-byte chunk c of token row r stored at c ^ (r & 7))
// so the 8 rows of each ldmatrix phase hit distinct banks.  The epilogue stages the fp16/bf16 tile through shared
// memory and writes y with 16-byte stores.
#include "common/check.h"
#include "common/ptx.h"
#include "sparse24/sparse24.h"

namespace sparsefast {
namespace {

constexpr int kBM = 128;  // weight rows per CTA (8 row blocks)
constexpr int kBN = 128;  // tokens per CTA
constexpr int kBK = 64;   // dense columns per stage (one metadata block)
constexpr int kStages = 3;
constexpr int kThreads = 256;
constexpr int kRowBlocks = kBM / kSp24RowBlock;
constexpr int kABytes = kRowBlocks * 2 * 512;   // 8 row blocks x 2 k tiles x 512 B
constexpr int kEBytes = kRowBlocks * 32 * 4;    // 8 row blocks x 32 words
constexpr int kBBytes = kBN * kBK * 2;          // 128 tokens x 64 columns
constexpr int kStageBytes = kABytes + kEBytes + kBBytes;
constexpr int kSmemBytes = kStages * kStageBytes;
constexpr int kCStride = kBM + 8;  // epilogue staging row (one token), padded
static_assert(kBN * kCStride * 2 <= kSmemBytes, "epilogue tile must fit in the pipeline buffers");

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sp24_gemm_kernel(const T* __restrict__ x,
                                                                const uint4* __restrict__ vals,
                                                                const uint32_t* __restrict__ meta,
                                                                T* __restrict__ y, int M, int N, int K) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int Np = round_up(N, kSp24RowBlock), Kp = round_up(K, kSp24KChunk);
  const int nrb = Np / kSp24RowBlock, KT = Kp / 32, KC = Kp / kSp24KChunk;
  const int rb0 = blockIdx.x * kRowBlocks, n0 = blockIdx.y * kBN;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int warp_m = warp >> 2, warp_n = warp & 3;

  auto stage_a = [&](int s) { return smem + s * kStageBytes; };
  auto stage_e = [&](int s) { return reinterpret_cast<uint32_t*>(smem + s * kStageBytes + kABytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * kStageBytes + kABytes + kEBytes); };

  auto load_stage = [&](int s, int kc) {
    unsigned char* as = stage_a(s);
#pragma unroll
    for (int i = 0; i < kABytes / 16 / kThreads; ++i) {  // 2 copies: row block q/64, 16-byte piece q%64
      const int q = tid + i * kThreads, rbl = q >> 6, piece = q & 63;
      const bool ok = rb0 + rbl < nrb;
      const uint4* src = vals + (ok ? ((size_t)(rb0 + rbl) * KT + 2 * kc) * 32 + piece : 0);
      cp_async_16(as + q * 16, src, ok);
    }
    if (tid < kEBytes / 16) {  // 64 copies: row block tid/8, 16-byte piece tid%8
      const int rbl = tid >> 3, piece = tid & 7;
      const bool ok = rb0 + rbl < nrb;
      const uint32_t* src = meta + (ok ? ((size_t)(rb0 + rbl) * KC + kc) * 32 + piece * 4 : 0);
      cp_async_16(stage_e(s) + tid * 4, src, ok);
    }
    T* bs = stage_b(s);
#pragma unroll
    for (int i = 0; i < kBBytes / 16 / kThreads; ++i) {  // 4 copies: token q/8, chunk q%8
      const int q = tid + i * kThreads, n = q >> 3, c = q & 7;
      const int token = n0 + n, kg = kc * kBK + c * 8;
      const bool ok = token < M && kg < K;
      const T* src = x + (ok ? (size_t)token * K + kg : 0);
      cp_async_16(bs + n * kBK + ((c ^ (n & 7)) * 8), src, ok);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  auto compute_stage = [&](int s) {
    const unsigned char* as = stage_a(s);
    const uint32_t* es = stage_e(s);
    const T* bs = stage_b(s);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t af[4][4], e[4], bf[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int rbl = warp_m * 4 + i;
        const uint4 v = *reinterpret_cast<const uint4*>(as + ((rbl * 2 + h) * 32 + lane) * 16);
        af[i][0] = v.x; af[i][1] = v.y; af[i][2] = v.z; af[i][3] = v.w;
        // zero-filled metadata (row blocks past N) is an invalid pattern for mma.sp: use the padding pattern.
        e[i] = rb0 + rbl < nrb ? es[rbl * 32 + (lane ^ (2 * h))] : (uint32_t)kSp24MetaPad;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = warp_n * 32 + j * 8 + (lane & 7), c = h * 4 + (lane >> 3);
        ldmatrix_x4(bf[j], bs + n * kBK + ((c ^ (n & 7)) * 8));
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_sp_16832<TypeTraits<T>::kIsBF16>(acc[i][j], af[i], bf[j], e[i]);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KC) load_stage(s, s);
    cp_async_commit();
  }
  for (int kc = 0; kc < KC; ++kc) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kc landed for every thread; stage (kc - 1) % kStages is free to refill
    const int next = kc + kStages - 1;
    if (next < KC) load_stage(next % kStages, next);
    cp_async_commit();
    compute_stage(kc % kStages);
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: acc -> T in shared memory laid out as y (token-major), then 16-byte coalesced stores.
  T* cs = reinterpret_cast<T*>(smem);
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = (warp_m * 4 + i) * kSp24RowBlock + g + 8 * (r >> 1);
        const int n = warp_n * 32 + j * 8 + 2 * t + (r & 1);
        cs[n * kCStride + row] = TypeTraits<T>::from_float(acc[i][j][r]);
      }
  __syncthreads();
  const int row0 = blockIdx.x * kBM;
  const bool vec_ok = (N % 8) == 0;
  for (int q = tid; q < kBN * (kBM / 8); q += kThreads) {
    const int n = q / (kBM / 8), c = q % (kBM / 8), token = n0 + n, row = row0 + c * 8;
    if (token >= M || row >= N) continue;
    const T* src = cs + n * kCStride + c * 8;
    T* dst = y + (size_t)token * N + row;
    if (vec_ok) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8 && row + e < N; ++e) dst[e] = src[e];
    }
  }
}

}  // namespace

cudaError_t sp24_gemm(const Sp24Problem& p, cudaStream_t stream) {
  if (p.M < 1 || p.N < 1 || p.K < 1 || p.K % 8 != 0) return cudaErrorInvalidValue;
  const dim3 grid(ceil_div(p.N, kBM), ceil_div(p.M, kBN));
  if (grid.y > 65535) return cudaErrorInvalidConfiguration;
  return SF_DISPATCH_HALF_TYPES(p.dtype, [&]() -> cudaError_t {
    SF_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(sp24_gemm_kernel<scalar_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    sp24_gemm_kernel<scalar_t><<<grid, kThreads, kSmemBytes, stream>>>(
        static_cast<const scalar_t*>(p.x), static_cast<const uint4*>(p.values), p.meta,
        static_cast<scalar_t*>(p.y), p.M, p.N, p.K);
    SF_CUDA_RETURN_LAUNCH_ERROR();
    return cudaSuccess;
  });
}

}  // namespace sparsefast
