// CUDA kernels of the preference losses (math in losses_math.h) and their registration: one
// thread per example; the inputs are [B] or [B, C] sequence log-probs, tiny next to the logits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cmath>

#include "losses_checks.h"
#include "losses_math.h"

namespace epa_ext::cuda {
namespace {

constexpr int kThreads = 128;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <typename acc_t>
__global__ void dpo_loss_kernel(const acc_t* __restrict__ policy_chosen, const acc_t* __restrict__ policy_rejected,
                                const acc_t* __restrict__ ref_chosen, const acc_t* __restrict__ ref_rejected,
                                int64_t batch, acc_t beta, DpoLossType type, acc_t smoothing,
                                acc_t* __restrict__ losses, acc_t* __restrict__ slopes) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch) return;
  const acc_t delta = (policy_chosen[i] - ref_chosen[i]) - (policy_rejected[i] - ref_rejected[i]);
  const auto result = dpo_pair_loss<acc_t>(delta, beta, type, smoothing);
  losses[i] = result.loss;
  slopes[i] = result.slope;
}

template <typename acc_t>
__global__ void epa_loss_kernel(EpaData<acc_t> data, EpaRow row, int64_t batch, acc_t beta, acc_t log_weak_weight,
                                acc_t* __restrict__ losses, acc_t* __restrict__ lse) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch) return;
  const EpaData<acc_t> in = data.row(i, row.num_candidates);
  CUDA_KERNEL_ASSERT((in.mask == nullptr || in.mask[0]) && "epa_loss: mask[:, 0] must be True");
  CUDA_KERNEL_ASSERT(row.bad_log_weight(in) < 0 &&
                     "epa_loss: log_weights must be finite, or -inf for an absent negative (column 0 finite)");
  const acc_t row_lse = row.logsumexp(in, beta, log_weak_weight);
  lse[i] = row_lse;
  losses[i] = row_lse - row.score(in, 0, beta, log_weak_weight);
}

template <typename acc_t>
__global__ void epa_loss_backward_kernel(const acc_t* __restrict__ grad_losses, EpaData<acc_t> data,
                                         const acc_t* __restrict__ lse, EpaRow row, int64_t batch, acc_t beta,
                                         acc_t log_weak_weight, acc_t* __restrict__ grad_policy) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch) return;
  row.grad(grad_losses[i], data.row(i, row.num_candidates), beta, log_weak_weight, lse[i],
           grad_policy + i * row.num_candidates);
}

std::tuple<at::Tensor, at::Tensor> dpo_loss_cuda(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                                 const at::Tensor& ref_chosen, const at::Tensor& ref_rejected,
                                                 double beta, c10::string_view loss_type, double label_smoothing) {
  const c10::cuda::CUDAGuard guard(policy_chosen.device());
  const DpoInputs in = prepare_dpo_inputs(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta,
                                          loss_type, label_smoothing);
  at::Tensor losses = at::empty_like(in.policy_chosen), slopes = at::empty_like(in.policy_chosen);
  const int64_t batch = losses.numel();
  if (batch == 0) return {losses, slopes};
  const auto stream = c10::cuda::getCurrentCUDAStream(losses.device().index());
  AT_DISPATCH_FLOATING_TYPES(losses.scalar_type(), "epa_ext_dpo_loss_cuda", [&] {
    dpo_loss_kernel<scalar_t><<<blocks_for(batch), kThreads, 0, stream>>>(
        in.policy_chosen.const_data_ptr<scalar_t>(), in.policy_rejected.const_data_ptr<scalar_t>(),
        in.ref_chosen.const_data_ptr<scalar_t>(), in.ref_rejected.const_data_ptr<scalar_t>(), batch,
        scalar_t(beta), in.type, scalar_t(label_smoothing), losses.data_ptr<scalar_t>(), slopes.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {losses, slopes};
}

std::tuple<at::Tensor, at::Tensor> epa_loss_cuda(const at::Tensor& policy, const at::Tensor& ref,
                                                 const std::optional<at::Tensor>& mask, double beta,
                                                 int64_t num_strong, double weak_weight,
                                                 const std::optional<at::Tensor>& log_weights) {
  const c10::cuda::CUDAGuard guard(policy.device());
  const EpaInputs in = prepare_epa_inputs("epa_loss", policy, ref, mask, log_weights, beta, num_strong, weak_weight);
  at::Tensor losses = at::empty({in.batch}, in.policy.options()), lse = at::empty({in.batch}, in.policy.options());
  if (in.batch == 0) return {losses, lse};
  const auto stream = c10::cuda::getCurrentCUDAStream(losses.device().index());
  AT_DISPATCH_FLOATING_TYPES(losses.scalar_type(), "epa_ext_epa_loss_cuda", [&] {
    epa_loss_kernel<scalar_t><<<blocks_for(in.batch), kThreads, 0, stream>>>(
        in.data<scalar_t>(), in.row, in.batch, scalar_t(beta), std::log(scalar_t(weak_weight)),
        losses.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {losses, lse};
}

at::Tensor epa_loss_backward_cuda(const at::Tensor& grad_losses, const at::Tensor& policy, const at::Tensor& ref,
                                  const std::optional<at::Tensor>& mask, const at::Tensor& lse, double beta,
                                  int64_t num_strong, double weak_weight,
                                  const std::optional<at::Tensor>& log_weights) {
  const c10::cuda::CUDAGuard guard(policy.device());
  const auto [in, g, l] = prepare_epa_backward_inputs(grad_losses, policy, ref, mask, lse, beta, num_strong,
                                                      weak_weight, log_weights);
  at::Tensor grad_policy = at::empty_like(in.policy);
  if (in.batch == 0) return grad_policy;
  const auto stream = c10::cuda::getCurrentCUDAStream(grad_policy.device().index());
  AT_DISPATCH_FLOATING_TYPES(grad_policy.scalar_type(), "epa_ext_epa_loss_backward_cuda", [&] {
    epa_loss_backward_kernel<scalar_t><<<blocks_for(in.batch), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), in.data<scalar_t>(), l.const_data_ptr<scalar_t>(), in.row, in.batch,
        scalar_t(beta), std::log(scalar_t(weak_weight)), grad_policy.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_policy;
}

}  // namespace

TORCH_LIBRARY_IMPL(epa_ext, CUDA, m) {
  m.impl("dpo_loss", &dpo_loss_cuda);
  m.impl("epa_loss", &epa_loss_cuda);
  m.impl("epa_loss_backward", &epa_loss_backward_cuda);
}

}  // namespace epa_ext::cuda
