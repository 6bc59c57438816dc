// The inner step shared by the decode kernel and the diagnostic probe: one 16-row x 64-column packed block
// (two m16n8k32 k tiles) times NT 8-token slices of the activations held in shared memory.
#pragma once
#include <cstdint>

#include "common/ptx.h"

namespace sparsefast {

// acc[j] += W_block(16 x 64) * x_smem[8j..8j+7][col0..col0+63]^T.
// a[h]: this lane's A fragment of k tile h (one 16-byte packed load); meta_word: this lane's metadata word of the
// block (word L; the k tile 1 register comes from lane L ^ 2).  xs: activations [rows][stride] in shared memory,
// stride*2 bytes = 16 mod 128 so the 8 row addresses of each ldmatrix phase hit distinct banks.
template <bool kBF16, int NT, typename T>
__device__ __forceinline__ void sp24_block_mma(float (&acc)[NT][4], const uint4 (&a)[2], uint32_t meta_word,
                                               const T* xs, int stride, int col0, int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t e = __shfl_xor_sync(0xffffffffu, meta_word, 2 * h);
    const uint32_t af[4] = {a[h].x, a[h].y, a[h].z, a[h].w};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      uint32_t b[4];
      ldmatrix_x4(b, xs + (j * 8 + (lane & 7)) * stride + col0 + h * 32 + (lane >> 3) * 8);
      mma_sp_16832<kBF16>(acc[j], af, b, e);
    }
  }
}

}  // namespace sparsefast
