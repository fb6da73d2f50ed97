// DPO and EPA losses from hidden states and the lm_head in three matmuls: the gradient is formed
// during the forward, one prompt group at a time.
//
// With the reference log-probs given, the loss of prompt b depends only on its C candidate
// sequences (rows c*B + b, candidate-major). So the kept tokens (label != ignore_index) are
// ordered prompt group by prompt group, whole groups are packed into chunks of at most
// max_chunk_tokens tokens (planned on the host from the labels, the op's one synchronization),
// and per chunk:
//   logits = h W^T (+ b)                        matmul 1
//   row kernel: logsumexp and log-probs         (token_logps)
//   exact segment sums: sequence log-probs      (segment_reduce over each sequence's tokens)
//   loss kernel: each sequence's dL/dlogp       (dpo_loss / epa_loss(_backward); mean over the global B)
//   in-place row kernel: logits -> G            (token_logps_backward_)
//   d(hidden)[rows] = G W                       matmul 2
//   d(weight) += G^T h                          matmul 3 (fp32 accumulation for bf16/fp16)
//   d(bias) += sum of G's rows
// A group larger than the budget is processed in pieces: a first pass for its log-probs, then
// a second that forms the gradient, starting with the last piece (its logits are still in the
// buffer) and recomputing the logits of the others: 4 - 1/k matmuls' worth for a group of k
// pieces, so memory stays bounded whatever the sequence length. Gradients that are not asked for cost nothing: a frozen
// head skips d(weight) (2 matmuls), no gradient at all leaves 1 matmul and no buffers.
//
// The op returns the gradients of the loss (for an upstream gradient of 1) next to the loss; the
// autograd registration (epa_ext/linear_losses.py) only scales them. Device-generic host code
// (ATen ops and dispatcher calls), registered for CPU and CUDA.
#include <torch/library.h>

#include <array>
#include <cmath>
#include <functional>
#include <string>

#include "linear_common.h"
#include "logps_cpu.h"
#include "losses_checks.h"

namespace epa_ext {
namespace {

constexpr const char* kDpo = "linear_dpo_loss";
constexpr const char* kEpa = "linear_epa_loss";

// The prompt groups of a batch of R = C*B sequences: rows c*B + b hold candidate c of prompt b.
struct GroupPlan {
  int64_t prompts = 0, candidates = 0;
  at::Tensor token_positions;         // [K] flat positions r*T + t of the kept tokens, in (b, c, t) order
  at::Tensor sequence_counts;         // [B*C] kept tokens of sequence (b, c), in (b, c) order
  at::Tensor sequence_rows;           // [B*C] row c*B + b of sequence (b, c)
  at::Tensor token_sequences;         // [K] each kept token's sequence (b, c) as b*C + c
  std::vector<int64_t> group_offsets; // [B + 1] each group's first token in token_positions
  int64_t chosen_tokens = 0;          // kept tokens of the chosen answers (c = 0) in the batch
};

GroupPlan plan_groups(const char* op, const at::Tensor& labels, int64_t candidates, int64_t vocab,
                      int64_t ignore_index) {
  const at::Tensor host = linear::host_labels(op, labels, vocab, ignore_index);
  const int64_t* y = host.const_data_ptr<int64_t>();
  const int64_t rows = labels.size(0), steps = labels.size(1);
  GroupPlan plan;
  plan.prompts = rows / candidates;
  plan.candidates = candidates;
  std::vector<int64_t> positions, token_sequences, counts, sequence_rows;
  plan.group_offsets.push_back(0);
  for (int64_t b = 0; b < plan.prompts; ++b) {
    for (int64_t c = 0; c < candidates; ++c) {
      const int64_t row = c * plan.prompts + b;
      int64_t count = 0;
      for (int64_t t = 0; t < steps; ++t) {
        if (y[row * steps + t] == ignore_index) continue;
        positions.push_back(row * steps + t);
        token_sequences.push_back(b * candidates + c);
        ++count;
      }
      counts.push_back(count);
      sequence_rows.push_back(row);
      if (c == 0) plan.chosen_tokens += count;
    }
    plan.group_offsets.push_back(static_cast<int64_t>(positions.size()));
  }
  plan.token_positions = linear::to_device(positions, labels.device());
  plan.sequence_counts = linear::to_device(counts, labels.device());
  plan.sequence_rows = linear::to_device(sequence_rows, labels.device());
  plan.token_sequences = linear::to_device(token_sequences, labels.device());
  return plan;
}

// Consecutive prompt groups [first_group, end_group) and their tokens [first_token, end_token).
struct Span {
  int64_t first_group, end_group, first_token, end_token;
  int64_t tokens() const { return end_token - first_token; }
};

// Whole groups packed greedily up to the budget; a group over the budget gets a span of its own.
std::vector<Span> plan_spans(const std::vector<int64_t>& offsets, int64_t budget) {
  std::vector<Span> spans;
  const int64_t groups = static_cast<int64_t>(offsets.size()) - 1;
  for (int64_t b = 0; b < groups; ++b) {
    if (spans.empty() || offsets[b + 1] - spans.back().first_token > budget) {
      spans.push_back({b, b, offsets[b], offsets[b]});
    }
    spans.back().end_group = b + 1;
    spans.back().end_token = offsets[b + 1];
  }
  return spans;
}

// The loss of a span of prompt groups. values, ref: [g, C] sequence log-probs in the form the
// loss is taken on (accumulation dtype). Returns the g losses and, when asked, the gradient of
// scale * sum(losses) with respect to values ([g, C]).
using GroupLoss = std::function<std::pair<at::Tensor, at::Tensor>(const at::Tensor& values, const at::Tensor& ref,
                                                                  int64_t first_group, int64_t end_group,
                                                                  double scale, bool with_grad)>;

struct LossOptions {
  double sft_weight;
  bool average, ref_logps_averaged;
  c10::string_view reduction;
  int64_t ignore_index, max_chunk_tokens;
  std::array<bool, 3> output_mask;  // gradients wanted for hidden, weight, bias
  bool fp32_weight_grad;
  std::optional<double> softcap;    // of the logits, as in token_logps
};

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

void check_loss_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& ref_logps,
                       int64_t candidates, const LossOptions& o) {
  linear::check_linear_inputs(op, hidden, weight, bias, labels);
  TORCH_CHECK_VALUE(hidden.dim() == 3, op, ": hidden must have shape [C*B, T, H]; got ", hidden.sizes());
  const int64_t rows = hidden.size(0);
  TORCH_CHECK_VALUE(candidates >= 2 && rows % candidates == 0, op, ": hidden must stack num_candidates = ",
                    candidates, " candidates of each prompt (C*B rows, candidate-major); got ", rows, " rows");
  TORCH_CHECK_TYPE(ref_logps.is_floating_point(), op, ": ref_logps must be a floating-point tensor; got ",
                   ref_logps.scalar_type());
  TORCH_CHECK_VALUE(ref_logps.dim() == 1 && ref_logps.size(0) == rows, op, ": ref_logps must have shape [C*B] = [",
                    rows, "]; got ", ref_logps.sizes());
  TORCH_CHECK_VALUE(ref_logps.device() == hidden.device(), op, ": ref_logps must be on the device of hidden (",
                    hidden.device(), "); got ", ref_logps.device());
  TORCH_CHECK_VALUE(o.reduction == "mean" || o.reduction == "sum", op,
                    ": reduction must be 'mean' or 'sum' (reduction='none' takes the recomputing path of "
                    "fused_linear_*_loss); got '", std::string(o.reduction), "'");
  check_term_weight(op, "sft_weight", o.sft_weight);
  TORCH_CHECK_VALUE(o.average || !o.ref_logps_averaged, op,
                    ": ref_logps_averaged=True says ref_logps are length-averaged, but this loss is taken on "
                    "summed log-probs (average=False)");
  check_softcap(op, o.softcap);
}

at::Tensor empty_gradient(const at::Tensor& like) { return at::empty({0}, like.options()); }

Outputs linear_loss(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& ref_logps,
                    int64_t candidates, const LossOptions& o, const GroupLoss& group_loss) {
  check_loss_inputs(op, hidden, weight, bias, labels, ref_logps, candidates, o);
  const int64_t hidden_size = hidden.size(2);
  const int64_t budget = linear::chunk_tokens(op, "max_chunk_tokens", o.max_chunk_tokens, hidden_size);
  const GroupPlan plan = plan_groups(op, labels, candidates, weight.size(0), o.ignore_index);
  const int64_t prompts = plan.prompts;
  const at::ScalarType acc = accumulate_dtype(hidden);
  const auto acc_options = hidden.options().dtype(acc);

  const auto [need_hidden, need_weight, need_bias_mask] = o.output_mask;
  const bool need_bias = need_bias_mask && bias.has_value();
  const bool with_grad = need_hidden || need_weight || need_bias;
  const bool reduced = hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf;
  const at::ScalarType param_acc = o.fp32_weight_grad && reduced ? at::kFloat : weight.scalar_type();
  at::Tensor grad_hidden = need_hidden ? at::zeros(hidden.sizes(), hidden.options()) : empty_gradient(hidden);
  at::Tensor grad_weight = need_weight ? at::zeros(weight.sizes(), weight.options().dtype(param_acc))
                                       : empty_gradient(weight);
  at::Tensor grad_bias = need_bias ? at::zeros({weight.size(0)}, weight.options().dtype(param_acc))
                                   : empty_gradient(weight);
  at::Tensor grad_hidden_rows = need_hidden ? grad_hidden.view({-1, hidden_size}) : at::Tensor();

  const at::Tensor hidden_rows = hidden.reshape({-1, hidden_size});
  const at::Tensor flat_labels = labels.reshape(-1);
  const at::Tensor ref_by_group = ref_logps.to(acc).view({candidates, prompts}).t();  // [B, C]
  at::Tensor policy = at::zeros({hidden.size(0)}, acc_options);
  at::Tensor loss_sum = at::zeros({}, acc_options), chosen_sum = at::zeros({}, acc_options);
  // d(loss)/d(loss_b) and, for the SFT term, d(loss)/d(summed log-prob of a chosen answer).
  const double scale = o.reduction == "mean" ? 1.0 / static_cast<double>(prompts) : 1.0;
  const double sft_scale = o.sft_weight * scale * static_cast<double>(prompts);
  const bool with_sft = o.sft_weight > 0 && plan.chosen_tokens > 0;
  // d(loss)/d(each sequence's summed log-prob), in (b, c) order, filled span by span.
  at::Tensor grad_sequences = with_grad ? at::zeros({prompts * candidates}, acc_options) : at::Tensor();

  const std::vector<Span> spans = plan_spans(plan.group_offsets, budget);
  int64_t widest = 0;
  for (const Span& span : spans) widest = std::max(widest, std::min(span.tokens(), budget));
  linear::ChunkLogits chunk(widest, weight);
  // On the CPU, fp32 logits with a softcap are capped in place by the forward, which spares the
  // gradient of the logits still in the buffer a second tanh per logit (logps_cpu.h).
  const bool cap_in_place = with_grad && cpu::caps_logits_in_place(weight, o.softcap);  // weight: the buffer's kind
  for (const Span& span : spans) {
    const int64_t n = span.tokens(), groups = span.end_group - span.first_group;
    const at::Tensor positions = plan.token_positions.slice(0, span.first_token, span.end_token);
    const at::Tensor span_labels = flat_labels.index_select(0, positions);
    const at::Tensor counts = plan.sequence_counts.slice(0, span.first_group * candidates, span.end_group * candidates);
    // A span within the budget is one piece whose logits (and hidden rows) are kept from the
    // forward to the gradient; a larger one goes in pieces of `budget` tokens, of which only the
    // last stays in the buffer: the gradient pass starts with it and recomputes the others.
    const int64_t pieces = std::max<int64_t>(1, (n + budget - 1) / budget);
    const auto piece_range = [&](int64_t p) { return std::make_pair(p * budget, std::min((p + 1) * budget, n)); };
    at::Tensor piece_hidden, piece_logits, logps, lse;  // piece_*: the last piece's
    for (int64_t p = 0; p < pieces; ++p) {
      const auto [start, end] = piece_range(p);
      piece_hidden = hidden_rows.index_select(0, positions.slice(0, start, end));
      piece_logits = chunk.compute(piece_hidden, weight, bias);
      const at::Tensor piece_labels = span_labels.slice(0, start, end);
      auto [piece_logps, piece_lse] =
          cap_in_place ? cpu::token_logps_capping_(piece_logits, piece_labels, o.ignore_index, *o.softcap)
                       : linear::call_token_logps(piece_logits, piece_labels, o.ignore_index, o.softcap);
      if (pieces == 1) {
        logps = piece_logps;
        lse = piece_lse;
        break;
      }
      if (p == 0) {
        logps = at::empty({n}, acc_options);
        lse = at::empty({n}, acc_options);
      }
      logps.slice(0, start, end).copy_(piece_logps);
      lse.slice(0, start, end).copy_(piece_lse);
    }

    // Sequence log-probs: each sequence's tokens are contiguous in the span; summed in fp64
    // (a few thousand numbers), so the sum carries one rounding to fp32 whatever its length.
    const at::Tensor sums = at::segment_reduce(logps.to(at::kDouble), "sum", counts, {}, {}, 0, false,
                                               at::Scalar(0.0))
                                .to(acc)
                                .view({groups, candidates});
    at::Tensor values = sums, ref = ref_by_group.slice(0, span.first_group, span.end_group), divisor;
    if (o.average) {
      divisor = counts.view({groups, candidates}).clamp_min(1).to(acc);
      values = sums / divisor;
      if (!o.ref_logps_averaged) ref = ref / divisor;
    }
    policy.index_copy_(0, plan.sequence_rows.slice(0, span.first_group * candidates, span.end_group * candidates),
                       values.reshape(-1));
    if (with_sft) chosen_sum.add_(sums.select(1, 0).sum());
    auto [losses, grad_values] = group_loss(values, ref, span.first_group, span.end_group, scale, with_grad);
    loss_sum.add_(losses.sum());
    if (!with_grad || n == 0) continue;

    // d(loss)/d(each sequence's summed log-prob), then one number per token.
    at::Tensor grad_sums = grad_sequences.slice(0, span.first_group * candidates, span.end_group * candidates)
                               .view({groups, candidates});
    if (o.average) {
      at::div_out(grad_sums, grad_values, divisor);
    } else {
      grad_sums.copy_(grad_values);
    }
    if (with_sft) grad_sums.select(1, 0).sub_(sft_scale / static_cast<double>(plan.chosen_tokens));
    const at::Tensor grad_tokens =
        grad_sequences.index_select(0, plan.token_sequences.slice(0, span.first_token, span.end_token));

    for (int64_t k = 0; k < pieces; ++k) {
      const int64_t p = (pieces - 1 + k) % pieces;  // the last piece first: its logits are in the buffer
      const auto [start, end] = piece_range(p);
      const at::Tensor rows = positions.slice(0, start, end);
      const at::Tensor h = k == 0 ? piece_hidden : hidden_rows.index_select(0, rows);
      at::Tensor g = k == 0 ? piece_logits : chunk.compute(h, weight, bias);  // logits, then G in place
      const at::Tensor piece_grad = grad_tokens.slice(0, start, end), piece_labels = span_labels.slice(0, start, end);
      const at::Tensor piece_lse = lse.slice(0, start, end), piece_logps = logps.slice(0, start, end);
      if (cap_in_place && k == 0) {  // recomputed logits are raw
        cpu::token_logps_backward_of_capped_(piece_grad, g, piece_labels, piece_lse, piece_logps, o.ignore_index,
                                             *o.softcap);
      } else {
        linear::call_token_logps_backward_(piece_grad, g, piece_labels, piece_lse, piece_logps, o.ignore_index,
                                           o.softcap);
      }
      if (need_hidden) grad_hidden_rows.index_copy_(0, rows, at::mm(g, weight));
      if (need_weight) linear::accumulate_weight_grad(grad_weight, g, h);
      if (need_bias) grad_bias.add_(g.sum(0, /*keepdim=*/false, param_acc));
    }
  }

  at::Tensor loss = loss_sum.mul(scale);
  if (with_sft) loss.add_(chosen_sum.mul(-sft_scale / static_cast<double>(plan.chosen_tokens)));
  if (need_weight) grad_weight = grad_weight.to(weight.scalar_type());
  if (need_bias) grad_bias = grad_bias.to(weight.scalar_type());
  return {loss, policy, grad_hidden, grad_weight, grad_bias};
}

// --- the two losses, through the loss ops -------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> call_dpo_loss(const at::Tensor& policy_chosen, const at::Tensor& policy_rejected,
                                                 const at::Tensor& ref_chosen, const at::Tensor& ref_rejected,
                                                 double beta, c10::string_view loss_type, double label_smoothing) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epa_ext::dpo_loss", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, const at::Tensor&, double,
                                                                       c10::string_view, double)>();
  return op.call(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing);
}

std::tuple<at::Tensor, at::Tensor> call_epa_loss(const at::Tensor& policy, const at::Tensor& ref,
                                                 const std::optional<at::Tensor>& mask, double beta,
                                                 int64_t num_strong, double weak_weight,
                                                 const std::optional<at::Tensor>& log_weights) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epa_ext::epa_loss", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double,
                                 int64_t, double, const std::optional<at::Tensor>&)>();
  return op.call(policy, ref, mask, beta, num_strong, weak_weight, log_weights);
}

at::Tensor call_epa_loss_backward(const at::Tensor& grad_losses, const at::Tensor& policy, const at::Tensor& ref,
                                  const std::optional<at::Tensor>& mask, const at::Tensor& lse, double beta,
                                  int64_t num_strong, double weak_weight,
                                  const std::optional<at::Tensor>& log_weights) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epa_ext::epa_loss_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, const at::Tensor&, double, int64_t,
                                               double, const std::optional<at::Tensor>&)>();
  return op.call(grad_losses, policy, ref, mask, lse, beta, num_strong, weak_weight, log_weights);
}

Outputs linear_dpo_loss(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& labels, const at::Tensor& ref_logps, double beta,
                        c10::string_view loss_type, double label_smoothing, double sft_weight, bool average,
                        bool ref_logps_averaged, c10::string_view reduction, int64_t ignore_index,
                        int64_t max_chunk_tokens, std::array<bool, 3> output_mask, bool fp32_weight_grad,
                        std::optional<double> softcap) {
  check_beta(kDpo, beta, accumulate_dtype(hidden));
  TORCH_CHECK_VALUE(loss_type == "sigmoid" || loss_type == "robust" || loss_type == "hinge" || loss_type == "ipo",
                    kDpo, ": loss_type must be one of 'sigmoid', 'robust', 'hinge', 'ipo'; got '",
                    std::string(loss_type), "'");
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing < 0.5, kDpo,
                    ": label_smoothing must lie in [0, 0.5); got ", label_smoothing);
  const LossOptions options{sft_weight, average, ref_logps_averaged, reduction, ignore_index, max_chunk_tokens,
                            output_mask, fp32_weight_grad, softcap};
  const GroupLoss loss = [&](const at::Tensor& values, const at::Tensor& ref, int64_t, int64_t, double scale,
                             bool with_grad) -> std::pair<at::Tensor, at::Tensor> {
    auto [losses, slopes] = call_dpo_loss(values.select(1, 0), values.select(1, 1), ref.select(1, 0),
                                          ref.select(1, 1), beta, loss_type, label_smoothing);
    if (!with_grad) return {losses, at::Tensor()};
    const at::Tensor chosen = slopes * scale;  // d/d policy_chosen; d/d policy_rejected is its negative
    return {losses, at::stack({chosen, -chosen}, 1)};
  };
  return linear_loss(kDpo, hidden, weight, bias, labels, ref_logps, 2, options, loss);
}

Outputs linear_epa_loss(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& labels, const at::Tensor& ref_logps, const std::optional<at::Tensor>& mask,
                        int64_t num_candidates, double beta, int64_t num_strong, double weak_weight,
                        double sft_weight, bool average, bool ref_logps_averaged, c10::string_view reduction,
                        int64_t ignore_index, int64_t max_chunk_tokens, std::array<bool, 3> output_mask,
                        bool fp32_weight_grad, const std::optional<at::Tensor>& log_weights,
                        std::optional<double> softcap) {
  check_beta(kEpa, beta, accumulate_dtype(hidden));
  check_num_strong(kEpa, num_strong, num_candidates);
  check_term_weight(kEpa, "weak_weight", weak_weight);
  const int64_t prompts = num_candidates > 0 ? hidden.size(0) / num_candidates : 0;
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, kEpa, ": mask must be a bool tensor; got ",
                     mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == prompts && mask->size(1) == num_candidates, kEpa,
                      ": mask must have shape [B, C] = [", prompts, ", ", num_candidates, "]; got ", mask->sizes());
    TORCH_CHECK_VALUE(mask->device() == hidden.device(), kEpa, ": mask must be on the device of hidden (",
                      hidden.device(), "); got ", mask->device());
    if (mask->is_cpu() && prompts > 0) {  // on CUDA the loss kernel asserts it, as in epa_loss
      const at::Tensor absent = mask->select(1, 0).logical_not();
      TORCH_CHECK_VALUE(!absent.any().item<bool>(), kEpa, ": mask[:, 0] must be True (the chosen answer is always ",
                        "present); it is False in row ", absent.nonzero().min().item<int64_t>());
    }
  }
  if (log_weights.has_value()) {
    TORCH_CHECK_TYPE(log_weights->is_floating_point(), kEpa, ": log_weights must be a floating-point tensor; got ",
                     log_weights->scalar_type());
    TORCH_CHECK_VALUE(log_weights->dim() == 2 && log_weights->size(0) == prompts &&
                          log_weights->size(1) == num_candidates,
                      kEpa, ": log_weights must have shape [B, C] = [", prompts, ", ", num_candidates, "]; got ",
                      log_weights->sizes());
    TORCH_CHECK_VALUE(log_weights->device() == hidden.device(), kEpa, ": log_weights must be on the device of hidden (",
                      hidden.device(), "); got ", log_weights->device());
    // here, before the chunks: the loss kernel sees one span of rows and would name its own row
    check_log_weight_values(kEpa, *log_weights, mask, accumulate_dtype(hidden));
  }
  const LossOptions options{sft_weight, average, ref_logps_averaged, reduction, ignore_index, max_chunk_tokens,
                            output_mask, fp32_weight_grad, softcap};
  const GroupLoss loss = [&](const at::Tensor& values, const at::Tensor& ref, int64_t first, int64_t end,
                             double scale, bool with_grad) -> std::pair<at::Tensor, at::Tensor> {
    const auto rows = [&](const std::optional<at::Tensor>& t) {
      return t.has_value() ? std::optional<at::Tensor>(t->slice(0, first, end)) : std::nullopt;
    };
    const std::optional<at::Tensor> span_mask = rows(mask), span_log_weights = rows(log_weights);
    auto [losses, lse] = call_epa_loss(values, ref, span_mask, beta, num_strong, weak_weight, span_log_weights);
    if (!with_grad) return {losses, at::Tensor()};
    const at::Tensor grad_losses = at::full({end - first}, scale, values.options());
    return {losses, call_epa_loss_backward(grad_losses, values, ref, span_mask, lse, beta, num_strong, weak_weight,
                                           span_log_weights)};
  };
  return linear_loss(kEpa, hidden, weight, bias, labels, ref_logps, num_candidates, options, loss);
}

}  // namespace

TORCH_LIBRARY_IMPL(epa_ext, CPU, m) {
  m.impl("linear_dpo_loss", &linear_dpo_loss);
  m.impl("linear_epa_loss", &linear_epa_loss);
}

TORCH_LIBRARY_IMPL(epa_ext, CUDA, m) {
  m.impl("linear_dpo_loss", &linear_dpo_loss);
  m.impl("linear_epa_loss", &linear_epa_loss);
}

}  // namespace epa_ext
