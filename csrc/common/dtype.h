// Element types shared by the kernels and the host launchers (fp16 and bf16 in, fp32 accumulate).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sparsefast {

// The dtype tag passed from the (torch) bindings to the (torch-free) launchers.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

template <typename T>
struct TypeTraits;

template <>
struct TypeTraits<__half> {
  static constexpr bool kIsBF16 = false;
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct TypeTraits<__nv_bfloat16> {
  static constexpr bool kIsBF16 = true;
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace sparsefast

// Run `...` with `scalar_t` bound to the CUDA element type of `dtype`; unknown dtypes return cudaErrorInvalidValue.
#define SF_DISPATCH_HALF_TYPES(dtype, ...)                      \
  [&]() -> cudaError_t {                                        \
    switch (dtype) {                                            \
      case ::sparsefast::DType::kFloat16: {                     \
        using scalar_t = __half;                                \
        return __VA_ARGS__();                                   \
      }                                                         \
      case ::sparsefast::DType::kBFloat16: {                    \
        using scalar_t = __nv_bfloat16;                         \
        return __VA_ARGS__();                                   \
      }                                                         \
      default:                                                  \
        return cudaErrorInvalidValue;                           \
    }                                                           \
  }()
