// The one place where the schemas of all epa_ext ops are declared. Backends register their
// kernels with TORCH_LIBRARY_IMPL next to the kernels; autograd and fake (meta) kernels are
// registered from Python (epa_ext/logps.py, epa_ext/losses.py, epa_ext/linear.py,
// epa_ext/linear_losses.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu_capability.h"

TORCH_LIBRARY(epa_ext, m) {
  // --- log-probs (logps_cpu.cpp, logps_cuda.cu) ---
  // logits [N, V] or [B, T, V] (fp32/bf16/fp16/fp64, last dim contiguous, other strides free),
  // labels int64 of logits' shape without V. Returns (logps, lse), each of labels' shape, fp32
  // (fp64 for fp64 logits); both are 0 where labels == ignore_index. With inplace_backward the
  // autograd backward writes d(logits) into logits' own storage (token_logps_backward_).
  m.def(
      "token_logps(Tensor logits, Tensor labels, int ignore_index, bool inplace_backward=False) "
      "-> (Tensor, Tensor)");
  // d(loss)/d(logits) = grad_logps * (onehot(labels) - softmax(logits)), 0 on ignored rows;
  // contiguous, in logits' dtype. lse and logps are the forward's outputs (the target column's
  // gradient comes from logps, which is exact where lse's rounding is not).
  m.def(
      "token_logps_backward(Tensor grad_logps, Tensor logits, Tensor labels, Tensor lse, "
      "Tensor logps, int ignore_index) -> Tensor");
  // The same gradient written over logits itself (its strides kept).
  m.def(
      "token_logps_backward_(Tensor grad_logps, Tensor(a!) logits, Tensor labels, Tensor lse, "
      "Tensor logps, int ignore_index) -> ()");

  // --- log-probs from hidden states and the lm_head, chunked over tokens (linear_logps.cpp) ---
  // hidden [N, H], weight [V, H], bias [V] or None, labels [N]. Rows whose label is ignore_index
  // are dropped before any matmul; the rest go through chunk_size rows at a time (0: automatic,
  // max(H, 512); negative: an error),
  // so at most [chunk_size, V] logits exist at once. Returns (logps, lse) [N], fp32 (fp64 for
  // fp64 inputs), 0 on ignored rows. fp32_weight_grad is for the autograd backward.
  m.def(
      "linear_token_logps(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
      "int chunk_size, bool fp32_weight_grad=True) -> (Tensor, Tensor)");
  // Gradients for hidden, weight and bias as output_mask asks (undefined otherwise). Recomputes
  // each chunk's logits, turns them into their gradient in place, then two matmuls per chunk.
  // fp32_weight_grad: accumulate the weight and bias gradients over chunks in fp32.
  m.def(
      "linear_token_logps_backward(Tensor grad_logps, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor labels, Tensor lse, Tensor logps, int ignore_index, int chunk_size, bool[3] output_mask, "
      "bool fp32_weight_grad) -> (Tensor, Tensor, Tensor)");

  // --- preference losses from hidden states and the lm_head, gradient formed in the forward
  // (linear_losses.cpp) ---
  // hidden [C*B, T, H] candidate-major (row c*B + b: candidate c of prompt b), weight [V, H], bias
  // [V] or None, labels [C*B, T], ref_logps [C*B] (summed; averaged with ref_logps_averaged).
  // Whole prompt groups are packed into chunks of at most max_chunk_tokens kept tokens (0:
  // automatic, max(H, 512)); a larger group is processed in pieces, recomputing its logits.
  // Returns (loss: 0-d, fp32 (fp64 for fp64 input), reduction 'mean' over B or 'sum';
  // policy_logps [C*B], summed or averaged as the loss used them; grad_hidden, grad_weight,
  // grad_bias: d(loss)/d(input) for an upstream gradient of 1, in the inputs' dtypes, computed as
  // output_mask asks for hidden, weight, bias and [0]-shaped otherwise). sft_weight adds
  // sft_weight * the chosen answers' NLL over all their tokens. The autograd backward scales the
  // gradients by the upstream gradient (epa_ext/linear_losses.py).
  m.def(
      "linear_dpo_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor ref_logps, float beta, "
      "str loss_type, float label_smoothing, float sft_weight, bool average, bool ref_logps_averaged, "
      "str reduction, int ignore_index, int max_chunk_tokens, bool[3] output_mask, bool fp32_weight_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same for EPA: mask [B, C] bool or None, num_candidates C, num_strong K, weak_weight alpha.
  m.def(
      "linear_epa_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor ref_logps, Tensor? mask, "
      "int num_candidates, float beta, int num_strong, float weak_weight, float sft_weight, bool average, "
      "bool ref_logps_averaged, str reduction, int ignore_index, int max_chunk_tokens, bool[3] output_mask, "
      "bool fp32_weight_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // --- preference losses (losses_cpu.cpp, losses_cuda.cu); math in losses_math.h ---
  // Inputs [B]. Returns (losses [B], slopes [B] = d loss / d delta), delta = h_chosen - h_rejected.
  // The backward needs no kernel of its own: d/d policy_chosen = grad * slopes = -d/d policy_rejected.
  m.def(
      "dpo_loss(Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, "
      "Tensor ref_rejected, float beta, str loss_type, float label_smoothing) -> (Tensor, Tensor)");
  // Inputs [B, C] (column 0 positive, 1..num_strong strong, the rest weak), mask [B, C] bool.
  // Returns (losses [B], lse [B]) with lse the logsumexp of the row's weighted rewards.
  m.def(
      "epa_loss(Tensor policy_logps, Tensor ref_logps, Tensor? mask, float beta, int num_strong, "
      "float weak_weight) -> (Tensor, Tensor)");
  // Returns d/d policy_logps [B, C] = grad * beta * (softmax - onehot(0)).
  m.def(
      "epa_loss_backward(Tensor grad_losses, Tensor policy_logps, Tensor ref_logps, Tensor? mask, "
      "Tensor lse, float beta, int num_strong, float weak_weight) -> Tensor");
}

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(epa_ext::cpu::cpu_capability_name());
}

PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "Instruction set of the CPU kernels in use: 'avx2' or 'default'."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "epa_ext's compiled ops; importing it registers torch.ops.epa_ext.*",
                          -1, module_methods};

}  // namespace

// Ops are registered by the static initializers above when the library loads; the Python module
// itself only carries small helpers.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
