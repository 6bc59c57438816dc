// CPU linear kernels, torch-free: y[M, N] = x[M, K] · Wᵀ (+ bias) for a compactly stored sparse W [N, K], or a dense
// row-major one. Each weight byte is read from memory once per call and reused for all M tokens: batch-1 decode is
// bound by the bytes a layer moves, and the sparse layouts move about half of the dense bytes at 50% sparsity.
//
// 2:4 layout (documented bit by bit, with its packer and exact inverse, in sparsefast/ops/sparse24_cpu.py):
//   tiles of 8 output rows x 32 input columns (Kp = K rounded up to 32, Np = N rounded up to 8, zeros beyond);
//   values [Np/8, Kp/32, 8, 16] fp32|bf16|int8: values[t, b, r, 2g + s] = W[8t + r, 32b + 4g + i_s] (g < 8 groups of 4
//          columns, the two kept positions i_0 < i_1 of each group);
//   meta   [Np/8, Kp/32, 8] uint32: bits 2j, 2j+1 of meta[t, b, r] = the position i of value j (j = 2g + s).
//   A tile's values and metas are contiguous, so a tile of 8 rows is two sequential streams (one DRAM stream where the
//   hardware prefetcher does best), and a value's 32-column block fits one AVX-512 two-source permute of x.
//   The kernel never expands W: it permutes x to the stored values (x[32b + 4g + i_s] for lane 2g + s) and does one
//   16-lane FMA per row and token, so the work per weight is 2 instructions whatever the CPU's expand throughput.
// Unstructured layout (sparsefast/ops/sparse_unstructured.py): tiles of 8 rows x 16-column chunks (Kp16 = K rounded
//   up to 16, Np = N rounded up to 8);
//   masks  [Np/8, Kp16/16, 8] uint16 bitmask: bit j of masks[t, c, r] = 1 iff W[8t + r, 16c + j] != 0;
//   values flat, fp32|bf16|int8: the nonzeros in the order tile, chunk, row, column, then 16 zero elements of padding
//          (the vector loads read up to 16 elements past a chunk's start);
//   tile_offsets [Np/8 + 1] int64: tile t's values are values[tile_offsets[t] .. tile_offsets[t+1]).
//   A chunk's stored values are expanded into a 16-lane register (AVX-512 vexpandps / an AVX2 permute table; int8 and
//   bf16 at kAvx512Vbmi: one vpexpandb / vpexpandw for a chunk's 4 / 2 adjacent rows, then one permute per row).
// Dense: W itself, [N, K] row-major with a row stride (no packing, so any nn.Linear weight or a tied embedding runs
//   as it is stored); 8 rows at a time, each an 8-stream read of 16-column chunks (a zero-padded copy for the last
//   K % 16 columns of a row).
#pragma once

#include <cstdint>

namespace sparsefast_cpu {

// Instruction sets, best last. kAuto picks the best the running CPU supports (__builtin_cpu_supports).
// kAvx512Vbmi: AVX-512 with BW, VBMI, VBMI2 and VNNI (Ice Lake, Zen 4 and later); it runs the kAvx512 paths except for
// the unstructured int8 / bf16 ones, which expand four int8 (two bf16) rows of a chunk at once (linear_cpu.cpp), and
// it is the level of the int8-activation kernels (linear_int8_act_cpu.cpp).
enum Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3, kAvx512Vbmi = 4 };

// Stored value types. kInt8: symmetric per-output-row int8, W[row, :] = scales[row] * q[row, :]; the kernels widen q
// to fp32 in registers (exact), accumulate q * x in fp32 and multiply each row's sum by its scale once.
enum ValueType : int { kFloat32 = 0, kBf16 = 1, kInt8 = 2 };

constexpr int64_t kTileRows = 8;     // both layouts: output rows per tile
constexpr int64_t kBlockCols = 32;   // 2:4 layout: input columns per block (16 stored values)

struct Sparse24Weight {
  const void* values;    // [Np/8, Kp/32, 8, 16] fp32, bf16 (the upper 16 bits of an fp32) or int8
  int vtype;             // ValueType of values
  const float* scales;   // [n] per-row scales of int8 values; nullptr otherwise
  const uint32_t* meta;  // [Np/8, Kp/32, 8]
  int64_t n;             // out_features (rows beyond n in the last tile are padding)
  int64_t kp;            // in_features rounded up to 32
};

struct UnstructuredWeight {
  const void* values;           // flat nonzeros + 16 elements of padding, fp32, bf16 or int8
  int vtype;                    // ValueType of values
  const float* scales;          // [n] per-row scales of int8 values; nullptr otherwise
  const uint16_t* masks;        // [Np/8, Kp16/16, 8]
  const int64_t* tile_offsets;  // [Np/8 + 1]
  int64_t n;                    // out_features (rows beyond n in the last tile are padding)
  int64_t kp;                   // in_features rounded up to 16
};

struct DenseWeight {
  const void* values;  // [n, k] row-major (row i starts at values + i * ld), fp32, bf16 or int8
  int vtype;           // ValueType of values
  const float* scales; // [n] per-row scales of int8 values; nullptr otherwise
  int64_t n;           // out_features
  int64_t k;           // in_features
  int64_t ld;          // row stride in elements (>= k)
  int64_t kp;          // k rounded up to 16: the width of x
};

// The best instruction set this CPU supports.
int best_isa();
// Whether `isa` (kScalar, kAvx2, kAvx512, kAvx512Vbmi) can run on this CPU and was compiled in.
bool isa_supported(int isa);

// y[t, row] = sum_k x[t, k] W[row, k] (+ bias[row]) for the rows of tiles [tile_begin, tile_end) and every token t < m.
// x: [m, kp] fp32 row-major (zero-padded beyond in_features); y: [m, w.n] fp32 row-major; bias: [w.n] or nullptr.
// Tiles are independent: callers run disjoint tile ranges on different threads.
void sparse24_linear_tiles(const Sparse24Weight& w, const float* x, int64_t m, const float* bias, float* y,
                           int64_t tile_begin, int64_t tile_end, int isa);

// The same for an unstructured weight; x: [m, kp] with kp = w.kp.
void unstructured_linear_tiles(const UnstructuredWeight& w, const float* x, int64_t m, const float* bias, float* y,
                               int64_t tile_begin, int64_t tile_end, int isa);

// The same for a dense weight; tiles are groups of 8 rows (the last one may be shorter); x: [m, kp].
void dense_linear_tiles(const DenseWeight& w, const float* x, int64_t m, const float* bias, float* y,
                        int64_t tile_begin, int64_t tile_end, int isa);

// ---------------------------------------------------------------- int8 activations (linear_int8_act_cpu.cpp)
// Opt-in numerics for int8 weights (sparsefast/ops/int8_rows.py): x is quantized per token and 32-column block, as
// llama.cpp's Q8_0: xs[t, b] = max |x[t, 32b .. 32b + 31]| / 127 (1 for a zero block), q = round half to even
// (x / xs) in [-127, 127]; each output is ws[row] * sum_b xs[t, b] * (float) (sum over the block of q_x q_w) (+ bias):
// exact int32 dot products per block (AVX-512 VNNI vpdpbusd on q_x + 128 as unsigned bytes, minus the block's
// 128 * sum q_w), the block sums accumulated in fp32. Kernels at kAvx512Vbmi only.
constexpr int64_t kActBlock = 32;  // input columns per activation scale

// q [m, kq] = q_x + 128 as bytes, xs [m, kq / 32]; columns k..kq are 128 (q_x = 0), blocks wholly beyond k scale 1.
// kq: a multiple of 32 >= k.
void quantize_input_int8(const float* x, int64_t m, int64_t k, int64_t ldx, int64_t kq, uint8_t* q, float* xs);

// y[t, row] for the rows of tiles [tile_begin, tile_end), every token t < m, from the quantized input (q [m, kq],
// xs [m, kq / 32]); int8 values only. kq: 2:4 w.kp; unstructured w.kp rounded up to 32; dense k rounded up to 64.
void sparse24_linear_tiles_int8_act(const Sparse24Weight& w, const uint8_t* q, const float* xs, int64_t kq, int64_t m,
                                    const float* bias, float* y, int64_t tile_begin, int64_t tile_end);
void unstructured_linear_tiles_int8_act(const UnstructuredWeight& w, const uint8_t* q, const float* xs, int64_t kq,
                                        int64_t m, const float* bias, float* y, int64_t tile_begin, int64_t tile_end);
void dense_linear_tiles_int8_act(const DenseWeight& w, const uint8_t* q, const float* xs, int64_t kq, int64_t m,
                                 const float* bias, float* y, int64_t tile_begin, int64_t tile_end);

}  // namespace sparsefast_cpu
