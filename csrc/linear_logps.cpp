// Log-probs of labels from hidden states and an lm_head without forming all the logits: the
// rows that have a label are gathered, then processed chunk_size rows at a time with one matmul
// (cuBLAS or the CPU BLAS through ATen) and the fused row kernels of the token_logps op.
//
// Forward: 1 matmul per chunk, saves the fp32 logsumexp per row. Backward: recompute the
// chunk's logits, overwrite them with their gradient (token_logps_backward_), then
// d(hidden) = G W and d(weight) += G^T h: 3 matmuls per chunk, no [N, V] buffer ever.
//
// Device-generic host code (it only calls ops), registered for CPU and CUDA. Finding the rows to
// keep (nonzero) synchronizes with the device once per call.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <optional>

#include "logps_checks.h"

namespace epa_ext {
namespace {

constexpr int64_t kMinChunkRows = 256;

void check_linear_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& labels) {
  constexpr const char* op = "linear_token_logps";
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must have shape [N, H]; got ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have shape [V, H] (the lm_head); got ", weight.sizes());
  TORCH_CHECK(is_supported_logits_dtype(hidden.scalar_type()), op,
              ": hidden must be float32, bfloat16, float16 or float64; got ", hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight and hidden must have the same dtype; got ",
              weight.scalar_type(), " and ", hidden.scalar_type());
  TORCH_CHECK(weight.size(1) == hidden.size(1), op, ": weight must have H = ", hidden.size(1),
              " columns (the hidden size); got shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": weight has an empty vocabulary dimension (V = 0)");
  TORCH_CHECK(weight.device() == hidden.device(), op, ": weight must be on the device of hidden (", hidden.device(),
              "); got ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [V] = [",
                weight.size(0), "]; got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type() && bias->device() == hidden.device(), op,
                ": bias must match hidden in dtype and device; got ", bias->scalar_type(), " on ", bias->device());
  }
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64 (torch.long); got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0), op, ": labels must have shape [N] = [",
              hidden.size(0), "]; got ", labels.sizes());
  TORCH_CHECK(labels.device() == hidden.device(), op, ": labels must be on the device of hidden (", hidden.device(),
              "); got ", labels.device());
}

// Rows per chunk: about H rows, so that a chunk's logits take about as much memory as the lm_head
// itself and each matmul is large enough to run near peak.
int64_t rows_per_chunk(int64_t requested, int64_t hidden_size) {
  return requested > 0 ? requested : std::max(kMinChunkRows, hidden_size);
}

at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
}

std::tuple<at::Tensor, at::Tensor> call_token_logps(const at::Tensor& logits, const at::Tensor& labels,
                                                    int64_t ignore_index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epa_ext::token_logps", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  return op.call(logits, labels, ignore_index, false);
}

void call_token_logps_backward_(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                const at::Tensor& lse, const at::Tensor& logps, int64_t ignore_index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epa_ext::token_logps_backward_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, int64_t)>();
  op.call(grad, logits, labels, lse, logps, ignore_index);
}

std::tuple<at::Tensor, at::Tensor> linear_token_logps(const at::Tensor& hidden, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& labels, int64_t ignore_index,
                                                      int64_t chunk_size, bool /*fp32_weight_grad*/) {
  check_linear_inputs(hidden, weight, bias, labels);
  const auto options = hidden.options().dtype(accumulate_dtype(hidden));
  at::Tensor logps = at::zeros({hidden.size(0)}, options);
  at::Tensor lse = at::zeros({hidden.size(0)}, options);
  const at::Tensor kept = (labels != ignore_index).nonzero().squeeze(1);
  const int64_t num_kept = kept.size(0), chunk = rows_per_chunk(chunk_size, hidden.size(1));
  for (int64_t start = 0; start < num_kept; start += chunk) {
    const at::Tensor rows = kept.slice(0, start, std::min(start + chunk, num_kept));
    const at::Tensor logits = chunk_logits(hidden.index_select(0, rows), weight, bias);
    auto [chunk_logps, chunk_lse] = call_token_logps(logits, labels.index_select(0, rows), ignore_index);
    logps.index_copy_(0, rows, chunk_logps);
    lse.index_copy_(0, rows, chunk_lse);
  }
  return {logps, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_token_logps_backward(
    const at::Tensor& grad_logps, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps,
    int64_t ignore_index, int64_t chunk_size, std::array<bool, 3> output_mask, bool fp32_weight_grad) {
  check_linear_inputs(hidden, weight, bias, labels);
  TORCH_CHECK(grad_logps.sizes() == labels.sizes() && lse.sizes() == labels.sizes() && logps.sizes() == labels.sizes(),
              "linear_token_logps_backward: grad_logps, lse and logps must have the shape of labels (", labels.sizes(),
              "); got ", grad_logps.sizes(), ", ", lse.sizes(), " and ", logps.sizes());
  const auto [need_hidden, need_weight, need_bias] = output_mask;
  const bool reduced = hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf;
  const at::ScalarType param_acc = fp32_weight_grad && reduced ? at::kFloat : weight.scalar_type();
  at::Tensor grad_hidden = need_hidden ? at::zeros_like(hidden, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor grad_weight = need_weight ? at::zeros(weight.sizes(), weight.options().dtype(param_acc)) : at::Tensor();
  at::Tensor grad_bias = need_bias && bias.has_value() ? at::zeros({weight.size(0)}, weight.options().dtype(param_acc))
                                                       : at::Tensor();

  const at::Tensor kept = (labels != ignore_index).nonzero().squeeze(1);
  const int64_t num_kept = kept.size(0), chunk = rows_per_chunk(chunk_size, hidden.size(1));
  const at::Tensor acc_grad = grad_logps.to(lse.scalar_type());
  for (int64_t start = 0; start < num_kept; start += chunk) {
    const at::Tensor rows = kept.slice(0, start, std::min(start + chunk, num_kept));
    const at::Tensor h = hidden.index_select(0, rows);
    at::Tensor g = chunk_logits(h, weight, bias);  // logits now, their gradient G below
    call_token_logps_backward_(acc_grad.index_select(0, rows), g, labels.index_select(0, rows),
                               lse.index_select(0, rows), logps.index_select(0, rows), ignore_index);
    if (grad_hidden.defined()) grad_hidden.index_copy_(0, rows, at::mm(g, weight));
    if (grad_weight.defined()) {
      if (grad_weight.scalar_type() == g.scalar_type()) {
        grad_weight.addmm_(g.t(), h);
      } else {  // fp32 accumulation of bf16/fp16 products, one rounding per chunk
        grad_weight.add_(at::mm(g.t(), h));
      }
    }
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
