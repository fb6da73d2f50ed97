// The CPU log-prob kernels as the fused-linear ops call them when a chunk's logits are theirs to
// overwrite: fp32 logits with a softcap are capped in place by the forward, so that the in-place
// backward forms each slope 1 - (c / cap)^2 from the capped logit c instead of a second tanh.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace epa_ext::cpu {

// Whether token_logps_capping_ applies to logits of the kind of `like`: CPU fp32, with a softcap.
bool caps_logits_in_place(const at::Tensor& like, const std::optional<double>& softcap);

// token_logps(logits, labels, ignore_index, softcap) that also leaves softcap * tanh(logits /
// softcap) in the kept rows of logits ([N, V] or [B, T, V], rows writable). Returns (logps, lse).
std::tuple<at::Tensor, at::Tensor> token_logps_capping_(const at::Tensor& logits, const at::Tensor& labels,
                                                        int64_t ignore_index, double softcap);

// token_logps_backward_ for logits that token_logps_capping_ capped: overwrites them with the
// gradient of the raw logits.
void token_logps_backward_of_capped_(const at::Tensor& grad_logps, const at::Tensor& capped_logits,
                                     const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps,
                                     int64_t ignore_index, double softcap);

}  // namespace epa_ext::cpu
