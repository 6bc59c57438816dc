// Error checking for torch-free CUDA code: launchers return cudaError_t, never throw or exit.
#pragma once
#include <cuda_runtime.h>

// Evaluate a CUDA runtime call; on failure return its error from the enclosing function.
#define SF_CUDA_RETURN_IF_ERROR(expr)            \
  do {                                           \
    cudaError_t sf_err_ = (expr);                \
    if (sf_err_ != cudaSuccess) return sf_err_;  \
  } while (0)

// After a <<<>>> launch: return the launch error (bad configuration, missing sm image) if any.
#define SF_CUDA_RETURN_LAUNCH_ERROR() SF_CUDA_RETURN_IF_ERROR(cudaGetLastError())

namespace sparsefast {

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }

}  // namespace sparsefast
