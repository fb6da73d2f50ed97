// CPU kernels of the preference losses (math in losses_math.h) and their registration. The
// inputs are [B] or [B, C] sequence log-probs: a loop over examples, parallel when B is large.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "losses_checks.h"
#include "losses_math.h"

namespace epa_ext::cpu {
namespace {

constexpr int64_t kExamplesPerTask = 4096;

std::tuple<at::Tensor, at::Tensor> dpo_loss_cpu(const at::Tensor& policy_chosen,
                                                const at::Tensor& policy_rejected,
                                                const at::Tensor& ref_chosen,
                                                const at::Tensor& ref_rejected, double beta,
                                                c10::string_view loss_type, double label_smoothing) {
  const DpoInputs in = prepare_dpo_inputs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta,
                                          loss_type, label_smoothing);
  at::Tensor losses = at::empty_like(in.policy_chosen), slopes = at::empty_like(in.policy_chosen);
  AT_DISPATCH_FLOATING_TYPES(losses.scalar_type(), "epa_ext_dpo_loss_cpu", [&] {
    const scalar_t* pc = in.policy_chosen.const_data_ptr<scalar_t>();
    const scalar_t* pr = in.policy_rejected.const_data_ptr<scalar_t>();
    const scalar_t* rc = in.ref_chosen.const_data_ptr<scalar_t>();
    const scalar_t* rr = in.ref_rejected.const_data_ptr<scalar_t>();
    scalar_t *loss_out = losses.data_ptr<scalar_t>(), *slope_out = slopes.data_ptr<scalar_t>();
    at::parallel_for(0, losses.numel(), kExamplesPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t delta = (pc[i] - rc[i]) - (pr[i] - rr[i]);
        const auto result = dpo_pair_loss<scalar_t>(delta, beta, in.type, label_smoothing);
        loss_out[i] = result.loss;
        slope_out[i] = result.slope;
      }
    });
  });
  return {losses, slopes};
}

int64_t rows_per_task(const EpaInputs& in) {
  return std::max<int64_t>(1, kExamplesPerTask / in.row.num_candidates);
}

std::tuple<at::Tensor, at::Tensor> epa_loss_cpu(const at::Tensor& policy, const at::Tensor& ref,
                                                const std::optional<at::Tensor>& mask, double beta,
                                                int64_t num_strong, double weak_weight,
                                                const std::optional<at::Tensor>& log_weights) {
  // log_weights' values once, in the forward (its backward gets the same tensor)
  if (log_weights.has_value()) check_log_weight_values("epa_loss", *log_weights, mask, accumulate_dtype(policy));
  const EpaInputs in = prepare_epa_inputs("epa_loss", policy, ref, mask, log_weights, beta, num_strong, weak_weight);
  at::Tensor losses = at::empty({in.batch}, in.policy.options()), lse = at::empty({in.batch}, in.policy.options());
  AT_DISPATCH_FLOATING_TYPES(losses.scalar_type(), "epa_ext_epa_loss_cpu", [&] {
    const EpaData<scalar_t> data = in.data<scalar_t>();
    scalar_t *loss_out = losses.data_ptr<scalar_t>(), *lse_out = lse.data_ptr<scalar_t>();
    const scalar_t log_weak = std::log(static_cast<scalar_t>(weak_weight));
    at::parallel_for(0, in.batch, rows_per_task(in), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const EpaData<scalar_t> row = data.row(i, in.row.num_candidates);
        TORCH_CHECK_VALUE(row.mask == nullptr || row.mask[0], "epa_loss: mask[:, 0] must be True (the positive is ",
                    "always present); it is False in row ", i);
        const scalar_t row_lse = in.row.logsumexp(row, scalar_t(beta), log_weak);
        lse_out[i] = row_lse;
        loss_out[i] = row_lse - in.row.score(row, 0, scalar_t(beta), log_weak);
      }
    });
  });
  return {losses, lse};
}

at::Tensor epa_loss_backward_cpu(const at::Tensor& grad_losses, const at::Tensor& policy, const at::Tensor& ref,
                                 const std::optional<at::Tensor>& mask, const at::Tensor& lse, double beta,
                                 int64_t num_strong, double weak_weight, const std::optional<at::Tensor>& log_weights) {
  const auto [in, g, l] = prepare_epa_backward_inputs(grad_losses, policy, ref, mask, lse, beta, num_strong,
                                                      weak_weight, log_weights);
  at::Tensor grad_policy = at::empty_like(in.policy);
  AT_DISPATCH_FLOATING_TYPES(grad_policy.scalar_type(), "epa_ext_epa_loss_backward_cpu", [&] {
    const EpaData<scalar_t> data = in.data<scalar_t>();
    const scalar_t *g_ptr = g.const_data_ptr<scalar_t>(), *l_ptr = l.const_data_ptr<scalar_t>();
    scalar_t* out = grad_policy.data_ptr<scalar_t>();
    const scalar_t log_weak = std::log(static_cast<scalar_t>(weak_weight));
    at::parallel_for(0, in.batch, rows_per_task(in), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        in.row.grad(g_ptr[i], data.row(i, in.row.num_candidates), scalar_t(beta), log_weak, l_ptr[i],
                    out + i * in.row.num_candidates);
      }
    });
  });
  return grad_policy;
}

}  // namespace

TORCH_LIBRARY_IMPL(epa_ext, CPU, m) {
  m.impl("dpo_loss", &dpo_loss_cpu);
  m.impl("epa_loss", &epa_loss_cpu);
  m.impl("epa_loss_backward", &epa_loss_backward_cpu);
}

}  // namespace epa_ext::cpu
