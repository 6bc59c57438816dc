// 2:4 sparse matmul launchers: y[M, N] = x[M, K] @ W[N, K]^T with W packed by sparsefast.ops.sparse24.pack_sparse24.
// Torch-free: raw device pointers + a stream; every launcher returns cudaError_t (launch error included).
//
// Operand roles: W is the sparse A operand of mma.sp (its rows are the M dimension of m16n8k32), the activation is
// the dense B operand (tokens are the n dimension), so each MMA computes y^T[16 rows, 8 tokens] = W_tile x^T_tile.
//
// Packed format ("fragment order"; N_p = round_up(N, 16), K_p = round_up(K, 64)), fully specified in
// sparsefast/ops/sparse24.py:
//   values [N_p/16, K_p/32, 256] (fp16/bf16): tile (rb, kt) holds rows 16rb..16rb+15, dense columns
//       32kt..32kt+31 compressed to 16 kept values per row; lane L = 4g + t owns the 8 consecutive elements
//       256-tile offset 8L..8L+7 = exactly its A fragment a0..a7 (see csrc/common/ptx.h), one 16-byte load.
//   meta   [N_p/16, K_p/64, 32] (int32): block (rb, kc) covers dense columns 64kc..64kc+63 (k tiles 2kc, 2kc+1);
//       word L = 4g + 2h + p is the selector-0 metadata register that lane 4g + p needs for k tile 2kc + h.
//       Lanes read word L for h = 0 and word L ^ 2 for h = 1.
//   Padding: rows >= N and columns >= K are zeros with kept positions (0, 1) (nibble 0x4), so they add nothing.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace sparsefast {

constexpr int kSp24RowBlock = 16;     // rows per MMA tile (N padding unit)
constexpr int kSp24KChunk = 64;       // dense columns per metadata block (K padding unit)
constexpr int kSp24DecodeWarps = 8;   // row blocks per decode CTA (128 rows)
constexpr int kSp24DecodeMaxM = 32;   // the decode kernel handles M <= 32 tokens
constexpr int kSp24DecodeAutoMaxM = 8;  // auto picks it up to 8 (GEMM v2 was faster at M = 16, 32 on every H100 shape)
constexpr int kSp24MetaPad = 0x44444444;  // metadata of an all-padding region: kept positions (0, 1) everywhere

struct Sp24Problem {
  const void* x;          // [M, K] row-major, 16-byte aligned, K % 8 == 0
  const void* values;     // packed values (see above)
  const uint32_t* meta;   // packed metadata
  void* y;                // [M, N] row-major output, same dtype as x
  int M, N, K;
  DType dtype;
};

// Split-K plan of the decode kernel: grid = (ceil(N_p/16 / 8), splits); each CTA reads chunks_per_split 64-column
// chunks. splits > 1 needs an fp32 workspace of splits*M*N_p floats and splits >= 2 an int32 counter per row CTA
// (zero on entry; the kernel leaves them zero again).
struct Sp24DecodePlan {
  int row_ctas;
  int splits;
  int chunks_per_split;
  size_t smem_bytes;
};

Sp24DecodePlan sp24_decode_plan(int M, int N, int K, int num_sms);

// Decode (M <= 32): streams the packed weight once, activations staged in shared memory, split-K across CTAs with
// a deterministic last-CTA reduction. workspace/counters may be null when plan.splits == 1.
cudaError_t sp24_decode(const Sp24Problem& p, const Sp24DecodePlan& plan, float* workspace, int* counters,
                        cudaStream_t stream);

// Tiled GEMM version 1 (any M; kernel id 2, kept for A/B timing): 128x128x64 CTA tiles, 8 warps, 3-stage cp.async
// pipeline, mma.sp m16n8k32.
cudaError_t sp24_gemm(const Sp24Problem& p, cudaStream_t stream);

// Tiled GEMM version 2 (kernel id 3; sparse24_gemm2.cu): config 0 = 128 rows x 64 tokens (M <= 128), 1 = 128 rows x
// 128 tokens (v1's tile); 4 cp.async stages; split-K over gridDim.z when the tiles do not fill the SMs. splits > 1 needs an fp32
// workspace of splits*M*N floats.
struct Sp24GemmPlan {
  int config;
  int splits;
  int chunks_per_split;
};

Sp24GemmPlan sp24_gemm2_plan(int M, int N, int K, int num_sms);
cudaError_t sp24_gemm2(const Sp24Problem& p, const Sp24GemmPlan& plan, float* workspace, cudaStream_t stream);

// Diagnostic: one warp runs exactly the decode kernel's inner step on one packed 16x64 block (values [2, 256],
// meta [32]) against B given as x[8, 64] (tokens x k); writes out[8 tokens][16 rows] in fp32.
cudaError_t sp24_probe_tile(const void* values, const uint32_t* meta, const void* x, float* out, DType dtype,
                            cudaStream_t stream);

}  // namespace sparsefast
