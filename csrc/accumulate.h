// The one definition of the type every epa_ext kernel accumulates in: float for float32,
// bfloat16 and float16 inputs, double for float64 (which exists for gradcheck). Outputs that are
// sums or log-probs (logps, lse, losses) are returned in it.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <type_traits>

namespace epa_ext {

// In a dispatch lambda: `using acc_t = accumulate_t<scalar_t>;`.
template <typename scalar_t>
using accumulate_t = at::opmath_type<scalar_t>;

inline at::ScalarType accumulate_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::ScalarType accumulate_dtype(const at::Tensor& input) { return accumulate_dtype(input.scalar_type()); }

static_assert(std::is_same_v<accumulate_t<at::BFloat16>, float> && std::is_same_v<accumulate_t<at::Half>, float> &&
                  std::is_same_v<accumulate_t<float>, float> && std::is_same_v<accumulate_t<double>, double>,
              "accumulate_t and accumulate_dtype must agree");

}  // namespace epa_ext
