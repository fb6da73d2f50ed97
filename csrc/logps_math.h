// Row math of the fused log-prob op, shared by the CPU and the CUDA kernels so that the CPU tests
// also exercise what the GPU runs. Everything here is __host__ __device__ and header-only.
//
//   logp[r]  = z[r, y_r] - lse[r],            lse[r] = log sum_v exp(z[r, v])
//   dz[r, v] = g[r] * (1[v == y_r] - exp(z[r, v] - lse[r]))
//
// With a softcap c (Gemma-2/3's final_logit_softcapping), every logit z is first replaced by
// c * tanh(z / c) and each column's gradient is multiplied by d/dz = 1 - tanh^2(z / c).
//
// The target's own terms are computed from the row max, never as a difference of two large
// numbers: logp = (z_y - max) - log(sum), and its gradient g * (1 - p_y) = -g * expm1(logp).
// Rounding lse to fp32 would otherwise cost ulp(lse) / (1 - p_y) in relative error, unbounded
// as p_y -> 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define EPA_HD __host__ __device__ __forceinline__
#else
#define EPA_HD inline
#endif

namespace epa_ext {

// max that propagates NaN from either side (std::max and fmaxf drop it), so a NaN logit
// poisons its row's logsumexp instead of vanishing.
template <typename acc_t>
EPA_HD acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

template <typename acc_t>
EPA_HD acc_t exp_of(acc_t x) {
#if defined(__CUDA_ARCH__)
  // On the GPU, exp2 of a pre-scaled argument is one MUFU instruction; the relative error it
  // adds (~|x|·2^-23) is far below what an fp32 sum over V terms carries anyway.
  if constexpr (std::is_same_v<acc_t, float>) return exp2f(x * 1.4426950408889634f);
#endif
  return ::exp(x);
}
template <typename acc_t>
EPA_HD acc_t expm1_of(acc_t x) {
  return ::expm1(x);
}
template <typename acc_t>
EPA_HD acc_t log_of(acc_t x) {
  return ::log(x);
}

// A running logsumexp kept as (max, sum of exp(x - max)). Blocks of a row, threads of a block or
// lanes of a warp each build one and merge them; merging is exact up to rounding and never
// forms exp of a large positive number.
template <typename acc_t>
struct LogSumExp {
  acc_t max = -INFINITY;
  acc_t sum = 0;

  // Adds a part whose elements have maximum part_max and sum of exp(x - part_max) part_sum.
  EPA_HD void merge(acc_t part_max, acc_t part_sum) {
    if (part_max == -INFINITY) return;  // empty part or all -inf: contributes exp(-inf) = 0
    if (part_max > max) {
      sum = sum * exp_of(max - part_max) + part_sum;
      max = part_max;
    } else if (part_max != part_max) {  // NaN part
      max = part_max;
      sum = part_max;
    } else {
      sum += part_sum * exp_of(part_max - max);
    }
  }
  EPA_HD void merge(const LogSumExp& other) { merge(other.max, other.sum); }

  // Adds one element. exp(x - x) is 1 for finite x and NaN for +inf or NaN, as a block sum
  // holding that element would be, so a +inf logit makes the row NaN on every path.
  EPA_HD void add(acc_t x) { merge(x, x - x + acc_t(1)); }

  // log of the total; -inf for an empty or all -inf row, NaN if any element was NaN.
  EPA_HD acc_t value() const { return max + log_of(sum); }

  // log(exp(z) / total) for an element z of the row, without cancellation when it dominates.
  EPA_HD acc_t log_prob(acc_t z) const { return (z - max) - log_of(sum); }
};

// Logit softcapping, z -> cap * tanh(z / cap); cap == 0 means none. tanh(+-inf) = +-1, so
// logits far beyond the cap (even infinite ones) give the finite capped value, and a slope that
// underflows to exactly 0; NaN stays NaN. The division (not a multiplication by 1/cap) is what
// plain torch computes, so both round alike.
template <typename acc_t>
struct Softcap {
  acc_t cap;

  EPA_HD bool active() const { return cap > acc_t(0); }
  EPA_HD acc_t logit(acc_t z) const { return active() ? cap * ::tanh(z / cap) : z; }

  struct Capped {
    acc_t logit;  // cap * tanh(z / cap)
    acc_t slope;  // its derivative 1 - tanh^2(z / cap)
  };
  EPA_HD Capped apply(acc_t z) const {
    if (!active()) return {z, acc_t(1)};
    const acc_t t = ::tanh(z / cap);
    return {cap * t, acc_t(1) - t * t};
  }
  // The same pair from a logit c that is already capped (c = cap * tanh(z / cap)): the slope
  // 1 - (c / cap)^2 without a second tanh.
  EPA_HD Capped of_capped(acc_t c) const {
    if (!active()) return {c, acc_t(1)};
    const acc_t t = c / cap;
    return {c, (acc_t(1) - t) * (acc_t(1) + t)};
  }
};

// d(loss)/d(z[v]) for a non-target column: -g * softmax(z)_v.
template <typename acc_t>
EPA_HD acc_t nontarget_grad(acc_t g, acc_t z, acc_t lse) {
  return -g * exp_of(z - lse);
}

// d(loss)/d(z[y]) for the target column: g * (1 - p_y) = -g * expm1(logp_y), from the forward's
// logp_y. Written through expm1 because 1 - p cancels catastrophically when p_y -> 1.
template <typename acc_t>
EPA_HD acc_t target_grad(acc_t g, acc_t logp_target) {
  return -g * expm1_of(logp_target);
}

// Where row r of a [B, T, V] logits view starts, for arbitrary batch and time strides (a slice
// such as logits[:, :-1] is read in place). 64-bit throughout: B*T*V may exceed 2^31.
struct RowLayout {
  int64_t rows_per_batch;  // T
  int64_t batch_stride;    // elements between logits[b] and logits[b + 1]
  int64_t time_stride;     // elements between logits[b, t] and logits[b, t + 1]

  EPA_HD int64_t offset(int64_t row) const {
    const int64_t b = row / rows_per_batch;
    const int64_t t = row - b * rows_per_batch;
    return b * batch_stride + t * time_stride;
  }
};

}  // namespace epa_ext
