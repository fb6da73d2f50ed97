// Argument checks of the preference-loss ops, shared by the CPU and CUDA host code. The loss
// inputs are small ([B] or [B, C]); host code converts them to contiguous fp32 (fp64 for fp64
// inputs) before the kernels see them.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "losses_math.h"

namespace epa_ext {

inline at::ScalarType loss_accumulate_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_same_layout(const char* op, const char* name, const at::Tensor& t,
                              const char* like_name, const at::Tensor& like) {
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor; got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " (",
              like.sizes(), "); got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on the device of ", like_name, " (",
              like.device(), "); got ", t.device());
}

inline DpoLossType parse_dpo_loss_type(const std::string& name) {
  if (name == "sigmoid") return DpoLossType::Sigmoid;
  if (name == "robust") return DpoLossType::Robust;
  if (name == "hinge") return DpoLossType::Hinge;
  TORCH_CHECK(name == "ipo", "dpo_loss: loss_type must be one of 'sigmoid', 'robust', 'hinge', 'ipo'; got '",
              name, "'");
  return DpoLossType::Ipo;
}

inline void check_dpo_inputs(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                             const at::Tensor& ref_chosen, const at::Tensor& ref_rejected, double beta,
                             double label_smoothing) {
  constexpr const char* op = "dpo_loss";
  TORCH_CHECK(policy_chosen.dim() == 1, op, ": policy_chosen must have shape [B]; got ", policy_chosen.sizes());
  TORCH_CHECK(policy_chosen.is_floating_point(), op, ": policy_chosen must be a floating-point tensor; got ",
              policy_chosen.scalar_type());
  check_same_layout(op, "policy_rejected", policy_rejected, "policy_chosen", policy_chosen);
  check_same_layout(op, "ref_chosen", ref_chosen, "policy_chosen", policy_chosen);
  check_same_layout(op, "ref_rejected", ref_rejected, "policy_chosen", policy_chosen);
  TORCH_CHECK(beta > 0, op, ": beta must be > 0; got ", beta);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing < 0.5, op,
              ": label_smoothing must lie in [0, 0.5); got ", label_smoothing);
}

inline void check_epa_inputs(const at::Tensor& policy, const at::Tensor& ref,
                             const std::optional<at::Tensor>& mask, double beta, int64_t num_strong,
                             double weak_weight) {
  constexpr const char* op = "epa_loss";
  TORCH_CHECK(policy.dim() == 2, op, ": policy_logps must have shape [B, C] (C = 1 + strong + weak candidates); got ",
              policy.sizes());
  TORCH_CHECK(policy.is_floating_point(), op, ": policy_logps must be a floating-point tensor; got ",
              policy.scalar_type());
  TORCH_CHECK(policy.size(1) >= 2, op, ": policy_logps needs at least 2 candidates (a positive and a negative); got C = ",
              policy.size(1));
  check_same_layout(op, "ref_logps", ref, "policy_logps", policy);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be a bool tensor; got ", mask->scalar_type());
    TORCH_CHECK(mask->sizes() == policy.sizes(), op, ": mask must have the shape of policy_logps (",
                policy.sizes(), "); got ", mask->sizes());
    TORCH_CHECK(mask->device() == policy.device(), op, ": mask must be on ", policy.device(), "; got ",
                mask->device());
  }
  TORCH_CHECK(beta > 0, op, ": beta must be > 0; got ", beta);
  TORCH_CHECK(num_strong >= 1 && num_strong <= policy.size(1) - 1, op,
              ": num_strong must lie in [1, C - 1] = [1, ", policy.size(1) - 1, "]; got ", num_strong);
  TORCH_CHECK(weak_weight >= 0, op, ": weak_weight must be >= 0; got ", weak_weight);
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
  const at::ScalarType acc = loss_accumulate_dtype(policy_chosen);
  return {as_accumulate(policy_chosen, acc), as_accumulate(policy_rejected, acc), as_accumulate(ref_chosen, acc),
          as_accumulate(ref_rejected, acc), parse_dpo_loss_type(std::string(loss_type))};
}

// The checked, converted inputs of epa_loss and its backward.
struct EpaInputs {
  at::Tensor policy, ref;  // [B, C], contiguous, accumulation dtype
  at::Tensor mask;         // [B, C] bool contiguous, or undefined
  EpaRow row;
  int64_t batch;

  const bool* mask_data() const { return mask.defined() ? mask.const_data_ptr<bool>() : nullptr; }
};

inline EpaInputs prepare_epa_inputs(const at::Tensor& policy, const at::Tensor& ref,
                                    const std::optional<at::Tensor>& mask, double beta, int64_t num_strong,
                                    double weak_weight) {
  check_epa_inputs(policy, ref, mask, beta, num_strong, weak_weight);
  const at::ScalarType acc = loss_accumulate_dtype(policy);
  return {as_accumulate(policy, acc), as_accumulate(ref, acc), mask.has_value() ? mask->contiguous() : at::Tensor(),
          EpaRow{policy.size(1), num_strong}, policy.size(0)};
}

// grad_losses and lse of epa_loss_backward: [B] in the accumulation dtype.
inline std::pair<at::Tensor, at::Tensor> prepare_epa_backward(const EpaInputs& in, const at::Tensor& grad_losses,
                                                              const at::Tensor& lse) {
  TORCH_CHECK(grad_losses.numel() == in.batch && lse.numel() == in.batch,
              "epa_loss_backward: grad_losses and lse must have shape [", in.batch, "]; got ", grad_losses.sizes(),
              " and ", lse.sizes());
  const at::ScalarType acc = in.policy.scalar_type();
  return {as_accumulate(grad_losses, acc), as_accumulate(lse, acc)};
}

}  // namespace epa_ext
