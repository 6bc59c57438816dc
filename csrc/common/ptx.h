// Small PTX wrappers used by the 2:4 kernels: sparse tensor-core MMA, cp.async, ldmatrix, streaming loads.
// Fragment conventions (PTX ISA, "mma.sp ... m16n8k32 .f16/.bf16"): lane = 4*g + t (g = groupID, t = thread in
// group).  A (16x32 logical, 16x16 compressed) a0..a7: (row g, ccol 2t,2t+1), (row g+8, 2t,2t+1),
// (row g, 2t+8,2t+9), (row g+8, 2t+8,2t+9).  B (32x8): reg j holds k = 8j+2t, 8j+2t+1 at column n = g.
// C/D (16x8, f32): c0,c1 = (row g, n 2t,2t+1), c2,c3 = (row g+8, n 2t,2t+1).
// Metadata with sparsity selector 0: lanes with t = 0,1 supply it; lane t covers the 4-groups 4t..4t+3 of the
// 32-wide k tile; bits [15:0] are row g, bits [31:16] row g+8; nibble q (bits 4q..4q+3) describes group 4t+q: its
// low 2 bits are the position (0..3) of the first kept value, the high 2 bits that of the second.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sparsefast {

// D = A(sparse 16x32) * B(32x8) + D, f32 accumulate; selector 0; metadata must list kept positions in ascending order.
template <bool kBF16>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t meta) {
  if constexpr (kBF16) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l/8, row l%8; reg j receives matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_ptr)));
}

// 16-byte global->shared copy, bypassing L1; copies src_bytes (0 or 16) and zero-fills the rest.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Streaming 16-byte load of data read exactly once (the packed weight): read-only path, no L1 allocation.
__device__ __forceinline__ uint4 ld_stream_16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t ld_stream_4(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

}  // namespace sparsefast
