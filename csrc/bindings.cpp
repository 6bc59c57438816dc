// The only pybind11/torch file of sparsefast._C: tensor checks -> raw pointers + current stream -> launchers.
// One `register_<family>(m)` section per kernel family; PYBIND11_MODULE at the bottom calls each of them.
#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include "slice/structured_gather.h"
#include "sparse24/sparse24.h"

// Errors are thrown as standard exceptions created and caught inside this shared object (pybind11 turns
// std::invalid_argument into ValueError and std::runtime_error into RuntimeError). Not TORCH_CHECK: it throws c10::Error
// from libc10's own C++ runtime, and on the H100 image (CXX=/opt/gcc/bin/g++, a wrapper; `ldd _C.so` lists no
// libstdc++) that throw, caught in this module's pybind11 dispatcher, segfaulted the process (first GPU run; a
// five-line extension with one TORCH_CHECK reproduced it, while std::runtime_error thrown and caught here worked).
#define SF_CHECK_ARG(cond, ...)                                                \
  do {                                                                         \
    if (!(cond)) throw std::invalid_argument(c10::str(__VA_ARGS__));           \
  } while (0)

namespace {

// "[a, b, c]" built here: streaming at::IntArrayRef goes through libc10's operator<<, i.e. the other C++ runtime
// (it segfaulted the same way on the H100 image).
std::string sizes_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

void check_cuda_status(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(c10::str(what, " failed: ", cudaGetErrorString(err)));
}

sparsefast::DType half_dtype(const at::Tensor& t, const char* op) {
  if (t.scalar_type() == at::kHalf) return sparsefast::DType::kFloat16;
  if (t.scalar_type() == at::kBFloat16) return sparsefast::DType::kBFloat16;
  throw std::invalid_argument(c10::str(op, ": expected float16 or bfloat16, got ", t.scalar_type()));
}

// ---- sparse24 ----

int64_t round_up64(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

void check_packed(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t N, int64_t K,
                  const char* op) {
  SF_CHECK_ARG(x.is_cuda() && values.is_cuda() && meta.is_cuda(), op, ": x, values and meta must be CUDA tensors");
  SF_CHECK_ARG(x.device() == values.device() && x.device() == meta.device(), op,
              ": x, values and meta must be on the same device");
  SF_CHECK_ARG(x.dim() == 2, op, ": x must be 2-D [M, K], got ", sizes_str(x));
  SF_CHECK_ARG(x.size(1) == K, op, ": x has ", x.size(1), " columns but in_features is ", K);
  SF_CHECK_ARG(values.scalar_type() == x.scalar_type(), op, ": values dtype ", values.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  SF_CHECK_ARG(meta.scalar_type() == at::kInt, op, ": meta must be int32, got ", meta.scalar_type());
  SF_CHECK_ARG(x.is_contiguous() && values.is_contiguous() && meta.is_contiguous(), op,
              ": x, values and meta must be contiguous");
  SF_CHECK_ARG(N >= 1 && K >= 1, op, ": out_features and in_features must be positive");
  SF_CHECK_ARG(K % 8 == 0, op, ": in_features must be a multiple of 8 for the CUDA kernels, got ", K);
  const int64_t Np = round_up64(N, sparsefast::kSp24RowBlock), Kp = round_up64(K, sparsefast::kSp24KChunk);
  SF_CHECK_ARG(values.dim() == 3 && values.size(0) == Np / 16 && values.size(1) == Kp / 32 && values.size(2) == 256,
              op, ": values must be [", Np / 16, ", ", Kp / 32, ", 256] for a ", N, "x", K, " weight, got ",
              sizes_str(values), " (pack with sparsefast.ops.sparse24.pack_sparse24)");
  SF_CHECK_ARG(meta.dim() == 3 && meta.size(0) == Np / 16 && meta.size(1) == Kp / 64 && meta.size(2) == 32, op,
              ": meta must be [", Np / 16, ", ", Kp / 64, ", 32], got ", sizes_str(meta));
  SF_CHECK_ARG(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(values.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(meta.data_ptr()) % 16 == 0,
              op, ": x, values and meta must be 16-byte aligned (use .contiguous() copies, not offset views)");
  SF_CHECK_ARG(N <= INT32_MAX && K <= INT32_MAX && x.size(0) <= INT32_MAX, op, ": sizes exceed int32");
}

// Split-K arrival counters: one zeroed int32 buffer per device, grown on demand; the decode kernel resets the
// counters it used, so the buffer stays zero between launches (launches on one stream at a time per device).
int* decode_counters(const at::Device& device, int64_t n) {
  static std::mutex mutex;
  static std::map<int, at::Tensor> buffers;
  std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buf = buffers[device.index()];
  if (!buf.defined() || buf.numel() < n) {
    buf = at::zeros({std::max<int64_t>(n, 1024)}, at::TensorOptions().dtype(at::kInt).device(device));
  }
  return buf.data_ptr<int>();
}

int multiprocessor_count(int device) {
  static std::mutex mutex;
  static std::map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it != counts.end()) return it->second;
  int n = 0;
  check_cuda_status(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  counts[device] = n;
  return n;
}

// kernel: 0 = auto (decode for M <= 8, else GEMM v2), 1 = decode, 2 = GEMM v1 (A/B baseline), 3 = GEMM v2.
at::Tensor sparse24_matmul(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta, int64_t N,
                           int64_t K, int64_t kernel) {
  const char* op = "sparse24_matmul";
  check_packed(x, values, meta, N, K, op);
  const sparsefast::DType dtype = half_dtype(x, op);
  SF_CHECK_ARG(kernel >= 0 && kernel <= 3, op,
               ": kernel must be 0 (auto), 1 (decode), 2 (gemm v1) or 3 (gemm v2), got ", kernel);
  const int64_t M = x.size(0);
  SF_CHECK_ARG(kernel != 1 || M <= sparsefast::kSp24DecodeMaxM, op, ": the decode kernel takes M <= ",
               sparsefast::kSp24DecodeMaxM, ", got M=", M);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  sparsefast::Sp24Problem p{x.data_ptr(), values.data_ptr(), reinterpret_cast<const uint32_t*>(meta.data_ptr()),
                            y.data_ptr(), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), dtype};
  const int num_sms = multiprocessor_count(x.device().index());
  const bool use_decode = kernel == 1 || (kernel == 0 && M <= sparsefast::kSp24DecodeAutoMaxM);
  if (kernel == 2) {
    check_cuda_status(sparsefast::sp24_gemm(p, stream), "sp24_gemm");
    return y;
  }
  if (!use_decode) {
    const sparsefast::Sp24GemmPlan plan = sparsefast::sp24_gemm2_plan(p.M, p.N, p.K, num_sms);
    at::Tensor workspace;
    if (plan.splits > 1) workspace = at::empty({plan.splits * M * N}, x.options().dtype(at::kFloat));
    check_cuda_status(sparsefast::sp24_gemm2(p, plan, plan.splits > 1 ? workspace.data_ptr<float>() : nullptr,
                                             stream),
                      "sp24_gemm2");
    return y;
  }
  const sparsefast::Sp24DecodePlan plan = sparsefast::sp24_decode_plan(p.M, p.N, p.K, num_sms);
  float* ws = nullptr;
  int* counters = nullptr;
  at::Tensor workspace;
  if (plan.splits > 1) {
    const int64_t Np = round_up64(N, sparsefast::kSp24RowBlock);
    workspace = at::empty({plan.splits * M * Np}, x.options().dtype(at::kFloat));
    ws = workspace.data_ptr<float>();
    counters = decode_counters(x.device(), plan.row_ctas);
  }
  check_cuda_status(sparsefast::sp24_decode(p, plan, ws, counters, stream), "sp24_decode");
  return y;
}

// [config, splits, chunks_per_split] of the GEMM v2 launch for this problem (tests, benchmarks).
std::vector<int64_t> sparse24_gemm_plan(int64_t M, int64_t N, int64_t K, int64_t num_sms) {
  const sparsefast::Sp24GemmPlan p = sparsefast::sp24_gemm2_plan(static_cast<int>(M), static_cast<int>(N),
                                                                  static_cast<int>(K), static_cast<int>(num_sms));
  return {p.config, p.splits, p.chunks_per_split};
}

// [row_ctas, splits, chunks_per_split, smem_bytes] of the decode launch for this problem (tests, benchmarks).
std::vector<int64_t> sparse24_decode_plan(int64_t M, int64_t N, int64_t K, int64_t num_sms) {
  const sparsefast::Sp24DecodePlan p = sparsefast::sp24_decode_plan(static_cast<int>(M), static_cast<int>(N),
                                                                      static_cast<int>(K), static_cast<int>(num_sms));
  return {p.row_ctas, p.splits, p.chunks_per_split, static_cast<int64_t>(p.smem_bytes)};
}

// Diagnostic probe: values [2, 256], meta [32] int32, x [8, 64] -> fp32 [8 tokens, 16 rows].
at::Tensor sparse24_probe_tile(const at::Tensor& values, const at::Tensor& meta, const at::Tensor& x) {
  const char* op = "sparse24_probe_tile";
  SF_CHECK_ARG(values.is_cuda() && meta.is_cuda() && x.is_cuda(), op, ": inputs must be CUDA tensors");
  SF_CHECK_ARG(values.numel() == 512 && values.is_contiguous(), op, ": values must be 512 contiguous elements");
  SF_CHECK_ARG(meta.numel() == 32 && meta.scalar_type() == at::kInt && meta.is_contiguous(), op,
              ": meta must be 32 contiguous int32");
  SF_CHECK_ARG(x.numel() == 512 && x.is_contiguous() && x.scalar_type() == values.scalar_type(), op,
              ": x must be [8, 64] contiguous with the values' dtype");
  const sparsefast::DType dtype = half_dtype(values, op);
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty({8, 16}, values.options().dtype(at::kFloat));
  check_cuda_status(sparsefast::sp24_probe_tile(values.data_ptr(), reinterpret_cast<const uint32_t*>(meta.data_ptr()),
                                                x.data_ptr(), out.data_ptr<float>(), dtype,
                                                c10::cuda::getCurrentCUDAStream()),
                    op);
  return out;
}

void register_sparse24(pybind11::module_& m) {
  m.def("sparse24_matmul", &sparse24_matmul, "y[M, N] = x[M, K] @ W^T, W 2:4-packed (sparsefast.ops.sparse24)",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("meta"), pybind11::arg("out_features"),
        pybind11::arg("in_features"), pybind11::arg("kernel") = 0);
  m.def("sparse24_decode_plan", &sparse24_decode_plan, "split-K plan of the decode kernel", pybind11::arg("M"),
        pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("num_sms"));
  m.def("sparse24_gemm_plan", &sparse24_gemm_plan, "config and split-K plan of the GEMM v2 kernel",
        pybind11::arg("M"), pybind11::arg("N"), pybind11::arg("K"), pybind11::arg("num_sms"));
  m.def("sparse24_probe_tile", &sparse24_probe_tile, "one-warp mma.sp probe on a packed 16x64 block");
}

// ---- structured slices ----
// structured_gather(mats, dims, indices): kept rows (dim 0) / columns (dim 1) of every coupled matrix of a layer in
// one launch (sparsefast.ops.structured_gather; torch twin: index_select). Index values are range-checked by the
// Python op (one device sync for all matrices), not here.

std::vector<at::Tensor> structured_gather(const std::vector<at::Tensor>& mats, const std::vector<int64_t>& dims,
                                          const std::vector<at::Tensor>& indices) {
  const char* op = "structured_gather";
  SF_CHECK_ARG(mats.size() == dims.size() && mats.size() == indices.size(), op,
              ": mats, dims and indices must have the same length");
  std::vector<at::Tensor> outs;
  std::vector<sparsefast::GatherDesc> descs;
  if (mats.empty()) return outs;
  const c10::cuda::CUDAGuard guard(mats[0].device());
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor& m = mats[i];
    const at::Tensor& idx = indices[i];
    SF_CHECK_ARG(m.is_cuda() && idx.is_cuda() && m.device() == mats[0].device() && idx.device() == m.device(), op,
                ": matrix ", i, " and its index must be CUDA tensors on one device");
    SF_CHECK_ARG(m.dim() == 1 || m.dim() == 2, op, ": matrix ", i, " must be 1-D or 2-D, got ", sizes_str(m));
    SF_CHECK_ARG(m.is_contiguous() && idx.is_contiguous(), op, ": matrix ", i, " and its index must be contiguous");
    SF_CHECK_ARG(idx.scalar_type() == at::kLong && idx.dim() == 1, op, ": index ", i, " must be 1-D int64");
    const int64_t d = dims[i] < 0 ? dims[i] + m.dim() : dims[i];
    SF_CHECK_ARG(d >= 0 && d < m.dim(), op, ": dim ", dims[i], " out of range for matrix ", i);
    const int64_t eb = m.element_size();
    SF_CHECK_ARG(eb == 1 || eb == 2 || eb == 4 || eb == 8, op, ": unsupported element size ", eb);
    std::vector<int64_t> shape(m.sizes().begin(), m.sizes().end());
    shape[d] = idx.numel();
    outs.push_back(at::empty(shape, m.options()));
    const int64_t rows = m.dim() == 1 ? 1 : m.size(0), cols = m.dim() == 1 ? m.size(0) : m.size(1);
    const int32_t axis = m.dim() == 1 ? 1 : static_cast<int32_t>(d);
    if (outs.back().numel() == 0) continue;
    descs.push_back({m.data_ptr(), outs.back().data_ptr(), idx.data_ptr<int64_t>(), axis == 0 ? idx.numel() : rows,
                     axis == 1 ? idx.numel() : cols, cols, axis, static_cast<int32_t>(eb)});
  }
  check_cuda_status(sparsefast::structured_gather(descs.data(), static_cast<int>(descs.size()),
                                                  c10::cuda::getCurrentCUDAStream()),
                    op);
  return outs;
}

void register_structured(pybind11::module_& m) {
  m.def("structured_gather", &structured_gather,
        "kept rows (dim 0) / columns (dim 1) of many matrices in one launch (sparsefast.ops.structured_gather)",
        pybind11::arg("mats"), pybind11::arg("dims"), pybind11::arg("indices"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparsefast CUDA kernels";
  register_sparse24(m);
  register_structured(m);
}
