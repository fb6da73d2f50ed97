// Argument checks and shape plumbing of the log-prob ops, shared by the CPU and CUDA host code so
// that both backends reject bad input with the same messages. Every message names the argument;
// a wrong dtype raises TypeError (TORCH_CHECK_TYPE), any other bad value ValueError
// (TORCH_CHECK_VALUE). The fake kernels in epa_ext/logps.py make the same checks.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <optional>
#include <utility>

#include "accumulate.h"
#include "logps_math.h"

namespace epa_ext {

inline bool is_supported_logits_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

inline void check_logits_and_labels(const char* op, const at::Tensor& logits,
                                    const at::Tensor& labels) {
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3, op,
                    ": logits must have shape [N, V] or [B, T, V]; got shape ", logits.sizes());
  TORCH_CHECK_TYPE(is_supported_logits_dtype(logits.scalar_type()), op,
                   ": logits must be float32, bfloat16, float16 or float64; got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(-1) > 0, op, ": logits has an empty vocabulary dimension (V = 0)");
  TORCH_CHECK_VALUE(logits.stride(-1) == 1, op,
                    ": logits must be contiguous in its last (vocabulary) dimension; got strides ",
                    logits.strides());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64 (torch.long); got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), op,
                    ": labels must have the shape of logits without its last dimension (",
                    logits.sizes().slice(0, logits.dim() - 1), "); got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), op,
                    ": labels and logits must be on the same device; got labels on ", labels.device(),
                    " and logits on ", logits.device());
}

// The softcap option of the log-prob ops: None (no capping, returned as 0) or a number that
// float32, in which the kernels cap, represents as a finite normal number: a smaller one would
// round to 0 (no cap), a larger one to inf (every log-prob NaN).
inline double check_softcap(const char* op, const std::optional<double>& softcap) {
  if (!softcap.has_value()) return 0.0;
  TORCH_CHECK_VALUE(*softcap >= FLT_MIN && *softcap <= FLT_MAX, op, ": softcap must be None or a number in [",
                    FLT_MIN, ", ", FLT_MAX, "] (float32's normal range; logits become softcap * tanh(logits / ",
                    "softcap)); got ", *softcap);
  return *softcap;
}

// [N, V] is handled as [1, N, V]: a view, never a copy.
inline at::Tensor as_batch_time_vocab(const at::Tensor& logits) {
  return logits.dim() == 3 ? logits : logits.unsqueeze(0);
}

// The row layout (logps_math.h) of a [B, T, V] view, for the CPU and CUDA kernels.
inline RowLayout row_layout(const at::Tensor& logits_3d) {
  return RowLayout{logits_3d.size(1), logits_3d.stride(0), logits_3d.stride(1)};
}

// True if two rows of a [B, T, V] view (unit stride along V) may share memory: an expanded
// (stride-0) dimension, or strides that step by less than what the smaller dimensions span.
// Conservative: a non-overlapping but interleaved layout also counts as overlapping.
inline bool rows_may_overlap(const at::Tensor& logits_3d) {
  std::array<std::pair<int64_t, int64_t>, 2> dims{{{logits_3d.stride(0), logits_3d.size(0)},
                                                  {logits_3d.stride(1), logits_3d.size(1)}}};
  std::sort(dims.begin(), dims.end());
  int64_t extent = logits_3d.size(2);  // elements spanned by one row
  for (const auto& [stride, size] : dims) {
    if (size == 1) continue;
    if (stride < extent) return true;
    extent += stride * (size - 1);
  }
  return false;
}

// The in-place backward writes every row's gradient over that row: rows must not share memory.
inline void check_rows_writable(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(!rows_may_overlap(as_batch_time_vocab(logits)), op,
                    ": inplace_backward=True writes the gradient over logits, whose rows share memory (an expanded "
                    "or overlapping view; strides ", logits.strides(), "). Pass inplace_backward=False, or "
                    "logits.contiguous()");
}

// grad_logps: the incoming gradient; lse and logps: the outputs of a forward that read source
// (the logits, or the hidden states of the fused-linear op).
inline void check_gradient_and_saved(const char* op, const at::Tensor& grad_logps, const at::Tensor& source,
                                     const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps) {
  TORCH_CHECK_TYPE(grad_logps.is_floating_point(), op, ": grad_logps must be a floating-point tensor; got ",
                   grad_logps.scalar_type());
  TORCH_CHECK_VALUE(grad_logps.sizes() == labels.sizes() && grad_logps.device() == source.device(), op,
                    ": grad_logps must have the shape and device of labels (", labels.sizes(), " on ",
                    source.device(), "); got ", grad_logps.sizes(), " on ", grad_logps.device());
  const at::ScalarType acc = accumulate_dtype(source);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"lse", lse}, {"logps", logps}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " must be the forward's ", acc, " output; got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == labels.sizes() && t.device() == source.device(), op, ": ", name,
                      " must be the forward's output of shape ", labels.sizes(), " on ", source.device(), "; got ",
                      t.sizes(), " on ", t.device());
  }
}

inline void check_backward_inputs(const char* op, const at::Tensor& grad_logps, const at::Tensor& logits,
                                  const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps) {
  check_logits_and_labels(op, logits, labels);
  check_gradient_and_saved(op, grad_logps, logits, labels, lse, logps);
}

}  // namespace epa_ext
