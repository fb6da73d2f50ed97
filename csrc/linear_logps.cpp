// Log-probs of labels from hidden states and an lm_head without forming all the logits: the
// rows that have a label are gathered, then processed max_chunk_tokens rows at a time with one matmul
// (cuBLAS or the CPU BLAS through ATen) and the fused row kernels of the token_logps op.
//
// Forward: 1 matmul per chunk, saves the fp32 logsumexp per row. Backward: recompute the
// chunk's logits, overwrite them with their gradient (token_logps_backward_), then
// d(hidden) = G W and d(weight) += G^T h: 3 matmuls per chunk, no [N, V] buffer ever. This is the
// path for token log-probs that callers differentiate further; the preference losses have their
// own three-matmul path (linear_losses.cpp).
//
// Device-generic host code (it only calls ops), registered for CPU and CUDA. Reading the labels
// on the host (to find the rows to keep) synchronizes with the device once per call.
#include <torch/library.h>

#include <array>

#include "linear_common.h"

namespace epa_ext {
namespace {

using linear::call_token_logps;

constexpr const char* kForward = "linear_token_logps";
constexpr const char* kBackward = "linear_token_logps_backward";

// Flat positions of the rows whose label is kept, on the device of labels.
at::Tensor kept_rows(const char* op, const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  const at::Tensor host = linear::host_labels(op, labels, vocab, ignore_index);
  const int64_t* y = host.const_data_ptr<int64_t>();
  std::vector<int64_t> rows;
  for (int64_t i = 0, n = host.numel(); i < n; ++i) {
    if (y[i] != ignore_index) rows.push_back(i);
  }
  return linear::to_device(rows, labels.device());
}

std::tuple<at::Tensor, at::Tensor> linear_token_logps(const at::Tensor& hidden, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& labels, int64_t ignore_index,
                                                      int64_t max_chunk_tokens, bool /*fp32_weight_grad*/,
                                                      std::optional<double> softcap) {
  linear::check_linear_inputs(kForward, hidden, weight, bias, labels);
  check_softcap(kForward, softcap);
  TORCH_CHECK_VALUE(hidden.dim() == 2, kForward, ": hidden must have shape [N, H]; got ", hidden.sizes());
  const int64_t chunk = linear::chunk_tokens(kForward, "max_chunk_tokens", max_chunk_tokens, hidden.size(1));
  const auto options = hidden.options().dtype(accumulate_dtype(hidden));
  at::Tensor logps = at::zeros({hidden.size(0)}, options);
  at::Tensor lse = at::zeros({hidden.size(0)}, options);
  const at::Tensor kept = kept_rows(kForward, labels, weight.size(0), ignore_index);
  const int64_t num_kept = kept.size(0);
  linear::ChunkLogits chunk_buffer(std::min(chunk, num_kept), weight);
  for (int64_t start = 0; start < num_kept; start += chunk) {
    const at::Tensor rows = kept.slice(0, start, std::min(start + chunk, num_kept));
    const at::Tensor logits = chunk_buffer.compute(hidden.index_select(0, rows), weight, bias);
    auto [chunk_logps, chunk_lse] = call_token_logps(logits, labels.index_select(0, rows), ignore_index, softcap);
    logps.index_copy_(0, rows, chunk_logps);
    lse.index_copy_(0, rows, chunk_lse);
  }
  return {logps, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logps_backward(
    const at::Tensor& grad_logps, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps,
    int64_t ignore_index, int64_t max_chunk_tokens, std::array<bool, 3> output_mask, bool fp32_weight_grad,
    std::optional<double> softcap) {
  linear::check_linear_inputs(kBackward, hidden, weight, bias, labels);
  check_softcap(kBackward, softcap);
  TORCH_CHECK_VALUE(hidden.dim() == 2, kBackward, ": hidden must have shape [N, H]; got ", hidden.sizes());
  check_gradient_and_saved(kBackward, grad_logps, hidden, labels, lse, logps);
  const int64_t chunk = linear::chunk_tokens(kBackward, "max_chunk_tokens", max_chunk_tokens, hidden.size(1));
  const auto [need_hidden, need_weight, need_bias] = output_mask;
  const bool reduced = hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf;
  const at::ScalarType param_acc = fp32_weight_grad && reduced ? at::kFloat : weight.scalar_type();
  at::Tensor grad_hidden = need_hidden ? at::zeros_like(hidden, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor grad_weight = need_weight ? at::zeros(weight.sizes(), weight.options().dtype(param_acc)) : at::Tensor();
  at::Tensor grad_bias = need_bias && bias.has_value() ? at::zeros({weight.size(0)}, weight.options().dtype(param_acc))
                                                       : at::Tensor();

  const at::Tensor kept = kept_rows(kBackward, labels, weight.size(0), ignore_index);
  const int64_t num_kept = kept.size(0);
  const at::Tensor acc_grad = grad_logps.to(lse.scalar_type());
  linear::ChunkLogits chunk_buffer(std::min(chunk, num_kept), weight);
  for (int64_t start = 0; start < num_kept; start += chunk) {
    const at::Tensor rows = kept.slice(0, start, std::min(start + chunk, num_kept));
    const at::Tensor h = hidden.index_select(0, rows);
    at::Tensor g = chunk_buffer.compute(h, weight, bias);  // logits now, their gradient G below
    linear::call_token_logps_backward_(acc_grad.index_select(0, rows), g, labels.index_select(0, rows),
                                       lse.index_select(0, rows), logps.index_select(0, rows), ignore_index,
                                       softcap);
    if (grad_hidden.defined()) grad_hidden.index_copy_(0, rows, at::mm(g, weight));
    if (grad_weight.defined()) linear::accumulate_weight_grad(grad_weight, g, h);
    if (grad_bias.defined()) grad_bias.add_(g.sum(0, /*keepdim=*/false, param_acc));
  }
  if (grad_weight.defined()) grad_weight = grad_weight.to(weight.scalar_type());
  if (grad_bias.defined()) grad_bias = grad_bias.to(weight.scalar_type());
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(epa_ext, CPU, m) {
  m.impl("linear_token_logps", &linear_token_logps);
  m.impl("linear_token_logps_backward", &linear_token_logps_backward);
}

TORCH_LIBRARY_IMPL(epa_ext, CUDA, m) {
  m.impl("linear_token_logps", &linear_token_logps);
  m.impl("linear_token_logps_backward", &linear_token_logps_backward);
}

}  // namespace epa_ext
