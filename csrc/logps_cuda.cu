// CUDA kernels of the fused log-prob ops and their registration for the CUDA dispatch key.
//
// One block of kThreads threads per row (grid-stride over rows). Forward reads each row once with
// 16-byte loads, keeping a running (max, sum-exp) per thread (logps_math.h), then merges them
// across the block: bytes moved = the non-ignored rows of logits, once. Backward reads the row
// again and writes its gradient once; ignored rows are never read and only zero-filled. A softcap
// (logps_math.h) is applied to each element as it is loaded, in registers.
// No atomics: results are bitwise reproducible run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>

#include "logps_checks.h"
#include "logps_math.h"

namespace epa_ext::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread before their first use
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Elements before the first 16-byte boundary of p (at most n).
template <typename scalar_t>
__device__ __forceinline__ int64_t head_length(const scalar_t* p, int64_t n) {
  const auto misalignment = reinterpret_cast<uintptr_t>(p) % 16;
  const int64_t head = static_cast<int64_t>((16 - misalignment) % 16 / sizeof(scalar_t));
  return head < n ? head : n;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void accumulate_pack(LogSumExp<acc_t>& acc, const Pack<scalar_t>& pack,
                                                Softcap<acc_t> softcap) {
  acc_t z[Pack<scalar_t>::kSize];
#pragma unroll
  for (int i = 0; i < Pack<scalar_t>::kSize; ++i) z[i] = softcap.logit(static_cast<acc_t>(pack.v[i]));
  acc_t m = z[0];
#pragma unroll
  for (int i = 1; i < Pack<scalar_t>::kSize; ++i) m = nan_max(m, z[i]);
  acc_t s = 0;
#pragma unroll
  for (int i = 0; i < Pack<scalar_t>::kSize; ++i) s += exp_of(z[i] - m);
  acc.merge(m, s);
}

// Visits this thread's elements of row [0, vocab): the scalar head up to the first 16-byte
// boundary and the scalar tail through on_element(index, value), everything between as 16-byte
// packs through on_pack(first_index, pack), kUnroll packs loaded before the first is used.
// Each element is visited by one thread only, so on_pack may overwrite the pack it was given.
template <typename scalar_t, typename OnElement, typename OnPack>
__device__ __forceinline__ void for_each_in_row(const scalar_t* row, int64_t vocab, OnElement on_element,
                                                OnPack on_pack) {
  using P = Pack<scalar_t>;
  const int64_t head = head_length(row, vocab);
  for (int64_t i = threadIdx.x; i < head; i += kThreads) on_element(i, row[i]);
  const P* packs = reinterpret_cast<const P*>(row + head);
  const int64_t num_packs = (vocab - head) / P::kSize;
  int64_t p = threadIdx.x;
  for (; p + (kUnroll - 1) * kThreads < num_packs; p += kUnroll * kThreads) {
    P buffer[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) buffer[u] = packs[p + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) on_pack(head + (p + u * kThreads) * P::kSize, buffer[u]);
  }
  for (; p < num_packs; p += kThreads) on_pack(head + p * P::kSize, packs[p]);
  for (int64_t i = head + num_packs * P::kSize + threadIdx.x; i < vocab; i += kThreads) on_element(i, row[i]);
}

// This thread's share of the row's logsumexp.
template <typename scalar_t, typename acc_t>
__device__ LogSumExp<acc_t> thread_row_lse(const scalar_t* __restrict__ row, int64_t vocab, Softcap<acc_t> softcap) {
  LogSumExp<acc_t> acc;
  for_each_in_row(
      row, vocab, [&](int64_t, scalar_t z) { acc.add(softcap.logit(static_cast<acc_t>(z))); },
      [&](int64_t, const Pack<scalar_t>& pack) { accumulate_pack(acc, pack, softcap); });
  return acc;
}

// Merges every thread's part; the total is valid in thread 0. Ends with a barrier so the shared
// buffers can be reused for the next row.
template <typename acc_t>
__device__ LogSumExp<acc_t> block_merge(LogSumExp<acc_t> acc, acc_t* shared_max, acc_t* shared_sum) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    acc.merge(__shfl_down_sync(0xffffffffu, acc.max, offset),
              __shfl_down_sync(0xffffffffu, acc.sum, offset));
  }
  if (lane == 0) {
    shared_max[warp] = acc.max;
    shared_sum[warp] = acc.sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) acc.merge(shared_max[w], shared_sum[w]);
  }
  __syncthreads();
  return acc;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    token_logps_forward_kernel(const scalar_t* __restrict__ logits, RowLayout layout,
                               const int64_t* __restrict__ labels, int64_t num_rows,
                               int64_t vocab, int64_t ignore_index, Softcap<acc_t> softcap,
                               acc_t* __restrict__ logps, acc_t* __restrict__ lse) {
  __shared__ acc_t shared_max[kWarps], shared_sum[kWarps];
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const int64_t label = labels[row];
    if (label == ignore_index) {  // never read: the prompt and padding cost nothing
      if (threadIdx.x == 0) logps[row] = lse[row] = 0;
      continue;
    }
    const bool valid = label >= 0 && label < vocab;
    CUDA_KERNEL_ASSERT(valid && "epa_ext: labels must lie in [0, V) or equal ignore_index");
    const scalar_t* x = logits + layout.offset(row);
    const LogSumExp<acc_t> acc =
        block_merge(thread_row_lse<scalar_t, acc_t>(x, vocab, softcap), shared_max, shared_sum);
    if (threadIdx.x == 0) {
      lse[row] = acc.value();
      logps[row] = valid ? acc.log_prob(softcap.logit(static_cast<acc_t>(x[label]))) : acc_t(NAN);
    }
  }
}

template <typename scalar_t>
__device__ void fill_row(scalar_t* __restrict__ out, int64_t vocab, scalar_t value) {
  using P = Pack<scalar_t>;
  const int64_t head = head_length(out, vocab);
  for (int64_t i = threadIdx.x; i < head; i += kThreads) out[i] = value;
  P pack;
#pragma unroll
  for (int i = 0; i < P::kSize; ++i) pack.v[i] = value;
  P* packs = reinterpret_cast<P*>(out + head);
  const int64_t num_packs = (vocab - head) / P::kSize;
  for (int64_t p = threadIdx.x; p < num_packs; p += kThreads) packs[p] = pack;
  for (int64_t i = head + num_packs * P::kSize + threadIdx.x; i < vocab; i += kThreads) out[i] = value;
}

// Writes g * (onehot(label) - softmax) (times the softcap's slope) for one row. Each element's
// gradient is computed by the thread that read it, so out may alias x (in-place backward) without
// a barrier.
template <typename scalar_t, typename acc_t>
__device__ void write_row_grad(const scalar_t* x, scalar_t* out, int64_t vocab, int64_t label,
                               acc_t g, acc_t row_lse, acc_t logp_target, Softcap<acc_t> softcap) {
  auto grad_at = [&](int64_t v, scalar_t z) {
    const auto capped = softcap.apply(static_cast<acc_t>(z));
    const acc_t grad = v == label ? target_grad(g, logp_target) : nontarget_grad(g, capped.logit, row_lse);
    return static_cast<scalar_t>(softcap.active() ? grad * capped.slope : grad);
  };
  auto write_element = [&](int64_t v, scalar_t z) { out[v] = grad_at(v, z); };
  if (head_length(x, vocab) != head_length(out, vocab)) {  // rows misaligned differently
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) write_element(v, x[v]);
    return;
  }
  for_each_in_row(x, vocab, write_element, [&](int64_t first, Pack<scalar_t> pack) {
#pragma unroll
    for (int i = 0; i < Pack<scalar_t>::kSize; ++i) pack.v[i] = grad_at(first + i, pack.v[i]);
    *reinterpret_cast<Pack<scalar_t>*>(out + first) = pack;
  });
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    token_logps_backward_kernel(const acc_t* __restrict__ grad_logps, const scalar_t* logits,
                                RowLayout in_layout, scalar_t* grad_logits, RowLayout out_layout,
                                const int64_t* __restrict__ labels,
                                const acc_t* __restrict__ lse, const acc_t* __restrict__ logps,
                                int64_t num_rows, int64_t vocab, int64_t ignore_index,
                                Softcap<acc_t> softcap) {
  for (int64_t row = blockIdx.x; row < num_rows; row += gridDim.x) {
    scalar_t* out = grad_logits + out_layout.offset(row);
    const int64_t label = labels[row];
    if (label == ignore_index) {
      fill_row(out, vocab, scalar_t(0));
      continue;
    }
    const bool valid = label >= 0 && label < vocab;
    CUDA_KERNEL_ASSERT(valid && "epa_ext: labels must lie in [0, V) or equal ignore_index");
    if (!valid) {
      fill_row(out, vocab, scalar_t(NAN));
      continue;
    }
    write_row_grad(logits + in_layout.offset(row), out, vocab, label, grad_logps[row], lse[row],
                   logps[row], softcap);
  }
}

unsigned grid_for(int64_t num_rows) {
  return static_cast<unsigned>(std::min(num_rows, kMaxBlocks));
}

std::tuple<at::Tensor, at::Tensor> token_logps_cuda(const at::Tensor& logits,
                                                    const at::Tensor& labels,
                                                    int64_t ignore_index, bool inplace_backward,
                                                    std::optional<double> softcap) {
  check_logits_and_labels("token_logps", logits, labels);
  const double cap = check_softcap("token_logps", softcap);
  if (inplace_backward) check_rows_writable("token_logps", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto options = labels.options().dtype(accumulate_dtype(logits));
  at::Tensor logps = at::empty(labels.sizes(), options);
  at::Tensor lse = at::empty(labels.sizes(), options);
  const int64_t num_rows = labels.numel();
  if (num_rows == 0) return {logps, lse};
  const at::Tensor logits_3d = as_batch_time_vocab(logits);
  const at::Tensor flat_labels = labels.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream(logits.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "epa_ext_token_logps_forward_cuda", [&] {
        using acc_t = accumulate_t<scalar_t>;
        token_logps_forward_kernel<scalar_t, acc_t><<<grid_for(num_rows), kThreads, 0, stream>>>(
            logits_3d.const_data_ptr<scalar_t>(), row_layout(logits_3d),
            flat_labels.const_data_ptr<int64_t>(), num_rows, logits_3d.size(2), ignore_index,
            Softcap<acc_t>{static_cast<acc_t>(cap)}, logps.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {logps, lse};
}

// Writes the gradient into grad_3d ([B, T, V]; may be logits_3d itself).
void launch_backward(const at::Tensor& grad_logps, const at::Tensor& logits_3d,
                     const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps,
                     int64_t ignore_index, double softcap, at::Tensor& grad_3d) {
  const int64_t num_rows = labels.numel();
  if (num_rows == 0) return;
  const at::Tensor flat_labels = labels.contiguous();
  const at::Tensor flat_grad = grad_logps.to(accumulate_dtype(logits_3d)).contiguous();
  const at::Tensor flat_lse = lse.contiguous();
  const at::Tensor flat_logps = logps.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream(logits_3d.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits_3d.scalar_type(), "epa_ext_token_logps_backward_cuda", [&] {
        using acc_t = accumulate_t<scalar_t>;
        token_logps_backward_kernel<scalar_t, acc_t><<<grid_for(num_rows), kThreads, 0, stream>>>(
            flat_grad.const_data_ptr<acc_t>(), logits_3d.const_data_ptr<scalar_t>(),
            row_layout(logits_3d), grad_3d.data_ptr<scalar_t>(), row_layout(grad_3d),
            flat_labels.const_data_ptr<int64_t>(), flat_lse.const_data_ptr<acc_t>(),
            flat_logps.const_data_ptr<acc_t>(), num_rows, logits_3d.size(2), ignore_index,
            Softcap<acc_t>{static_cast<acc_t>(softcap)});
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

at::Tensor token_logps_backward_cuda(const at::Tensor& grad_logps, const at::Tensor& logits,
                                     const at::Tensor& labels, const at::Tensor& lse,
                                     const at::Tensor& logps, int64_t ignore_index,
                                     std::optional<double> softcap) {
  check_backward_inputs("token_logps_backward", grad_logps, logits, labels, lse, logps);
  const double cap = check_softcap("token_logps_backward", softcap);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad_logits =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_3d = as_batch_time_vocab(grad_logits);
  launch_backward(grad_logps, as_batch_time_vocab(logits), labels, lse, logps, ignore_index, cap, grad_3d);
  return grad_logits;
}

void token_logps_backward_inplace_cuda(const at::Tensor& grad_logps, const at::Tensor& logits,
                                       const at::Tensor& labels, const at::Tensor& lse,
                                       const at::Tensor& logps, int64_t ignore_index,
                                       std::optional<double> softcap) {
  check_backward_inputs("token_logps_backward_", grad_logps, logits, labels, lse, logps);
  check_rows_writable("token_logps_backward_", logits);
  const double cap = check_softcap("token_logps_backward_", softcap);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor logits_3d = as_batch_time_vocab(logits);
  launch_backward(grad_logps, logits_3d, labels, lse, logps, ignore_index, cap, logits_3d);
}

}  // namespace

TORCH_LIBRARY_IMPL(epa_ext, CUDA, m) {
  m.impl("token_logps", &token_logps_cuda);
  m.impl("token_logps_backward", &token_logps_backward_cuda);
  m.impl("token_logps_backward_", &token_logps_backward_inplace_cuda);
}

}  // namespace epa_ext::cuda
