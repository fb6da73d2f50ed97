// Argument checks of the preference-loss ops, shared by the CPU and CUDA host code. The loss
// inputs are small ([B] or [B, C]); host code converts them to contiguous fp32 (fp64 for fp64
// inputs) before the kernels see them. A wrong dtype raises TypeError (TORCH_CHECK_TYPE), any other
// bad value ValueError (TORCH_CHECK_VALUE); every message names the argument. The fake kernels in
// epa_ext/losses.py make the same checks.
#pragma once

#include <ATen/ATen.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "accumulate.h"
#include "losses_math.h"

namespace epa_ext {

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor; got ", t.scalar_type());
}

inline void check_same_layout(const char* op, const char* name, const at::Tensor& t,
                              const char* like_name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " (",
                    like.sizes(), "); got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on the device of ", like_name, " (",
                    like.device(), "); got ", t.device());
}

inline DpoLossType parse_dpo_loss_type(const std::string& name) {
  if (name == "sigmoid") return DpoLossType::Sigmoid;
  if (name == "robust") return DpoLossType::Robust;
  if (name == "hinge") return DpoLossType::Hinge;
  TORCH_CHECK_VALUE(name == "ipo",
                    "dpo_loss: loss_type must be one of 'sigmoid', 'robust', 'hinge', 'ipo'; got '", name, "'");
  return DpoLossType::Ipo;
}

// beta as the kernels multiply by it: a normal number of the accumulation dtype. A beta that
// rounds to 0 (or to a subnormal) there gives NaN or imprecise gradients, one that rounds to inf
// NaN losses.
inline void check_beta(const char* op, double beta, at::ScalarType acc) {
  const bool in_double = acc == at::kDouble;
  const double least = in_double ? DBL_MIN : FLT_MIN, most = in_double ? DBL_MAX : FLT_MAX;
  TORCH_CHECK_VALUE(beta >= least && beta <= most, op, ": beta must be a number in [", least, ", ", most, "] (",
                    in_double ? "float64" : "float32", "'s normal range, in which the loss is computed); got ", beta);
}

// log_weights' values as the kernels will read them (in the accumulation dtype acc), checked on
// the host against the caller's tensor so that a refusal names the caller's value and [row,
// column]: present candidates need a finite log-weight, or -inf for an absent negative (column 0,
// the chosen answer, finite). CPU tensors only: on CUDA the check would synchronize, and the loss
// kernel asserts instead.
inline void check_log_weight_values(const char* op, const at::Tensor& log_weights,
                                    const std::optional<at::Tensor>& mask, at::ScalarType acc) {
  if (!log_weights.is_cpu() || log_weights.numel() == 0) return;
  const at::Tensor as_read = log_weights.to(acc);
  at::Tensor allowed = at::isfinite(as_read);
  allowed.slice(1, 1).logical_or_(as_read.slice(1, 1) == -std::numeric_limits<double>::infinity());
  if (mask.has_value()) allowed.logical_or_(mask->logical_not());
  if (allowed.all().item<bool>()) return;
  const int64_t first = allowed.logical_not().flatten().nonzero().min().item<int64_t>();
  const int64_t row = first / log_weights.size(1), column = first % log_weights.size(1);
  const double value = log_weights.select(0, row).select(0, column).item<double>();
  const bool rounds_off = std::isfinite(value) && acc == at::kFloat;  // e.g. 1e300 in float64
  TORCH_CHECK_VALUE(false, op, ": log_weights must be finite, or -inf for an absent negative (column 0, the chosen ",
                    "answer, finite); got ", value, " at [", row, ", ", column, "]",
                    rounds_off ? " (out of float32's range: the loss is computed in float32)" : "");
}

inline void check_dpo_inputs(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                             const at::Tensor& ref_chosen, const at::Tensor& ref_rejected, double beta,
                             double label_smoothing) {
  constexpr const char* op = "dpo_loss";
  TORCH_CHECK_VALUE(policy_chosen.dim() == 1, op, ": policy_chosen must have shape [B]; got ", policy_chosen.sizes());
  check_floating(op, "policy_chosen", policy_chosen);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"policy_rejected", policy_rejected},
                                {"ref_chosen", ref_chosen},
                                {"ref_rejected", ref_rejected}}) {
    check_floating(op, name, t);
    check_same_layout(op, name, t, "policy_chosen", policy_chosen);
  }
  check_beta(op, beta, accumulate_dtype(policy_chosen));
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 0.5, op,
                    ": label_smoothing must lie in [0, 0.5); got ", label_smoothing);
}

// A loss term's weight (weak_weight, sft_weight): finite and >= 0, in the same words for every op.
inline void check_term_weight(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, op, ": ", name, " must be a finite number >= 0; got ", value);
}

// EPA's K strong negatives among C candidates.
inline void check_num_strong(const char* op, int64_t num_strong, int64_t num_candidates) {
  TORCH_CHECK_VALUE(num_strong >= 1 && num_strong <= num_candidates - 1, op,
                    ": num_strong must lie in [1, C - 1] = [1, ", num_candidates - 1, "]; got ", num_strong);
}

inline void check_epa_inputs(const char* op, const at::Tensor& policy, const at::Tensor& ref,
                             const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& log_weights,
                             double beta, int64_t num_strong, double weak_weight) {
  TORCH_CHECK_VALUE(policy.dim() == 2, op,
                    ": policy_logps must have shape [B, C] (C = 1 + strong + weak candidates); got ", policy.sizes());
  check_floating(op, "policy_logps", policy);
  TORCH_CHECK_VALUE(policy.size(1) >= 2, op,
                    ": policy_logps needs at least 2 candidates (a positive and a negative); got C = ",
                    policy.size(1));
  check_floating(op, "ref_logps", ref);
  check_same_layout(op, "ref_logps", ref, "policy_logps", policy);
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": mask must be a bool tensor; got ", mask->scalar_type());
    check_same_layout(op, "mask", *mask, "policy_logps", policy);
  }
  if (log_weights.has_value()) {
    check_floating(op, "log_weights", *log_weights);
    check_same_layout(op, "log_weights", *log_weights, "policy_logps", policy);
  }
  check_beta(op, beta, accumulate_dtype(policy));
  check_num_strong(op, num_strong, policy.size(1));
  check_term_weight(op, "weak_weight", weak_weight);
}

// Contiguous copies in the accumulation dtype (no copy when already so).
inline at::Tensor as_accumulate(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// The checked, converted inputs of dpo_loss, as both backends' kernels take them.
struct DpoInputs {
  at::Tensor policy_chosen, policy_rejected, ref_chosen, ref_rejected;  // [B], contiguous
  DpoLossType type;
};

inline DpoInputs prepare_dpo_inputs(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                    const at::Tensor& ref_chosen, const at::Tensor& ref_rejected, double beta,
                                    c10::string_view loss_type, double label_smoothing) {
  check_dpo_inputs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, label_smoothing);
  const at::ScalarType acc = accumulate_dtype(policy_chosen);
  return {as_accumulate(policy_chosen, acc), as_accumulate(policy_rejected, acc), as_accumulate(ref_chosen, acc),
          as_accumulate(ref_rejected, acc), parse_dpo_loss_type(std::string(loss_type))};
}

// The checked, converted inputs of epa_loss and its backward.
struct EpaInputs {
  at::Tensor policy, ref;  // [B, C], contiguous, accumulation dtype
  at::Tensor mask;         // [B, C] bool contiguous, or undefined
  at::Tensor log_weights;  // [B, C] contiguous, accumulation dtype, or undefined
  EpaRow row;
  int64_t batch;

  // Raw pointers for the kernels (acc_t: the dtype of policy).
  template <typename acc_t>
  EpaData<acc_t> data() const {
    return {policy.const_data_ptr<acc_t>(), ref.const_data_ptr<acc_t>(),
            mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
            log_weights.defined() ? log_weights.const_data_ptr<acc_t>() : nullptr};
  }
};

inline EpaInputs prepare_epa_inputs(const char* op, const at::Tensor& policy, const at::Tensor& ref,
                                    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& log_weights,
                                    double beta, int64_t num_strong, double weak_weight) {
  check_epa_inputs(op, policy, ref, mask, log_weights, beta, num_strong, weak_weight);
  const at::ScalarType acc = accumulate_dtype(policy);
  return {as_accumulate(policy, acc), as_accumulate(ref, acc), mask.has_value() ? mask->contiguous() : at::Tensor(),
          log_weights.has_value() ? as_accumulate(*log_weights, acc) : at::Tensor(),
          EpaRow{policy.size(1), num_strong}, policy.size(0)};
}

// epa_loss_backward's inputs: epa_loss's, plus grad_losses and the forward's lse ([B] each, on
// policy_logps' device), converted to the accumulation dtype.
struct EpaBackwardInputs {
  EpaInputs in;
  at::Tensor grad_losses, lse;
};

inline EpaBackwardInputs prepare_epa_backward_inputs(const at::Tensor& grad_losses, const at::Tensor& policy,
                                                     const at::Tensor& ref, const std::optional<at::Tensor>& mask,
                                                     const at::Tensor& lse, double beta, int64_t num_strong,
                                                     double weak_weight, const std::optional<at::Tensor>& log_weights) {
  constexpr const char* op = "epa_loss_backward";
  EpaInputs in = prepare_epa_inputs(op, policy, ref, mask, log_weights, beta, num_strong, weak_weight);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_losses", grad_losses}, {"lse", lse}}) {
    check_floating(op, name, t);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == in.batch && t.device() == policy.device(), op, ": ", name,
                      " must have shape [B] = [", in.batch, "] on ", policy.device(), "; got ", t.sizes(), " on ",
                      t.device());
  }
  const at::ScalarType acc = in.policy.scalar_type();
  return {std::move(in), as_accumulate(grad_losses, acc), as_accumulate(lse, acc)};
}

}  // namespace epa_ext
