// Pieces shared by the two fused-linear ops (linear_logps.cpp: token log-probs, recomputing
// backward; linear_losses.cpp: the preference losses with the gradient formed in the forward):
// argument checks, the chunk budget, the host-side look at the labels, the chunk matmuls and the
// calls into the row kernels of token_logps.
//
// Device-generic: only ATen ops and dispatcher calls, so the same code runs for CPU and CUDA.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/version.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "logps_checks.h"

namespace epa_ext::linear {

// Tokens per chunk by default: H, so that a chunk's [n, V] logits take as much memory as the
// [V, H] lm_head (and its gradient, which exists anyway); at least kMinChunkTokens, so that the
// small lm_heads of small models still fit a whole DPO pair or EPA group of short answers in one
// chunk (see docs/losses.md, "Fused-linear path").
constexpr int64_t kMinChunkTokens = 512;

inline int64_t chunk_tokens(const char* op, const char* name, int64_t requested, int64_t hidden_size) {
  TORCH_CHECK_VALUE(requested >= 0, op, ": ", name, " must be a positive number of tokens (0: automatic, max(H, ",
                    kMinChunkTokens, ")); got ", requested);
  return requested > 0 ? requested : std::max(kMinChunkTokens, hidden_size);
}

// hidden [..., H] and labels [...] (the same leading shape), weight [V, H], bias [V] or none.
inline void check_linear_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const at::Tensor& labels) {
  TORCH_CHECK_VALUE(hidden.dim() >= 2, op, ": hidden must have shape [N, H] or [R, T, H]; got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must have shape [V, H] (the lm_head); got ", weight.sizes());
  TORCH_CHECK_TYPE(is_supported_logits_dtype(hidden.scalar_type()), op,
                   ": hidden must be float32, bfloat16, float16 or float64; got ", hidden.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), op,
                   ": weight and hidden must have the same dtype; got ", weight.scalar_type(), " and ",
                   hidden.scalar_type());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(-1), op, ": weight must have H = ", hidden.size(-1),
                    " columns (the hidden size); got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, op, ": weight has an empty vocabulary dimension (V = 0)");
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), op, ": weight must be on the device of hidden (",
                    hidden.device(), "); got ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [V] = [",
                      weight.size(0), "]; got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), op, ": bias must have the dtype of hidden (",
                     hidden.scalar_type(), "); got ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == hidden.device(), op, ": bias must be on the device of hidden (",
                      hidden.device(), "); got ", bias->device());
  }
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64 (torch.long); got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.sizes() == hidden.sizes().slice(0, hidden.dim() - 1), op,
                    ": labels must have the shape of hidden without its last dimension (",
                    hidden.sizes().slice(0, hidden.dim() - 1), "); got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == hidden.device(), op, ": labels must be on the device of hidden (",
                    hidden.device(), "); got ", labels.device());
}

// The labels on the host: the one synchronization of a fused-linear call (the kept rows and
// their grouping are planned there). Checks every label against [0, V), reporting the caller's
// index into labels, which the row kernels (seeing only the kept rows) could not.
inline at::Tensor host_labels(const char* op, const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  at::Tensor host = labels.to(at::kCPU).contiguous();
  const int64_t* y = host.const_data_ptr<int64_t>();
  for (int64_t i = 0, n = host.numel(); i < n; ++i) {
    if (y[i] == ignore_index || (y[i] >= 0 && y[i] < vocab)) continue;
    std::vector<int64_t> index(labels.dim());
    for (int64_t d = labels.dim() - 1, rest = i; d >= 0; --d) {
      index[d] = rest % labels.size(d);
      rest /= labels.size(d);
    }
    // 1-D labels are the caller's labels flattened (linear_token_logps): say so.
    const std::string where = labels.dim() == 1 ? "flat position " + std::to_string(i) + " of labels"
                                                : "labels" + c10::str(at::IntArrayRef(index));
    TORCH_CHECK_VALUE(false, op, ": labels must lie in [0, V) = [0, ", vocab, ") or equal ignore_index (",
                      ignore_index, "); got ", y[i], " at ", where);
  }
  return host;
}

// A host int64 vector as a tensor on device (through pinned memory, without waiting for it).
inline at::Tensor to_device(const std::vector<int64_t>& values, const at::Device& device) {
  const auto n = static_cast<int64_t>(values.size());
  const bool pinned = !device.is_cpu();
  at::Tensor host = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
  std::copy(values.begin(), values.end(), host.data_ptr<int64_t>());
  return pinned ? host.to(device, /*non_blocking=*/true) : host;
}

// The logits of one chunk after another in one buffer of [rows, V]: a fresh [n, V] tensor per
// chunk would have the allocator hand out (and, on the CPU, the OS fault in) that many bytes for
// every chunk.
class ChunkLogits {
 public:
  ChunkLogits(int64_t rows, const at::Tensor& weight) : buffer_(at::empty({rows, weight.size(0)}, weight.options())) {}

  // h [n, H], n <= rows: a view of the buffer holding h W^T (+ bias).
  at::Tensor compute(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    at::Tensor out = buffer_.narrow(0, 0, h.size(0));
    if (bias.has_value()) {
      at::addmm_out(out, *bias, h, weight.t());
    } else {
      at::mm_out(out, h, weight.t());
    }
    return out;
  }

 private:
  at::Tensor buffer_;
};

inline std::tuple<at::Tensor, at::Tensor> call_token_logps(const at::Tensor& logits, const at::Tensor& labels,
                                                           int64_t ignore_index,
                                                           const std::optional<double>& softcap) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epa_ext::token_logps", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                                       bool, std::optional<double>)>();
  return op.call(logits, labels, ignore_index, false, softcap);
}

// Overwrites logits with d(loss)/d(logits) = grad * (onehot - softmax) (times the softcap's
// slope), row by row.
inline void call_token_logps_backward_(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                       const at::Tensor& lse, const at::Tensor& logps, int64_t ignore_index,
                                       const std::optional<double>& softcap) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epa_ext::token_logps_backward_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, int64_t, std::optional<double>)>();
  op.call(grad, logits, labels, lse, logps, ignore_index, softcap);
}

// True when this torch's addmm takes bf16/fp16 matrices with an fp32 self and output
// (addmm.dtype_out accepting an fp32 self arrived after out_dtype itself); probed once per process.
inline bool addmm_accumulates_in_fp32(const at::Device& device) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  static std::once_flag once;
  static bool supported = false;
  std::call_once(once, [&] {
    const auto half = at::TensorOptions().dtype(at::kBFloat16).device(device);
    at::Tensor acc = at::zeros({1, 1}, half.dtype(at::kFloat));
    try {
      at::addmm_out(acc, acc, at::ones({1, 1}, half), at::ones({1, 1}, half), at::kFloat);
      supported = true;
    } catch (const c10::Error&) {
      supported = false;
    }
  });
  return supported;
#else
  (void)device;
  return false;
#endif
}

// grad_weight += g^T h for a chunk (g [n, V] the logits' gradient, h [n, H] its hidden rows).
// grad_weight is in the weight's dtype, or fp32 for bf16/fp16 weights with fp32 accumulation:
// then one matmul with an fp32 output where torch has one (CUDA, torch >= 2.8), else the
// products of the fp32-converted chunk (CPU: exact products, one fp32 sum).
inline void accumulate_weight_grad(at::Tensor& grad_weight, const at::Tensor& g, const at::Tensor& h) {
  if (grad_weight.scalar_type() == g.scalar_type()) {
    grad_weight.addmm_(g.t(), h);
    return;
  }
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (g.is_cuda()) {
    if (addmm_accumulates_in_fp32(g.device())) {
      at::addmm_out(grad_weight, grad_weight, g.t(), h, at::kFloat);
    } else {
      grad_weight.add_(at::mm(g.t(), h, at::kFloat));
    }
    return;
  }
#endif
  if (g.is_cuda()) {  // torch < 2.8: a product in the weight's dtype, rounded once per chunk
    grad_weight.add_(at::mm(g.t(), h));
    return;
  }
  grad_weight.addmm_(g.t().to(at::kFloat), h.to(at::kFloat));
}

}  // namespace epa_ext::linear
