// The CPU extension's only torch file: registers the CPU sparse linear ops with the torch dispatcher
// (TORCH_LIBRARY_FRAGMENT, namespace `sparsefast`) instead of a pybind11 module. Why: the ops then exist as
// torch.ops.sparsefast.* with a schema (torch.compile, opcheck and fake kernels work without Python wrappers of our
// own), the shared object needs no Python ABI (loaded with torch.ops.load_library), and threads come from torch's
// own pool (at::parallel_for honours torch.set_num_threads) rather than a second thread pool in the process.
// Tensor checks here guard memory safety; sparsefast/ops/*.py raise the user-facing errors before calling in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>


#include "cpu/attention_cpu.h"
#include "cpu/linear_cpu.h"

namespace {

using sparsefast_cpu::kBlockCols;
using sparsefast_cpu::kTileRows;

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

void check_input(const at::Tensor& x, const at::Tensor& weight, int64_t in_features, int64_t isa) {
  TORCH_CHECK_VALUE(isa == sparsefast_cpu::kAuto || sparsefast_cpu::isa_supported(static_cast<int>(isa)),
                    "cpu linear: instruction set ", isa, " is not supported on this CPU (best: ",
                    sparsefast_cpu::best_isa(), ")");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in_features, "cpu linear: x must be [..., ", in_features, "]");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                    "cpu linear: x must be float32 or bfloat16");
  TORCH_CHECK_VALUE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16 ||
                        weight.scalar_type() == at::kChar,
                    "cpu linear: weights must be float32, bfloat16 or int8 (with scales)");
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), "cpu linear: CPU tensors only");
}

// The ValueType of `values` and its per-row scales (int8 values need fp32 scales [out_features]; others take none).
std::pair<int, const float*> value_type(const at::Tensor& values, const std::optional<at::Tensor>& scales,
                                        int64_t out_features) {
  if (values.scalar_type() != at::kChar) {
    TORCH_CHECK_VALUE(!scales.has_value(), "cpu linear: scales are for int8 values only");
    return {values.scalar_type() == at::kBFloat16 ? sparsefast_cpu::kBf16 : sparsefast_cpu::kFloat32, nullptr};
  }
  TORCH_CHECK_VALUE(scales.has_value() && scales->scalar_type() == at::kFloat && scales->dim() == 1 &&
                        scales->numel() == out_features && scales->is_contiguous() && scales->device().is_cpu(),
                    "cpu linear: int8 values need float32 scales [", out_features, "] (one per output row)");
  return {sparsefast_cpu::kInt8, scales->data_ptr<float>()};
}

void check_common(const at::Tensor& x, const at::Tensor& values, int64_t in_features, int64_t isa) {
  check_input(x, values, in_features, isa);
  TORCH_CHECK_VALUE(values.is_contiguous(), "sparse linear: packed tensors must be contiguous");
}

// x [..., in] as fp32 [M, kp], zero-padded: x itself when it already is that.
at::Tensor padded_input(const at::Tensor& x, int64_t in_features, int64_t kp) {
  const int64_t m = x.numel() / in_features;
  if (in_features == kp) {  // no padding: x itself, or one conversion (a bf16 decode step's every call)
    if (x.scalar_type() == at::kFloat && x.is_contiguous()) return x.view({m, kp});
    return x.reshape({m, kp}).to(at::kFloat).contiguous();
  }
  at::Tensor xf = at::zeros({m, kp}, x.options().dtype(at::kFloat));
  xf.narrow(1, 0, in_features).copy_(x.reshape({m, in_features}));
  return xf;
}

at::Tensor float_bias(const std::optional<at::Tensor>& bias, int64_t out_features) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == out_features && bias->device().is_cpu(),
                    "sparse linear: bias must be a CPU tensor [", out_features, "]");
  return bias->to(at::kFloat).contiguous();
}

at::Tensor output_like(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = out_features;
  return at::empty(sizes, x.options().dtype(at::kFloat));
}

// y [..., out] in x's dtype = `kernel` over every tile of w, x read as fp32 [M, kp] (zero-padded), on torch's intra-op
// threads (at::parallel_for, OpenMP in the CPU wheel). Ad-hoc timings (not a committed result) on the
// 2-core AMD EPYC: inside `sparsefast serve` (the engine thread is the one thread running torch ops) a 2:4 SmolLM2
// token takes 34-39 ms. Where several threads of one process have run torch ops (a script that loads the model on
// the main thread and decodes from another), libgomp throttles its spin-waiting and each call pays a worker wake-up:
// 55-63 ms. A pool of our own that keeps spinning whichever thread calls fixed that case (31-38 ms) but made the
// server 10x slower: its workers and torch's OpenMP workers then spun against each other on the two cores.
// A bf16 x with no padding (every bf16 decode step's call) is widened into, and y computed in, this thread's fp32
// scratch; y is then rounded to bf16 (round to nearest even, as Tensor.to) by the threads that computed its rows: no
// conversion op per call (two dispatched .to() calls per linear were a measurable part of a bf16 decode step).
std::vector<float>& scratch(int which, size_t n) {
  thread_local std::vector<float> buffers[2];
  if (buffers[which].size() < n) buffers[which].resize(n);
  return buffers[which];
}

template <typename Weight, typename Kernel>
at::Tensor run_tiles(const at::Tensor& x, const Weight& w, int64_t in_features, int64_t tiles,
                     const std::optional<at::Tensor>& bias, int64_t isa, Kernel kernel) {
  constexpr int64_t kGrain = 2;  // tiles (16 rows) per thread at least
  const at::Tensor bf = float_bias(bias, w.n);
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kBFloat16 && in_features == w.kp && x.is_contiguous()) {
    const int64_t m = x.numel() / in_features, n = w.n;
    float* xp = scratch(0, m * in_features).data();
    const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < m * in_features; ++i) xp[i] = static_cast<float>(xb[i]);
    float* yf = scratch(1, m * n).data();
    std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
    sizes.back() = n;
    at::Tensor y = at::empty(sizes, x.options());
    c10::BFloat16* yb = y.data_ptr<c10::BFloat16>();
    at::parallel_for(0, tiles, kGrain, [&](int64_t t0, int64_t t1) {
      kernel(w, xp, m, bp, yf, t0, t1, static_cast<int>(isa));
      const int64_t r0 = t0 * kTileRows, r1 = std::min(n, t1 * kTileRows);
      for (int64_t row = 0; row < m; ++row)
        for (int64_t c = r0; c < r1; ++c) yb[row * n + c] = c10::BFloat16(yf[row * n + c]);
    });
    return y;
  }
  const at::Tensor xf = padded_input(x, in_features, w.kp);
  at::Tensor y = output_like(x, w.n);
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t m = xf.size(0);
  at::parallel_for(0, tiles, kGrain, [&](int64_t t0, int64_t t1) {
    kernel(w, xp, m, bp, yp, t0, t1, static_cast<int>(isa));
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// y [..., out] in x's dtype with x quantized per token and 32-column block to int8 (linear_cpu.h, "int8
// activations"), on torch's intra-op threads; kq: the bytes of a quantized row (linear_cpu.h: per layout).
template <typename Weight, typename Kernel>
at::Tensor run_tiles_int8_act(const at::Tensor& x, const Weight& w, int64_t in_features, int64_t kq, int64_t tiles,
                              const std::optional<at::Tensor>& bias, int64_t isa, Kernel kernel) {
  constexpr int64_t kGrain = 2;
  TORCH_CHECK_VALUE(w.vtype == sparsefast_cpu::kInt8, "cpu linear: int8 activations need int8 values (with scales)");
  const int64_t level = isa == sparsefast_cpu::kAuto ? sparsefast_cpu::best_isa() : isa;
  TORCH_CHECK_VALUE(level == sparsefast_cpu::kAvx512Vbmi, "cpu linear: int8 activations run at instruction set ",
                    sparsefast_cpu::kAvx512Vbmi, " (avx512vbmi: AVX-512 VNNI + VBMI, Ice Lake / Zen 4 or later), not ",
                    level);
  const at::Tensor bf = float_bias(bias, w.n);
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const int64_t m = x.numel() / in_features;
  const at::Tensor xf = x.reshape({m, in_features}).to(at::kFloat).contiguous();
  thread_local std::vector<uint8_t> q;
  thread_local std::vector<float> xs;
  const int64_t blocks = m * kq / sparsefast_cpu::kActBlock;
  if (q.size() < static_cast<size_t>(m * kq)) q.resize(m * kq);
  if (xs.size() < static_cast<size_t>(blocks)) xs.resize(blocks);
  sparsefast_cpu::quantize_input_int8(xf.data_ptr<float>(), m, in_features, in_features, kq, q.data(), xs.data());
  at::Tensor y = output_like(x, w.n);
  float* yp = y.data_ptr<float>();
  const uint8_t* qp = q.data();
  const float* sp = xs.data();
  at::parallel_for(0, tiles, kGrain, [&](int64_t t0, int64_t t1) { kernel(w, qp, sp, kq, m, bp, yp, t0, t1); });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor sparse24_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                               const std::optional<at::Tensor>& bias, int64_t out_features, int64_t in_features,
                               int64_t isa, const std::optional<at::Tensor>& scales, bool int8_activations) {
  check_common(x, values, in_features, isa);
  const int64_t kp = round_up(in_features, kBlockCols), tiles = round_up(out_features, kTileRows) / kTileRows;
  TORCH_CHECK_VALUE(values.dim() == 4 && values.size(0) == tiles && values.size(1) == kp / kBlockCols &&
                        values.size(2) == kTileRows && values.size(3) == 16,
                    "sparse24 linear: values must be [", tiles, ", ", kp / kBlockCols, ", 8, 16]");
  TORCH_CHECK_VALUE(meta.scalar_type() == at::kInt && meta.is_contiguous() && meta.device().is_cpu() &&
                        meta.dim() == 3 && meta.size(0) == tiles && meta.size(1) == kp / kBlockCols &&
                        meta.size(2) == kTileRows,
                    "sparse24 linear: meta must be int32 [", tiles, ", ", kp / kBlockCols, ", 8]");
  const auto [vtype, sp] = value_type(values, scales, out_features);
  const sparsefast_cpu::Sparse24Weight w{values.data_ptr(), vtype, sp,
                                         reinterpret_cast<const uint32_t*>(meta.data_ptr<int32_t>()), out_features, kp};
  if (int8_activations)
    return run_tiles_int8_act(x, w, in_features, kp, tiles, bias, isa, sparsefast_cpu::sparse24_linear_tiles_int8_act);
  return run_tiles(x, w, in_features, tiles, bias, isa, sparsefast_cpu::sparse24_linear_tiles);
}

at::Tensor sparse_unstructured_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                                          const at::Tensor& tile_offsets, const std::optional<at::Tensor>& bias,
                                          int64_t out_features, int64_t in_features, int64_t isa,
                                          const std::optional<at::Tensor>& scales, bool int8_activations) {
  check_common(x, values, in_features, isa);
  const int64_t kp = round_up(in_features, 16), tiles = round_up(out_features, kTileRows) / kTileRows;
  TORCH_CHECK_VALUE(mask.scalar_type() == at::kShort && mask.is_contiguous() && mask.device().is_cpu() &&
                        mask.dim() == 3 && mask.size(0) == tiles && mask.size(1) == kp / 16 &&
                        mask.size(2) == kTileRows,
                    "sparse linear: mask must be int16 [", tiles, ", ", kp / 16, ", 8]");
  TORCH_CHECK_VALUE(tile_offsets.scalar_type() == at::kLong && tile_offsets.dim() == 1 &&
                        tile_offsets.numel() == tiles + 1 && tile_offsets.is_contiguous() &&
                        tile_offsets.device().is_cpu(),
                    "sparse linear: tile_offsets must be int64 [", tiles + 1, "]");
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() >= tile_offsets.data_ptr<int64_t>()[tiles] + 16,
                    "sparse linear: values must be 1-D with 16 elements of padding after the last tile");
  const auto [vtype, sp] = value_type(values, scales, out_features);
  const sparsefast_cpu::UnstructuredWeight w{values.data_ptr(), vtype, sp,
                                             reinterpret_cast<const uint16_t*>(mask.data_ptr<int16_t>()),
                                             tile_offsets.data_ptr<int64_t>(), out_features, kp};
  if (int8_activations)
    return run_tiles_int8_act(x, w, in_features, round_up(kp, sparsefast_cpu::kActBlock), tiles, bias, isa,
                              sparsefast_cpu::unstructured_linear_tiles_int8_act);
  return run_tiles(x, w, in_features, tiles, bias, isa, sparsefast_cpu::unstructured_linear_tiles);
}

// y = x Wᵀ (+ bias) with W [out, in] as it is stored (row-major rows, any row stride: a view of a larger matrix too).
at::Tensor dense_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t isa, const std::optional<at::Tensor>& scales, bool int8_activations) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0 &&
                        (weight.stride(1) == 1 || weight.size(1) == 1) && weight.stride(0) >= weight.size(1),
                    "dense linear: weight must be a 2-D [out, in] tensor with unit column stride");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  check_input(x, weight, in_features, isa);
  const int64_t kp = round_up(in_features, 16), tiles = round_up(out_features, kTileRows) / kTileRows;
  const auto [vtype, sp] = value_type(weight, scales, out_features);
  const sparsefast_cpu::DenseWeight w{weight.data_ptr(), vtype, sp, out_features, in_features, weight.stride(0), kp};
  if (int8_activations)
    return run_tiles_int8_act(x, w, in_features, round_up(in_features, 64), tiles, bias, isa,
                              sparsefast_cpu::dense_linear_tiles_int8_act);
  return run_tiles(x, w, in_features, tiles, bias, isa, sparsefast_cpu::dense_linear_tiles);
}

// out [B, heads, head_dim] = decode attention of q [B, heads, head_dim] over the cache rows `slots` [B], keys
// 0..positions[b] of row b (attention_cpu.h); keys/values: the cache [rows, kv_heads, max_len, head_dim] as stored.
at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                                const at::Tensor& slots, const at::Tensor& positions, double scale, int64_t isa) {
  TORCH_CHECK_VALUE(isa == sparsefast_cpu::kAuto || sparsefast_cpu::isa_supported(static_cast<int>(isa)),
                    "decode attention: instruction set ", isa, " is not supported on this CPU");
  TORCH_CHECK_VALUE(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes() &&
                        values.strides() == keys.strides(),
                    "decode attention: q must be [batch, heads, head_dim] and keys, values the cache "
                    "[rows, kv_heads, max_len, head_dim] with equal strides");
  TORCH_CHECK_VALUE((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                        keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(),
                    "decode attention: q, keys and values must all be float32 or all bfloat16");
  TORCH_CHECK_VALUE(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu() &&
                        slots.device().is_cpu() && positions.device().is_cpu(),
                    "decode attention: CPU tensors only");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = keys.size(1);
  TORCH_CHECK_VALUE(keys.size(3) == head_dim && keys.stride(3) == 1 && head_dim > 0 &&
                        head_dim <= sparsefast_cpu::kMaxHeadDim,
                    "decode attention: the cache's head_dim must equal q's (1 to ", sparsefast_cpu::kMaxHeadDim,
                    ") with unit stride");
  TORCH_CHECK_VALUE(kv_heads > 0 && heads % kv_heads == 0, "decode attention: heads (", heads,
                    ") must be a multiple of kv_heads (", kv_heads, ")");
  TORCH_CHECK_VALUE(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                        slots.numel() == batch && positions.numel() == batch,
                    "decode attention: slots and positions must be int64 with one entry per sequence");
  const at::Tensor qc = q.contiguous(), sc = slots.contiguous(), pc = positions.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  const int64_t* pp = pc.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(sp[b] >= 0 && sp[b] < keys.size(0), "decode attention: slot ", sp[b], " is not a cache row");
    TORCH_CHECK_VALUE(pp[b] >= 0 && pp[b] < keys.size(2), "decode attention: position ", pp[b],
                      " is outside the cache (max_len ", keys.size(2), ")");
    longest = std::max(longest, pp[b] + 1);
  }
  at::Tensor out = at::empty({batch, heads, head_dim}, q.options());
  if (batch * heads == 0) return out;
  // a KV head's query heads run as one task (its rows read once), unless sequences x KV heads are too few to give
  // each thread 4 tasks: then the group is split (batch 1 of a small model)
  const int64_t group = heads / kv_heads, threads = at::get_num_threads();
  const int64_t split = std::clamp<int64_t>((4 * threads + batch * kv_heads - 1) / (batch * kv_heads), 1, group);
  const sparsefast_cpu::DecodeAttentionArgs args{
      qc.data_ptr(), keys.data_ptr(), values.data_ptr(),
      q.scalar_type() == at::kBFloat16 ? sparsefast_cpu::kBf16 : sparsefast_cpu::kFloat32, sp, pp, heads, kv_heads,
      head_dim, keys.stride(0), keys.stride(1), keys.stride(2), static_cast<float>(scale), out.data_ptr(), split};
  const size_t floats = sparsefast_cpu::decode_attention_scratch(args, longest, static_cast<int>(isa));
  // a thread takes at least ~16K multiply-adds of tasks: a short context runs on the calling thread alone
  const int64_t task_macs = 2 * longest * head_dim * sparsefast_cpu::heads_per_task(args);
  const int64_t grain = std::max<int64_t>(1, 16384 / task_macs);
  at::parallel_for(0, batch * kv_heads * split, grain, [&](int64_t t0, int64_t t1) {
    sparsefast_cpu::decode_attention_tasks(args, t0, t1, scratch(0, floats).data(), static_cast<int>(isa));
  });
  return out;
}

int64_t cpu_best_isa() { return sparsefast_cpu::best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsefast, m) {
  // x [..., in_features] float32 | bfloat16 -> y [..., out_features] in x's dtype; values/weight float32, bfloat16
  // or int8 with scales (float32 [out_features], W[row] = scales[row] * values[row]); int8_activations (int8 values
  // only, instruction set avx512vbmi): x quantized to int8 per token and 32-column block, integer dot products
  // (linear_cpu.h). No argument has a default: inductor's C++ wrapper drops a defaulted bool from the calls it
  // generates (torch 2.13), and sparsefast/serve/compiled.py relies on every call passing every argument.
  m.def("sparse24_linear_cpu(Tensor x, Tensor values, Tensor meta, Tensor? bias, int out_features, "
        "int in_features, int isa, Tensor? scales, bool int8_activations) -> Tensor");
  m.def("sparse_unstructured_linear_cpu(Tensor x, Tensor values, Tensor mask, Tensor tile_offsets, Tensor? bias, "
        "int out_features, int in_features, int isa, Tensor? scales, bool int8_activations) -> Tensor");
  m.def("dense_linear_cpu(Tensor x, Tensor weight, Tensor? bias, int isa, Tensor? scales, bool int8_activations) "
        "-> Tensor");
  // q [B, heads, head_dim] -> out [B, heads, head_dim] (q's dtype); keys, values: a KV cache [rows, kv_heads,
  // max_len, head_dim] read in place at rows `slots`, positions 0..positions[b]
  m.def("decode_attention_cpu(Tensor q, Tensor keys, Tensor values, Tensor slots, Tensor positions, float scale, "
        "int isa) -> Tensor");
  m.def("cpu_best_isa() -> int", &cpu_best_isa);
}

TORCH_LIBRARY_IMPL(sparsefast, CPU, m) {
  m.impl("sparse24_linear_cpu", &sparse24_linear_cpu);
  m.impl("sparse_unstructured_linear_cpu", &sparse_unstructured_linear_cpu);
  m.impl("dense_linear_cpu", &dense_linear_cpu);
  m.impl("decode_attention_cpu", &decode_attention_cpu);
}
