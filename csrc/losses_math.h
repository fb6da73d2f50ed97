// Per-example math of the preference losses (epa-spec sections 3 and 4), shared by the CPU and
// CUDA kernels. Everything is __host__ __device__; acc_t is float (double for fp64 inputs).
#pragma once

#include <cstdint>

#include "logps_math.h"

namespace epa_ext {

enum class DpoLossType : int64_t { Sigmoid = 0, Robust = 1, Hinge = 2, Ipo = 3 };

// log(sigmoid(x)) without overflow for |x| in the hundreds: min(x, 0) - log1p(exp(-|x|)).
template <typename acc_t>
EPA_HD acc_t log_sigmoid(acc_t x) {
  const acc_t negative_part = x < acc_t(0) ? x : acc_t(0);
  return negative_part - ::log1p(exp_of(-(x < acc_t(0) ? -x : x)));
}

template <typename acc_t>
EPA_HD acc_t sigmoid(acc_t x) {
  // Two branches so that exp never overflows.
  if (x >= acc_t(0)) return acc_t(1) / (acc_t(1) + exp_of(-x));
  const acc_t e = exp_of(x);
  return e / (acc_t(1) + e);
}

template <typename acc_t>
struct LossAndSlope {
  acc_t loss;
  acc_t slope;  // d(loss)/d(delta)
};

// DPO-family loss of one pair with delta = h_chosen - h_rejected, h = log pi - log pi_ref.
template <typename acc_t>
EPA_HD LossAndSlope<acc_t> dpo_pair_loss(acc_t delta, acc_t beta, DpoLossType type, acc_t smoothing) {
  const acc_t z = beta * delta;
  switch (type) {
    case DpoLossType::Sigmoid:  // cDPO when smoothing > 0
      return {-(acc_t(1) - smoothing) * log_sigmoid(z) - smoothing * log_sigmoid(-z),
              beta * (sigmoid(z) - (acc_t(1) - smoothing))};
    case DpoLossType::Robust: {
      const acc_t scale = acc_t(1) / (acc_t(1) - acc_t(2) * smoothing);
      return {(-(acc_t(1) - smoothing) * log_sigmoid(z) + smoothing * log_sigmoid(-z)) * scale,
              beta * (-(acc_t(1) - smoothing) * sigmoid(-z) - smoothing * sigmoid(z)) * scale};
    }
    case DpoLossType::Hinge:  // relu(1 - z), written so that a NaN z gives a NaN loss, as relu does
      return {z >= acc_t(1) ? acc_t(0) : acc_t(1) - z, z >= acc_t(1) ? acc_t(0) : -beta};
    case DpoLossType::Ipo: {
      const acc_t gap = delta - acc_t(1) / (acc_t(2) * beta);
      return {gap * gap, acc_t(2) * gap};
    }
  }
  return {acc_t(NAN), acc_t(NAN)};
}

// The EPA inputs of a batch, [B, C] contiguous in the accumulation type (mask and log_weights may
// be null), or, through row(i), those of row i.
template <typename acc_t>
struct EpaData {
  const acc_t* policy;
  const acc_t* ref;
  const bool* mask;
  const acc_t* log_weights;

  EPA_HD EpaData row(int64_t i, int64_t num_candidates) const {
    const int64_t offset = i * num_candidates;
    return {policy + offset, ref + offset, mask ? mask + offset : nullptr,
            log_weights ? log_weights + offset : nullptr};
  }
};

// EPA row i over C candidates: column 0 the positive, 1..num_strong strong negatives, the rest
// weak negatives with log-weight log_weak_weight; per-candidate log_weights (when given) are
// added to every column; masked (absent) candidates drop out.
//   s_j = beta * (policy_j - ref_j) + omega_j + log_weights_j,   loss_i = logsumexp_j s_j - s_0
//   d loss_i / d policy_j = beta * (softmax(s)_j - 1[j == 0]) = beta * d loss_i / d log_weights_j
struct EpaRow {
  int64_t num_candidates;
  int64_t num_strong;

  template <typename acc_t>
  EPA_HD acc_t score(const EpaData<acc_t>& in, int64_t j, acc_t beta, acc_t log_weak_weight) const {
    if (in.mask != nullptr && !in.mask[j]) return -INFINITY;
    acc_t s = beta * (in.policy[j] - in.ref[j]);
    if (j > num_strong) s += log_weak_weight;
    if (in.log_weights != nullptr) s += in.log_weights[j];
    return s;
  }

  // The first present column whose log-weight is not allowed, or -1: column 0 (the chosen answer,
  // always present) must be finite, the others finite or -inf (absent); +inf and NaN are refused.
  template <typename acc_t>
  EPA_HD int64_t bad_log_weight(const EpaData<acc_t>& in) const {
    if (in.log_weights == nullptr) return -1;
    for (int64_t j = 0; j < num_candidates; ++j) {
      if (in.mask != nullptr && !in.mask[j]) continue;
      const acc_t w = in.log_weights[j];
      const bool allowed = j == 0 ? (w - w == acc_t(0)) : (w == -INFINITY || w - w == acc_t(0));
      if (!allowed) return j;
    }
    return -1;
  }

  // logsumexp_j s_j with torch.logsumexp's values for non-finite scores: NaN if any score is
  // NaN, else +inf if any is +inf (a policy log-prob of +inf, or a reference one of -inf), else
  // -inf if all are. The loss of a row is then what plain torch computes for it, and so is its
  // gradient beta * (exp(s_j - lse) - 1[j == 0]).
  template <typename acc_t>
  EPA_HD acc_t logsumexp(const EpaData<acc_t>& in, acc_t beta, acc_t log_weak_weight) const {
    LogSumExp<acc_t> acc;
    bool any_plus_inf = false;
    for (int64_t j = 0; j < num_candidates; ++j) {
      const acc_t s = score(in, j, beta, log_weak_weight);
      if (s == acc_t(INFINITY)) {
        any_plus_inf = true;
      } else {
        acc.add(s);
      }
    }
    const acc_t total = acc.value();
    return any_plus_inf && total == total ? acc_t(INFINITY) : total;
  }

  template <typename acc_t>
  EPA_HD void grad(acc_t g, const EpaData<acc_t>& in, acc_t beta, acc_t log_weak_weight, acc_t lse,
                   acc_t* grad_policy) const {
    for (int64_t j = 0; j < num_candidates; ++j) {
      const acc_t log_p = score(in, j, beta, log_weak_weight) - lse;
      // p_0 - 1 as expm1: it cancels catastrophically when the positive takes all the mass.
      grad_policy[j] = g * beta * (j == 0 ? expm1_of(log_p) : exp_of(log_p));
    }
  }
};

}  // namespace epa_ext
