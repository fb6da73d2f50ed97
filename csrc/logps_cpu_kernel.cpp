// Vectorized CPU loops of the fused log-prob op (see logps_math.h for the formulas).
//
// Compiled once per instruction set: CMake defines CPU_CAPABILITY (DEFAULT or AVX2) together with
// the matching CPU_CAPABILITY_* macro that makes at::vec::Vectorized use those instructions.
//
// Forward reads each logits row once from memory: the row is walked in L1-sized blocks, and a
// block's max and its sum of exp(x - max) are two sweeps over data already in cache.
// Backward reads the row once more and writes its gradient once. With a softcap, a block's capped
// logits are formed in registers; the fused-linear ops, whose fp32 logits are a scratch buffer,
// have the forward store them over the logits (cap_in_place), so that their backward reads the
// capped logits and forms each slope without a second tanh.
#include "logps_cpu_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
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

// The gradient's softmax terms -g * exp(z - lse) below the least normal float (FLT_MIN = e^-87.34)
// are written as exactly 0. They add nothing a float sum can hold, but as subnormal numbers they
// cost tens of times a normal operation on many x86 cores (a microcode assist per operation), here
// and in the gradient matmuls that read them: a row of wide logits (spanning more than ~87 nats)
// made the fused-linear step 4-12x slower. The vectorized exp_u20 of the AVX2 build already
// returns 0 below ln(FLT_MIN) (the forward's sums need nothing more); a term is zeroed before it
// is multiplied by g, so that the product is never formed as a subnormal either. (Flush-to-zero
// mode would do it for free, but would also flush z / cap for a cap far above the logits, where
// the softcap's tanh would read 0.)
constexpr float kLeastNormalExponent = -87.f;  // a little above ln(FLT_MIN): exp_u20's error

// The least exponent a of a gradient term g * exp(a) that stays normal (g = 0: +inf, all zero).
inline float gradient_floor(float g) {
  return kLeastNormalExponent + std::max(0.f, -std::log(std::abs(g)));
}

// exp(a) where a >= floor, else exactly 0 (a that is NaN gives 0: the callers' rows have finite
// logsumexps).
inline FloatVec exp_or_zero(const FloatVec& a, const FloatVec& floor) {
  return FloatVec::blendv(FloatVec(0.f), a.exp_u20(), a >= floor);
}

inline float exp_or_zero(float a, float floor) { return a >= floor ? std::exp(a) : 0.f; }

// v, with subnormal lanes as 0 (a softcap's slope can take a normal term below FLT_MIN).
inline FloatVec flush_subnormal(const FloatVec& v) {
  return FloatVec::blendv(FloatVec(0.f), v, v.abs() >= FloatVec(FLT_MIN));
}

inline float flush_subnormal(float v) { return std::abs(v) >= FLT_MIN ? v : 0.f; }

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

// The capped logit c = cap * t with t = tanh(u), u = z / cap, to a few ulp of t: for |u| < 1/2 its
// Taylor series to u^17 (error below 2^-26 relative); above, (1 - e) / (1 + e) with
// e = exp(-2|u|) <= e^-1 (SLEEF's vectorized exp, 1 ulp), then u's sign. Cheaper than the
// vectorized tanh; a form such as 1 - 2 / (1 + exp(2u)) everywhere would be off by ulp(1) for
// small |u|, an error a large cap multiplies back into logits far below it. +-inf logits give
// +-1, NaN stays NaN. The slope dc/dz = 1 - t^2 = (1 - t)(1 + t). Logits are mostly far below
// the cap (|u| < 1/2 for |z| < 15 at Gemma's 30), so a vector whose lanes all take the series
// skips the exponential and the division.
struct VecCap {
  float cap_value;
  FloatVec cap, inv_cap;
  bool divide;  // 1 / cap would be subnormal (cap > ~8.5e37): divide by cap instead
  explicit VecCap(float c) : cap_value(c), cap(c), inv_cap(1.f / c), divide(!std::isnormal(1.f / c)) {}
  FloatVec tanh(const FloatVec& z) const {
    const FloatVec u = divide ? z / cap : z * inv_cap;
    const FloatVec a = u.abs();
    const FloatVec u2 = u * u;
    FloatVec series(6404582.f / 10854718875.f);
    for (const float c : {-929569.f / 638512875.f, 21844.f / 6081075.f, -1382.f / 155925.f, 62.f / 2835.f,
                          -17.f / 315.f, 2.f / 15.f, -1.f / 3.f, 1.f}) {
      series = at::vec::fmadd(series, u2, FloatVec(c));
    }
    const FloatVec small = a < FloatVec(0.5f);  // all bits set where true; NaN lanes are false
    if (small.zero_mask() == 0) return u * series;
    const FloatVec one(1.f), sign_bit(-0.f);
    const FloatVec e = (a * FloatVec(-2.f)).exp();
    const FloatVec large = ((one - e) / (one + e)) | (u & sign_bit);
    return FloatVec::blendv(large, u * series, small);
  }
  // The slope (1 - s)(1 + s) of an already capped logit c, s = c / cap (formed as tanh forms
  // z / cap).
  FloatVec slope_of_capped(const FloatVec& c) const {
    const FloatVec s = divide ? c / cap : c * inv_cap;
    const FloatVec one(1.f);
    return (one - s) * (one + s);
  }
};

// tanh of a single logit through the vector routine, so that it equals what the block sweep gives
// the same logit to the bit.
float tanh_of(const VecCap& vc, float z) {
  float lanes[FloatVec::size()];
  vc.tanh(FloatVec(z)).store(lanes);
  return lanes[0];
}

// A block's capped logits c in one sweep: tanh is increasing, so the capped maximum is that of
// the raw maximum z_max (t_max = tanh(z_max / cap)); returns sum_i exp(c[i] - c_max) with
// c[i] - c_max = cap (t[i] - t_max) (the maximum's term is 1). With capped_out (which may be x
// itself), c[i] = cap t[i] is also stored there.
float block_sum_exp_capped(const float* x, int64_t n, const VecCap& vc, float t_max, float* capped_out) {
  const FloatVec vt_max(t_max);
  FloatVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  auto term = [&](int64_t at) {
    const FloatVec t = vc.tanh(FloatVec::loadu(x + at));
    if (capped_out != nullptr) (vc.cap * t).store(capped_out + at);
    return (vc.cap * (t - vt_max)).exp_u20();
  };
  for (; i + 2 * FloatVec::size() <= n; i += 2 * FloatVec::size()) {
    acc0 += term(i);
    acc1 += term(i + FloatVec::size());
  }
  for (; i + FloatVec::size() <= n; i += FloatVec::size()) acc0 += term(i);
  float s = at::vec::vec_reduce_all<float>([](FloatVec& a, FloatVec& b) { return a + b; },
                                           acc0 + acc1);
  for (; i < n; ++i) {
    const float t = tanh_of(vc, x[i]);
    if (capped_out != nullptr) capped_out[i] = vc.cap_value * t;
    s += std::exp(vc.cap_value * (t - t_max));
  }
  return s;
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

// capped_row: where to store the capped logits (the row itself, fp32), or nullptr.
template <typename scalar_t>
LogSumExp<float> row_logsumexp_vectorized(const scalar_t* row, int64_t vocab, float* scratch, Softcap<float> softcap,
                                          float* capped_row) {
  LogSumExp<float> acc;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const float* x = block_as_float(row + start, n, scratch);
    if (softcap.active()) {
      const float z_max = block_max(x, n);
      if (std::isnan(z_max)) {  // capping keeps NaN; +-inf logits are capped to +-cap
        acc.merge(NAN, NAN);
        return acc;
      }
      const VecCap vc(softcap.cap);
      const float t_max = tanh_of(vc, z_max);
      acc.merge(softcap.cap * t_max,
                block_sum_exp_capped(x, n, vc, t_max, capped_row != nullptr ? capped_row + start : nullptr));
      continue;
    }
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
LogSumExp<acc_t> row_logsumexp(const scalar_t* row, int64_t vocab, float* scratch, Softcap<acc_t> softcap,
                               float* capped_row) {
  if constexpr (kIsFloatVectorPath<scalar_t>) {
    return row_logsumexp_vectorized(row, vocab, scratch, softcap, capped_row);
  } else {
    return row_logsumexp_scalar<scalar_t, acc_t>(row, vocab, softcap);
  }
}

// The target's capped logit through the routine its row's logsumexp used, so that a row's
// dominant logit gets log-prob 0 to the bit, as in plain torch.
template <typename scalar_t, typename acc_t>
acc_t capped_logit(Softcap<acc_t> softcap, acc_t z) {
  if constexpr (kIsFloatVectorPath<scalar_t>) {
    if (softcap.active()) return softcap.cap * tanh_of(VecCap(softcap.cap), z);
  }
  return softcap.logit(z);
}

// logits_capped: the row holds capped logits (the forward's cap_in_place).
template <typename scalar_t, typename acc_t>
void row_grad_scalar(const scalar_t* row, scalar_t* out, int64_t vocab, int64_t label, acc_t g,
                     acc_t lse, acc_t logp_target, Softcap<acc_t> softcap, bool logits_capped) {
  for (int64_t v = 0; v < vocab; ++v) {
    const auto x = static_cast<acc_t>(row[v]);
    const auto z = logits_capped ? softcap.of_capped(x) : softcap.apply(x);
    const acc_t grad = v == label ? target_grad(g, logp_target) : nontarget_grad(g, z.logit, lse);
    out[v] = static_cast<scalar_t>(softcap.active() ? grad * z.slope : grad);
  }
}

// -g * softmax_v * d(capped logit)/dz for the block's columns, into result:
// -g * exp(cap t - lse) * (1 - t)(1 + t), t as in VecCap; from the raw logits, or from the capped
// ones c = cap t when x_capped.
void block_grad_capped(const float* x, float* result, int64_t n, float g, float lse, float cap, bool x_capped) {
  const VecCap vc(cap);
  const float floor = gradient_floor(g);
  const FloatVec vlse(lse), vneg_g(-g), one(1.f), vfloor(floor);
  int64_t i = 0;
  if (x_capped) {
    for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
      const FloatVec c = FloatVec::loadu(x + i);
      flush_subnormal(vneg_g * exp_or_zero(c - vlse, vfloor) * vc.slope_of_capped(c)).store(result + i);
    }
  } else {
    for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
      const FloatVec t = vc.tanh(FloatVec::loadu(x + i));
      flush_subnormal(vneg_g * exp_or_zero(vc.cap * t - vlse, vfloor) * ((one - t) * (one + t))).store(result + i);
    }
  }
  for (; i < n; ++i) {
    const auto z = x_capped ? Softcap<float>{cap}.of_capped(x[i]) : Softcap<float>{cap}.apply(x[i]);
    result[i] = flush_subnormal(-g * exp_or_zero(z.logit - lse, floor) * z.slope);
  }
}

template <typename scalar_t>
void row_grad_vectorized(const scalar_t* row, scalar_t* out, int64_t vocab, int64_t label,
                         float g, float lse, float logp_target, float* scratch, Softcap<float> softcap,
                         bool logits_capped) {
  const float floor = gradient_floor(g);
  const FloatVec vlse(lse), vneg_g(-g), vfloor(floor);
  // The target's logit before the loop overwrites it (out may alias row: in-place backward).
  const auto target_logit = static_cast<float>(row[label]);
  const float target_slope =
      (logits_capped ? softcap.of_capped(target_logit) : softcap.apply(target_logit)).slope;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    const float* x = block_as_float(row + start, n, scratch);
    // For float the result goes straight to out; otherwise through scratch, then converted.
    float* result = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(out + start) : scratch;
    if (softcap.active()) {
      block_grad_capped(x, result, n, g, lse, softcap.cap, logits_capped);
    } else {
      int64_t i = 0;
      for (; i + FloatVec::size() <= n; i += FloatVec::size()) {
        (vneg_g * exp_or_zero(FloatVec::loadu(x + i) - vlse, vfloor)).store(result + i);
      }
      for (; i < n; ++i) result[i] = -g * exp_or_zero(x[i] - lse, floor);
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
                         double softcap, bool cap_in_place, at::Tensor& logps, at::Tensor& lse) {
  const int64_t num_rows = labels.numel();
  const int64_t vocab = logits.size(2);
  const RowLayout layout = row_layout(logits);
  const int64_t* label_ptr = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "epa_ext_token_logps_forward_cpu", [&] {
        using acc_t = accumulate_t<scalar_t>;
        const Softcap<acc_t> cap{static_cast<acc_t>(softcap)};
        const scalar_t* base = logits.const_data_ptr<scalar_t>();
        // The logits themselves receive the capped values (the host allows it for fp32 only).
        float* capped_base = nullptr;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (cap_in_place && cap.active()) capped_base = logits.data_ptr<float>();
        }
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
            const auto target_logit = static_cast<acc_t>(row[label]);  // before capping in place
            float* capped_row = capped_base != nullptr ? capped_base + layout.offset(r) : nullptr;
            const LogSumExp<acc_t> acc = row_logsumexp<scalar_t, acc_t>(row, vocab, scratch, cap, capped_row);
            lse_ptr[r] = acc.value();
            logp_ptr[r] = acc.log_prob(capped_logit<scalar_t>(cap, target_logit));
          }
        });
      });
}

void token_logps_backward(const at::Tensor& grad_logps, const at::Tensor& logits,
                          const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps,
                          int64_t ignore_index, double softcap, bool logits_capped, at::Tensor& grad_logits) {
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
                                    Softcap<float>{static_cast<float>(cap.cap)}, logits_capped);
                continue;
              }
            }
            row_grad_scalar<scalar_t, acc_t>(row, out, vocab, label, g, row_lse, logp_ptr[r], cap, logits_capped);
          }
        });
      });
}

}  // namespace epa_ext::cpu::CPU_CAPABILITY
