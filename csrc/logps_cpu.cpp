// CPU host code of the fused log-prob ops: checks, output allocation, choice of the vectorized
// loops (logps_cpu_kernel.cpp) and registration for the CPU dispatch key.
#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdlib>

#include "logps_cpu.h"

#include "cpu_capability.h"
#include "logps_checks.h"
#include "logps_cpu_kernel.h"

namespace epa_ext::cpu {
namespace {

TokenLogpsForwardFn forward_kernel() {
#if defined(__x86_64__)
  if (cpu_capability() == CpuCapability::Avx2) return &AVX2::token_logps_forward;
#endif
  return &DEFAULT::token_logps_forward;
}

TokenLogpsBackwardFn backward_kernel() {
#if defined(__x86_64__)
  if (cpu_capability() == CpuCapability::Avx2) return &AVX2::token_logps_backward;
#endif
  return &DEFAULT::token_logps_backward;
}

// A contiguous tensor whose memory is backed by transparent huge pages. The gradient of the
// logits is hundreds of MB that the OS hands out fresh on every call; with 4 KiB pages, faulting
// them in costs more than computing the gradient (see README, CPU performance).
at::Tensor empty_on_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype) {
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= 8 * kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, rounded) == 0) {
      madvise(data, rounded, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
      return at::from_blob(data, sizes, [](void* p) { std::free(p); },
                           at::TensorOptions().dtype(dtype).device(at::kCPU));
    }
  }
#endif
  return at::empty(sizes, at::TensorOptions().dtype(dtype).device(at::kCPU));
}

// (logps, lse) of logits ([N, V] or [B, T, V]); with cap_in_place the kernel also stores the
// capped logits over them.
std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                                               double softcap, bool cap_in_place) {
  const auto options = labels.options().dtype(accumulate_dtype(logits));
  at::Tensor logps = at::empty(labels.sizes(), options);
  at::Tensor lse = at::empty(labels.sizes(), options);
  if (labels.numel() == 0) return {logps, lse};
  forward_kernel()(as_batch_time_vocab(logits), labels.contiguous(), ignore_index, softcap, cap_in_place, logps, lse);
  return {logps, lse};
}

std::tuple<at::Tensor, at::Tensor> token_logps_cpu(const at::Tensor& logits,
                                                   const at::Tensor& labels,
                                                   int64_t ignore_index, bool inplace_backward,
                                                   std::optional<double> softcap) {
  check_logits_and_labels("token_logps", logits, labels);
  const double cap = check_softcap("token_logps", softcap);
  if (inplace_backward) check_rows_writable("token_logps", logits);
  return run_forward(logits, labels, ignore_index, cap, /*cap_in_place=*/false);
}

// Writes the gradient into grad_3d ([B, T, V]; may be logits_3d itself).
void run_backward(const at::Tensor& grad_logps, const at::Tensor& logits_3d, const at::Tensor& labels,
                  const at::Tensor& lse, const at::Tensor& logps, int64_t ignore_index, double softcap,
                  bool logits_capped, at::Tensor& grad_3d) {
  if (labels.numel() == 0) return;
  backward_kernel()(grad_logps.to(accumulate_dtype(logits_3d)).contiguous(), logits_3d, labels.contiguous(),
                    lse.contiguous(), logps.contiguous(), ignore_index, softcap, logits_capped, grad_3d);
}

at::Tensor token_logps_backward_cpu(const at::Tensor& grad_logps, const at::Tensor& logits,
                                    const at::Tensor& labels, const at::Tensor& lse,
                                    const at::Tensor& logps, int64_t ignore_index,
                                    std::optional<double> softcap) {
  check_backward_inputs("token_logps_backward", grad_logps, logits, labels, lse, logps);
  const double cap = check_softcap("token_logps_backward", softcap);
  at::Tensor grad_logits = empty_on_huge_pages(logits.sizes(), logits.scalar_type());
  at::Tensor grad_3d = as_batch_time_vocab(grad_logits);
  run_backward(grad_logps, as_batch_time_vocab(logits), labels, lse, logps, ignore_index, cap,
               /*logits_capped=*/false, grad_3d);
  return grad_logits;
}

void token_logps_backward_inplace_cpu(const at::Tensor& grad_logps, const at::Tensor& logits,
                                      const at::Tensor& labels, const at::Tensor& lse,
                                      const at::Tensor& logps, int64_t ignore_index,
                                      std::optional<double> softcap) {
  check_backward_inputs("token_logps_backward_", grad_logps, logits, labels, lse, logps);
  check_rows_writable("token_logps_backward_", logits);
  const double cap = check_softcap("token_logps_backward_", softcap);
  at::Tensor logits_3d = as_batch_time_vocab(logits);
  run_backward(grad_logps, logits_3d, labels, lse, logps, ignore_index, cap, /*logits_capped=*/false, logits_3d);
}

}  // namespace

bool caps_logits_in_place(const at::Tensor& like, const std::optional<double>& softcap) {
  return like.is_cpu() && like.scalar_type() == at::kFloat && softcap.has_value();
}

std::tuple<at::Tensor, at::Tensor> token_logps_capping_(const at::Tensor& logits, const at::Tensor& labels,
                                                        int64_t ignore_index, double softcap) {
  return run_forward(logits, labels, ignore_index, softcap, /*cap_in_place=*/true);
}

void token_logps_backward_of_capped_(const at::Tensor& grad_logps, const at::Tensor& capped_logits,
                                     const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps,
                                     int64_t ignore_index, double softcap) {
  at::Tensor logits_3d = as_batch_time_vocab(capped_logits);
  run_backward(grad_logps, logits_3d, labels, lse, logps, ignore_index, softcap, /*logits_capped=*/true, logits_3d);
}

TORCH_LIBRARY_IMPL(epa_ext, CPU, m) {
  m.impl("token_logps", &token_logps_cpu);
  m.impl("token_logps_backward", &token_logps_backward_cpu);
  m.impl("token_logps_backward_", &token_logps_backward_inplace_cpu);
}

}  // namespace epa_ext::cpu
