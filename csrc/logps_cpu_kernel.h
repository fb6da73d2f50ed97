// Entry points of the vectorized CPU loops of the log-prob op. logps_cpu_kernel.cpp is compiled
// once per instruction set into its own namespace (DEFAULT, AVX2); logps_cpu.cpp picks one at run
// time through cpu_capability().
#pragma once

#include <ATen/core/Tensor.h>

namespace epa_ext::cpu {

// logits: [B, T, V], last dim contiguous; labels: [B*T] int64 contiguous.
// Writes logps and lse ([B*T], contiguous, fp32 or fp64 for fp64 logits). softcap: 0 for none,
// else the logits are capped (logps_math.h, Softcap) before the softmax; with cap_in_place (fp32
// logits only) the kept rows of logits are overwritten with their capped values.
using TokenLogpsForwardFn = void (*)(const at::Tensor& logits, const at::Tensor& labels,
                                     int64_t ignore_index, double softcap, bool cap_in_place,
                                     at::Tensor& logps, at::Tensor& lse);
// grad_logps, lse, logps (the forward's outputs): [B*T] contiguous. grad_logits: [B, T, V] with
// the same strides as logits or contiguous; may alias logits (in-place backward). logits_capped:
// logits holds the capped values a cap_in_place forward left.
using TokenLogpsBackwardFn = void (*)(const at::Tensor& grad_logps, const at::Tensor& logits,
                                      const at::Tensor& labels, const at::Tensor& lse,
                                      const at::Tensor& logps, int64_t ignore_index, double softcap,
                                      bool logits_capped, at::Tensor& grad_logits);

#define EPA_EXT_DECLARE_CPU_KERNELS(capability)                                              \
  namespace capability {                                                                     \
  void token_logps_forward(const at::Tensor& logits, const at::Tensor& labels,              \
                           int64_t ignore_index, double softcap, bool cap_in_place,         \
                           at::Tensor& logps, at::Tensor& lse);                             \
  void token_logps_backward(const at::Tensor& grad_logps, const at::Tensor& logits,         \
                            const at::Tensor& labels, const at::Tensor& lse,                \
                            const at::Tensor& logps, int64_t ignore_index, double softcap,  \
                            bool logits_capped, at::Tensor& grad_logits);                   \
  }

EPA_EXT_DECLARE_CPU_KERNELS(DEFAULT)
#if defined(__x86_64__)
EPA_EXT_DECLARE_CPU_KERNELS(AVX2)
#endif
#undef EPA_EXT_DECLARE_CPU_KERNELS

}  // namespace epa_ext::cpu
