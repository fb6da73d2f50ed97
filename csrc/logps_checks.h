// Argument checks and shape plumbing of the log-prob ops, shared by the CPU and CUDA host code so
// that both backends reject bad input with the same messages. Every message names the argument.
#pragma once

#include <ATen/ATen.h>

namespace epa_ext {

inline bool is_supported_logits_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Outputs are fp32 (fp64 for fp64 logits, which exist for gradcheck).
inline at::ScalarType accumulate_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_logits_and_labels(const char* op, const at::Tensor& logits,
                                    const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, op,
              ": logits must have shape [N, V] or [B, T, V]; got shape ", logits.sizes());
  TORCH_CHECK(is_supported_logits_dtype(logits.scalar_type()), op,
              ": logits must be float32, bfloat16, float16 or float64; got ", logits.scalar_type());
  TORCH_CHECK(logits.size(-1) > 0, op, ": logits has an empty vocabulary dimension (V = 0)");
  TORCH_CHECK(logits.stride(-1) == 1, op,
              ": logits must be contiguous in its last (vocabulary) dimension; got strides ",
              logits.strides());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64 (torch.long); got ",
              labels.scalar_type());
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), op,
              ": labels must have the shape of logits without its last dimension (",
              logits.sizes().slice(0, logits.dim() - 1), "); got ", labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), op,
              ": labels and logits must be on the same device; got labels on ", labels.device(),
              " and logits on ", logits.device());
}

// lse and logps: the forward's outputs.
inline void check_backward_inputs(const at::Tensor& grad_logps, const at::Tensor& logits,
                                  const at::Tensor& labels, const at::Tensor& lse,
                                  const at::Tensor& logps) {
  constexpr const char* op = "token_logps_backward";
  check_logits_and_labels(op, logits, labels);
  TORCH_CHECK(grad_logps.sizes() == labels.sizes() && grad_logps.device() == logits.device(), op,
              ": grad_logps must have the shape and device of labels (", labels.sizes(), " on ",
              logits.device(), "); got ", grad_logps.sizes(), " on ", grad_logps.device());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"lse", lse}, {"logps", logps}}) {
    TORCH_CHECK(t.sizes() == labels.sizes() && t.device() == logits.device() &&
                    t.scalar_type() == accumulate_dtype(logits),
                op, ": ", name, " must be the forward's ", accumulate_dtype(logits), " output of shape ",
                labels.sizes(), " on ", logits.device(), "; got ", t.scalar_type(), " ", t.sizes(), " on ",
                t.device());
  }
}

// [N, V] is handled as [1, N, V]: a view, never a copy.
inline at::Tensor as_batch_time_vocab(const at::Tensor& logits) {
  return logits.dim() == 3 ? logits : logits.unsqueeze(0);
}

}  // namespace epa_ext
