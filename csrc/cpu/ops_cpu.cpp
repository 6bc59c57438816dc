// The CPU extension's only torch file: registers the CPU sparse linear ops with the torch dispatcher
// (TORCH_LIBRARY_FRAGMENT, namespace `sparsefast`) instead of a pybind11 module. Why: the ops then exist as
// torch.ops.sparsefast.* with a schema (torch.compile, opcheck and fake kernels work without Python wrappers of our
// own), the shared object needs no Python ABI (loaded with torch.ops.load_library), and threads come from torch's
// own pool (at::parallel_for honours torch.set_num_threads) rather than a second OpenMP runtime in the process.
// Tensor checks here guard memory safety; sparsefast/ops/*.py raise the user-facing errors before calling in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/sparse_linear_cpu.h"

namespace {

using sparsefast_cpu::SparseWeight;

int64_t padded_in(int64_t in_features) { return (in_features + 15) / 16 * 16; }

at::Tensor run(const at::Tensor& x, const at::Tensor& values, const at::Tensor& masks, const at::Tensor* row_offsets,
               const std::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features, int64_t isa) {
  const bool is24 = row_offsets == nullptr;
  const int64_t kp = padded_in(in_features);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, "sparse linear: x must be [..., ", in_features, "]");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                    "sparse linear: x must be float32 or bfloat16");
  TORCH_CHECK_VALUE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
                    "sparse linear: values must be float32 or bfloat16");
  TORCH_CHECK_VALUE(values.is_contiguous() && masks.is_contiguous(), "sparse linear: packed tensors must be contiguous");
  TORCH_CHECK_VALUE(masks.scalar_type() == at::kByte && masks.dim() == 2 && masks.size(0) == out_features &&
                        masks.size(1) == kp / 8,
                    "sparse linear: masks must be uint8 [", out_features, ", ", kp / 8, "]");
  TORCH_CHECK_VALUE(x.device().is_cpu() && values.device().is_cpu() && masks.device().is_cpu(),
                    "sparse linear: CPU tensors only");
  if (is24) {
    TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == out_features && values.size(1) == kp / 2,
                      "sparse24 linear: values must be [", out_features, ", ", kp / 2, "]");
  } else {
    const at::Tensor& off = *row_offsets;
    TORCH_CHECK_VALUE(off.scalar_type() == at::kLong && off.dim() == 1 && off.numel() == out_features + 1 &&
                          off.is_contiguous() && off.device().is_cpu(),
                      "sparse linear: row_offsets must be int64 [", out_features + 1, "]");
    TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() >= off.data_ptr<int64_t>()[out_features] + 16,
                      "sparse linear: values must be 1-D with 16 elements of padding after the last row");
  }
  const int64_t m = x.numel() / in_features;  // x [..., in] is read as [M, in]; y gets x's leading dims
  at::Tensor xf;  // fp32 [M, kp], zero-padded: x itself when it already is that
  if (x.scalar_type() == at::kFloat && x.is_contiguous() && in_features == kp) {
    xf = x.view({m, kp});
  } else {
    xf = at::zeros({m, kp}, x.options().dtype(at::kFloat));
    xf.narrow(1, 0, in_features).copy_(x.reshape({m, in_features}));
  }
  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == out_features && bias->device().is_cpu(),
                      "sparse linear: bias must be a CPU tensor [", out_features, "]");
    bf = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> y_sizes(x.sizes().begin(), x.sizes().end());
  y_sizes.back() = out_features;
  at::Tensor y = at::empty(y_sizes, xf.options());
  SparseWeight w{values.data_ptr(), values.scalar_type() == at::kBFloat16, masks.data_ptr<uint8_t>(),
                 is24 ? nullptr : row_offsets->data_ptr<int64_t>(), is24, out_features, kp};
  const float* xp = xf.data_ptr<float>();
  const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int ichoice = static_cast<int>(isa);
  at::parallel_for(0, out_features, 16, [&](int64_t r0, int64_t r1) {
    sparsefast_cpu::sparse_linear_rows(w, xp, m, bp, yp, r0, r1, ichoice);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

void check_isa(int64_t isa) {
  TORCH_CHECK_VALUE(isa == sparsefast_cpu::kAuto || sparsefast_cpu::isa_supported(static_cast<int>(isa)),
                    "sparse linear: instruction set ", isa, " is not supported on this CPU (best: ",
                    sparsefast_cpu::best_isa(), ")");
}

at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                               const std::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features,
                               int64_t isa) {
  check_isa(isa);
  return run(x, values, meta, nullptr, bias, out_features, in_features, isa);
}

at::Tensor sparse_unstructured_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                                          const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias,
                                          int64_t out_features, int64_t in_features, int64_t isa) {
  check_isa(isa);
  return run(x, values, mask, &row_offsets, bias, out_features, in_features, isa);
}

int64_t cpu_best_isa() { return sparsefast_cpu::best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefast, m) {
  // x [..., in_features] float32 | bfloat16 -> y [..., out_features] in x's dtype
  m.def("sparse24_linear_cpu(Tensor x, Tensor values, Tensor meta, Tensor? bias, int out_features, "
        "int in_features, int isa) -> Tensor");
  m.def("sparse_unstructured_linear_cpu(Tensor x, Tensor values, Tensor mask, Tensor row_offsets, Tensor? bias, "
        "int out_features, int in_features, int isa) -> Tensor");
  m.def("cpu_best_isa() -> int", &cpu_best_isa);
}

TORCH_LIBRARY_IMPL(sparsefast, CPU, m) {
  m.impl("sparse24_linear_cpu", &sparse24_linear_cpu);
  m.impl("sparse_unstructured_linear_cpu", &sparse_unstructured_linear_cpu);
}
