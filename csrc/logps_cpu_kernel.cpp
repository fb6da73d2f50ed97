// Vectorized CPU loops of the fused log-prob op (see logps_math.h for the formulas).
//
// Compiled once per instruction set: CMake defines CPU_CAPABILITY (DEFAULT or AVX2) together with
// the matching CPU_CAPABILITY_* macro that makes at::vec::Vectorized use those instructions.
//
// Forward reads each logits row once from memory: the row is walked in L1-sized blocks, and a
// block's max and its sum of exp(x - max) are two sweeps over data already in cache.
// Backward reads the row once more and writes its gradient once. With a softcap, a block's capped
// logits are formed in the L1 scratch first (forward) or in registers (backward).
#include "logps_cpu_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "logps_checks.h"
#include "logps_math.h"

namespace epa_ext::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using FloatVec = Vectorized<float>;

// Elements per block: 8 KiB of fp32 scratch stays in L1 between the sweeps over a block.
constexpr int64_t kBlock = 2048;

template <typename scalar_t>
constexpr bool kIsFloatVectorPath = !std::is_same_v<scalar_t, double>;

// Returns block [p, p + n) as fp32: the input itself for float, else converted into scratch.
template <typename scalar_t>
const float* block_as_float(const scalar_t* p, int64_t n, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return p;
  } else {
    using InVec = Vectorized<scalar_t>;
    int64_t i = 0;
    for (; i + InVec::size() <= n; i += InVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(InVec::loadu(p + i));
      lo.store(scratch + i);
      hi.store(scratch + i + FloatVec::size());
    }
    for (; i < n; ++i) scratch[i] = static_cast<float>(p[i]);
    return scratch;
  }
}

// tanh(u) = 1 - 2 / (1 + exp(2u)), through the accurate vectorized exp (SLEEF's, 1 ulp), which
// costs less than half of the vectorized tanh. exp(2u) = inf for large u gives 1, 0 for very
// negative u gives -1, NaN stays NaN; for small |u| the difference from 1 is exact to an ulp of
// 1, so cap * tanh is off by at most cap * 2^-24, the rounding of a logit of that size.
FloatVec tanh_of(const FloatVec& u) {
  const FloatVec one(1.f), two(2.f);
  return one - two / (one + (u * two).exp());
}

// out[i] = cap * tanh(x[i] / cap) for a block (out may be x).
void cap_block(const float* x, float* out, int64_t n, float cap) {
  const FloatVec vcap(cap);
  int64_t i = 0;
  for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
    (vcap * tanh_of(FloatVec::loadu(x + i) / vcap)).store(out + i);
  }
  for (; i < n; ++i) out[i] = Softcap<float>{cap}.logit(x[i]);
}

// Block [p, p + n) as the fp32 logits the softmax sees: capped into scratch with a softcap,
// else block_as_float's (the input itself for float).
template <typename scalar_t>
const float* block_logits(const scalar_t* p, int64_t n, float* scratch, Softcap<float> softcap) {
  const float* x = block_as_float(p, n, scratch);
  if (!softcap.active()) return x;
  cap_block(x, scratch, n, softcap.cap);
  return scratch;
}

// Writes fp32 block values to out[0, n) in scalar_t.
template <typename scalar_t>
void store_from_float(const float* values, scalar_t* out, int64_t n) {
  using InVec = Vectorized<scalar_t>;
  int64_t i = 0;
  for (; i + InVec::size() <= n; i += InVec::size()) {
    at::vec::convert_from_float<scalar_t>(FloatVec::loadu(values + i),
                                          FloatVec::loadu(values + i + FloatVec::size()))
        .store(out + i);
  }
  for (; i < n; ++i) out[i] = static_cast<scalar_t>(values[i]);
}

float block_max(const float* x, int64_t n) {
  int64_t i = 0;
  float m = -INFINITY;
  if (n >= FloatVec::size()) {
    FloatVec vmax(-INFINITY);
    for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
      vmax = at::vec::maximum(vmax, FloatVec::loadu(x + i));  // propagates NaN
    }
    m = at::vec::vec_reduce_all<float>(
        [](FloatVec& a, FloatVec& b) { return at::vec::maximum(a, b); }, vmax);
  }
  for (; i < n; ++i) m = nan_max(m, x[i]);
  return m;
}

// sum_i exp(x[i] - m) for a finite m; two accumulators hide the latency of exp.
float block_sum_exp(const float* x, int64_t n, float m) {
  const FloatVec vm(m);
  FloatVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + 2 * FloatVec::size() <= n; i += 2 * FloatVec::size()) {
    acc0 += (FloatVec::loadu(x + i) - vm).exp_u20();
    acc1 += (FloatVec::loadu(x + i + FloatVec::size()) - vm).exp_u20();
  }
  for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
    acc0 += (FloatVec::loadu(x + i) - vm).exp_u20();
  }
  float s = at::vec::vec_reduce_all<float>([](FloatVec& a, FloatVec& b) { return a + b; },
                                           acc0 + acc1);
  for (; i < n; ++i) s += std::exp(x[i] - m);
  return s;
}

// Plain scalar loop in acc_t: the path for fp64 and for rows whose logsumexp is not finite
// (exp_u20 clamps NaN instead of propagating it, so those rows must not take the fast path).
template <typename scalar_t, typename acc_t>
LogSumExp<acc_t> row_logsumexp_scalar(const scalar_t* row, int64_t vocab, Softcap<acc_t> softcap) {
  LogSumExp<acc_t> acc;
  for (int64_t v = 0; v < vocab; ++v) acc.add(softcap.logit(static_cast<acc_t>(row[v])));
  return acc;
}

template <typename scalar_t>
LogSumExp<float> row_logsumexp_vectorized(const scalar_t* row, int64_t vocab, float* scratch, Softcap<float> softcap) {
  LogSumExp<float> acc;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const float* x = block_logits(row + start, n, scratch, softcap);
    const float m = block_max(x, n);
    if (m == -INFINITY) continue;  // nothing to add
    if (!std::isfinite(m)) {       // NaN or +inf anywhere: the row is NaN, as in torch
      acc.merge(NAN, NAN);
      return acc;
    }
    acc.merge(m, block_sum_exp(x, n, m));
  }
  return acc;
}

// The row's (max, sum-exp): vectorized in fp32 for fp32/bf16/fp16, the scalar loop for fp64.
template <typename scalar_t, typename acc_t>
LogSumExp<acc_t> row_logsumexp(const scalar_t* row, int64_t vocab, float* scratch, Softcap<acc_t> softcap) {
  if constexpr (kIsFloatVectorPath<scalar_t>) {
    return row_logsumexp_vectorized(row, vocab, scratch, softcap);
  } else {
    return row_logsumexp_scalar<scalar_t, acc_t>(row, vocab, softcap);
  }
}

template <typename scalar_t, typename acc_t>
void row_grad_scalar(const scalar_t* row, scalar_t* out, int64_t vocab, int64_t label, acc_t g,
                     acc_t lse, acc_t logp_target, Softcap<acc_t> softcap) {
  for (int64_t v = 0; v < vocab; ++v) {
    const auto z = softcap.apply(static_cast<acc_t>(row[v]));
    const acc_t grad = v == label ? target_grad(g, logp_target) : nontarget_grad(g, z.logit, lse);
    out[v] = static_cast<scalar_t>(softcap.active() ? grad * z.slope : grad);
  }
}

// -g * softmax_v * d(capped logit)/dz for the block's columns, into result.
void block_grad_capped(const float* x, float* result, int64_t n, float g, float lse, float cap) {
  const FloatVec vlse(lse), vneg_g(-g), vcap(cap), one(1.f);
  int64_t i = 0;
  for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
    const FloatVec t = tanh_of(FloatVec::loadu(x + i) / vcap);
    (vneg_g * (vcap * t - vlse).exp_u20() * (one - t * t)).store(result + i);
  }
  for (; i < n; ++i) {
    const auto z = Softcap<float>{cap}.apply(x[i]);
    result[i] = nontarget_grad(g, z.logit, lse) * z.slope;
  }
}

template <typename scalar_t>
void row_grad_vectorized(const scalar_t* row, scalar_t* out, int64_t vocab, int64_t label,
                         float g, float lse, float logp_target, float* scratch, Softcap<float> softcap) {
  const FloatVec vlse(lse), vneg_g(-g);
  // The target's logit before the loop overwrites it (out may alias row: in-place backward).
  const float target_slope = softcap.apply(static_cast<float>(row[label])).slope;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const float* x = block_as_float(row + start, n, scratch);
    // For float the result goes straight to out; otherwise through scratch, then converted.
    float* result = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out + start) : scratch;
    if (softcap.active()) {
      block_grad_capped(x, result, n, g, lse, softcap.cap);
    } else {
      int64_t i = 0;
      for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
        (vneg_g * (FloatVec::loadu(x + i) - vlse).exp_u20()).store(result + i);
      }
      for (; i < n; ++i) result[i] = nontarget_grad(g, x[i], lse);
    }
    if constexpr (!std::is_same_v<scalar_t, float>) store_from_float(result, out + start, n);
  }
  // The target column in fp32 through expm1 (1 - p cancels when p -> 1).
  const float target = target_grad(g, logp_target);
  out[label] = static_cast<scalar_t>(softcap.active() ? target * target_slope : target);
}

void check_label(int64_t label, int64_t vocab, int64_t ignore_index, int64_t row) {
  TORCH_CHECK_VALUE(label == ignore_index || (label >= 0 && label < vocab),
              "epa_ext: labels must lie in [0, V) or equal ignore_index (", ignore_index,
              "); found ", label, " at flat position ", row, " with V = ", vocab);
}

// Rows per task: enough work (~32k elements) to amortize scheduling, at least one row.
int64_t grain_for(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

}  // namespace

void token_logps_forward(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                         double softcap, at::Tensor& logps, at::Tensor& lse) {
  const int64_t num_rows = labels.numel();
  const int64_t vocab = logits.size(2);
  const RowLayout layout = row_layout(logits);
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "epa_ext_token_logps_forward_cpu", [&] {
        using acc_t = accumulate_t<scalar_t>;
        const Softcap<acc_t> cap{static_cast<acc_t>(softcap)};
        const scalar_t* base = logits.const_data_ptr<scalar_t>();
        acc_t* logp_ptr = logps.data_ptr<acc_t>();
        acc_t* lse_ptr = lse.data_ptr<acc_t>();
        at::parallel_for(0, num_rows, grain_for(vocab), [&](int64_t begin, int64_t end) {
          alignas(64) float scratch[kBlock];
          for (int64_t r = begin; r < end; ++r) {
            const int64_t label = label_ptr[r];
            check_label(label, vocab, ignore_index, r);
            if (label == ignore_index) {  // never read: the prompt and padding cost nothing
              logp_ptr[r] = 0;
              lse_ptr[r] = 0;
              continue;
            }
            const scalar_t* row = base + layout.offset(r);
            const LogSumExp<acc_t> acc = row_logsumexp<scalar_t, acc_t>(row, vocab, scratch, cap);
            lse_ptr[r] = acc.value();
            logp_ptr[r] = acc.log_prob(cap.logit(static_cast<acc_t>(row[label])));
          }
        });
      });
}

void token_logps_backward(const at::Tensor& grad_logps, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps,
                          int64_t ignore_index, double softcap, at::Tensor& grad_logits) {
  const int64_t num_rows = labels.numel();
  const int64_t vocab = logits.size(2);
  const RowLayout in_layout = row_layout(logits);
  const RowLayout out_layout = row_layout(grad_logits);
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "epa_ext_token_logps_backward_cpu", [&] {
        using acc_t = accumulate_t<scalar_t>;
        const Softcap<acc_t> cap{static_cast<acc_t>(softcap)};
        const scalar_t* in_base = logits.const_data_ptr<scalar_t>();
        scalar_t* out_base = grad_logits.data_ptr<scalar_t>();
        const acc_t* grad_ptr = grad_logps.const_data_ptr<acc_t>();
        const acc_t* lse_ptr = lse.const_data_ptr<acc_t>();
        const acc_t* logp_ptr = logps.const_data_ptr<acc_t>();
        at::parallel_for(0, num_rows, grain_for(vocab), [&](int64_t begin, int64_t end) {
          alignas(64) float scratch[kBlock];
          for (int64_t r = begin; r < end; ++r) {
            const int64_t label = label_ptr[r];
            check_label(label, vocab, ignore_index, r);
            scalar_t* out = out_base + out_layout.offset(r);
            if (label == ignore_index) {
              std::fill(out, out + vocab, scalar_t(0));
              continue;
            }
            const scalar_t* row = in_base + in_layout.offset(r);
            const acc_t g = grad_ptr[r];
            const acc_t row_lse = lse_ptr[r];
            if constexpr (kIsFloatVectorPath<scalar_t>) {
              if (std::isfinite(row_lse)) {
                row_grad_vectorized(row, out, vocab, label, g, row_lse, logp_ptr[r], scratch,
                                    Softcap<float>{static_cast<float>(cap.cap)});
                continue;
              }
            }
            row_grad_scalar<scalar_t, acc_t>(row, out, vocab, label, g, row_lse, logp_ptr[r], cap);
          }
        });
      });
}

}  // namespace epa_ext::cpu::CPU_CAPABILITY
