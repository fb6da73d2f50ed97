// The one place where the schemas of all epa_ext ops are declared, and the Python module _C.
//
// Who registers what for the ops declared here:
//   - backend kernels: TORCH_LIBRARY_IMPL next to them (logps_cpu.cpp, logps_cuda.cu,
//     losses_cpu.cpp, losses_cuda.cu, linear_logps.cpp, linear_losses.cpp), and the
//     ADInplaceOrView kernel of token_logps_backward_ below;
//   - autograd (torch.library.register_autograd) and fake/meta kernels
//     (torch.library.register_fake), from Python: epa_ext/logps.py (token_logps,
//     token_logps_backward, token_logps_backward_), epa_ext/losses.py (dpo_loss, epa_loss,
//     epa_loss_backward), epa_ext/linear.py (linear_token_logps, linear_token_logps_backward) and
//     epa_ext/linear_losses.py (linear_dpo_loss, linear_epa_loss).
//
// No C++ exception may reach a caller that cannot translate it (a static initializer, a
// PyCFunction, PyInit): it would end the process with std::terminate. So the schemas are
// declared from PyInit__C, inside a try block, instead of by a TORCH_LIBRARY static initializer
// (which throws, for instance, when a second copy of this library is loaded), and the module's
// functions turn exceptions into Python errors. Kernels and ops need nothing of the kind: the
// dispatcher translates c10::ValueError to ValueError, c10::TypeError to TypeError.
#include <Python.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/library.h>

#include <exception>
#include <memory>

#include "cpu_capability.h"

namespace {

void define_ops(torch::Library& m) {
  // --- log-probs (logps_cpu.cpp, logps_cuda.cu) ---
  // logits [N, V] or [B, T, V] (fp32/bf16/fp16/fp64, last dim contiguous, other strides free),
  // labels int64 of logits' shape without V. Returns (logps, lse), each of labels' shape, fp32
  // (fp64 for fp64 logits); both are 0 where labels == ignore_index. With inplace_backward the
  // autograd backward writes d(logits) into logits' own storage (token_logps_backward_).
  // softcap c (None: none; else finite > 0): every logit z becomes c * tanh(z / c) first (Gemma-2/3's
  // final_logit_softcapping); lse is that of the capped logits. The same softcap goes to every
  // op below that takes one.
  m.def(
      "token_logps(Tensor logits, Tensor labels, int ignore_index, bool inplace_backward=False, "
      "float? softcap=None) -> (Tensor, Tensor)");
  // d(loss)/d(logits) = grad_logps * (onehot(labels) - softmax(logits)), 0 on ignored rows, times
  // 1 - tanh^2(z / c) with a softcap; contiguous, in logits' dtype. lse and logps are the forward's
  // outputs (the target column's gradient comes from logps, which is exact where lse's rounding is not).
  m.def(
      "token_logps_backward(Tensor grad_logps, Tensor logits, Tensor labels, Tensor lse, "
      "Tensor logps, int ignore_index, float? softcap=None) -> Tensor");
  // The same gradient written over logits itself (its strides kept).
  m.def(
      "token_logps_backward_(Tensor grad_logps, Tensor(a!) logits, Tensor labels, Tensor lse, "
      "Tensor logps, int ignore_index, float? softcap=None) -> ()");

  // --- log-probs from hidden states and the lm_head, chunked over tokens (linear_logps.cpp) ---
  // hidden [N, H], weight [V, H], bias [V] or None, labels [N]. Rows whose label is ignore_index
  // are dropped before any matmul; the rest go through max_chunk_tokens rows at a time (0: automatic,
  // max(H, 512); negative: an error),
  // so at most [max_chunk_tokens, V] logits exist at once. Returns (logps, lse) [N], fp32 (fp64 for
  // fp64 inputs), 0 on ignored rows. fp32_weight_grad is for the autograd backward.
  m.def(
      "linear_token_logps(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
      "int max_chunk_tokens, bool fp32_weight_grad=True, float? softcap=None) -> (Tensor, Tensor)");
  // Gradients for hidden, weight and bias as output_mask asks (undefined otherwise). Recomputes
  // each chunk's logits, turns them into their gradient in place, then two matmuls per chunk.
  // fp32_weight_grad: accumulate the weight and bias gradients over chunks in fp32.
  m.def(
      "linear_token_logps_backward(Tensor grad_logps, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor labels, Tensor lse, Tensor logps, int ignore_index, int max_chunk_tokens, bool[3] output_mask, "
      "bool fp32_weight_grad, float? softcap=None) -> (Tensor, Tensor, Tensor)");

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
      "str reduction, int ignore_index, int max_chunk_tokens, bool[3] output_mask, bool fp32_weight_grad, "
      "float? softcap=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same for EPA: mask [B, C] bool or None, num_candidates C, num_strong K, weak_weight alpha,
  // log_weights [B, C] or None (as in epa_loss; constant here: no gradient).
  m.def(
      "linear_epa_loss(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor ref_logps, Tensor? mask, "
      "int num_candidates, float beta, int num_strong, float weak_weight, float sft_weight, bool average, "
      "bool ref_logps_averaged, str reduction, int ignore_index, int max_chunk_tokens, bool[3] output_mask, "
      "bool fp32_weight_grad, Tensor? log_weights=None, float? softcap=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // --- preference losses (losses_cpu.cpp, losses_cuda.cu); math in losses_math.h ---
  // Inputs [B]. Returns (losses [B], slopes [B] = d loss / d delta), delta = h_chosen - h_rejected.
  // The backward needs no kernel of its own: d/d policy_chosen = grad * slopes = -d/d policy_rejected.
  m.def(
      "dpo_loss(Tensor policy_chosen, Tensor policy_rejected, Tensor ref_chosen, "
      "Tensor ref_rejected, float beta, str loss_type, float label_smoothing) -> (Tensor, Tensor)");
  // Inputs [B, C] (column 0 positive, 1..num_strong strong, the rest weak), mask [B, C] bool,
  // log_weights [B, C] floating (added to the candidates' scores; -inf: absent; column 0 finite).
  // Returns (losses [B], lse [B]) with lse the logsumexp of the row's weighted rewards.
  m.def(
      "epa_loss(Tensor policy_logps, Tensor ref_logps, Tensor? mask, float beta, int num_strong, "
      "float weak_weight, Tensor? log_weights=None) -> (Tensor, Tensor)");
  // Returns d/d policy_logps [B, C] = grad * beta * (softmax - onehot(0)).
  m.def(
      "epa_loss_backward(Tensor grad_losses, Tensor policy_logps, Tensor ref_logps, Tensor? mask, "
      "Tensor lse, float beta, int num_strong, float weak_weight, Tensor? log_weights=None) -> Tensor");
}

// token_logps_backward_ writes into logits: bump its version counter, as PyTorch's own in-place
// ops do, so that autograd refuses to use a saved copy of logits that no longer holds its values
// (a second backward through an inplace_backward=True graph, logits saved by another node).
void token_logps_backward_inplace_ad(c10::DispatchKeySet keys, const at::Tensor& grad_logps, const at::Tensor& logits,
                                     const at::Tensor& labels, const at::Tensor& lse, const at::Tensor& logps,
                                     int64_t ignore_index, std::optional<double> softcap) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("epa_ext::token_logps_backward_", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, std::optional<double>)>();
  {
    const at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, grad_logps, logits, labels, lse, logps, ignore_index,
                  softcap);
  }
  logits.unsafeGetTensorImpl()->bump_version();
}

const char* message_of(const std::exception& error) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&error);
  return c10_error != nullptr ? c10_error->what_without_backtrace() : error.what();
}

// Raises a Python exception for a C++ one: ValueError for c10::ValueError, TypeError for
// c10::TypeError, RuntimeError otherwise. Returns nullptr, the PyCFunction error result.
PyObject* set_python_error(const std::exception& error) {
  PyObject* type = PyExc_RuntimeError;
  if (dynamic_cast<const c10::ValueError*>(&error) != nullptr) type = PyExc_ValueError;
  if (dynamic_cast<const c10::TypeError*>(&error) != nullptr) type = PyExc_TypeError;
  PyErr_SetString(type, message_of(error));
  return nullptr;
}

PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(epa_ext::cpu::cpu_capability_name());
  } catch (const std::exception& error) {
    return set_python_error(error);
  }
}

PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "Instruction set of the CPU kernels in use: 'avx2' or 'default'."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "epa_ext's compiled ops; importing it registers torch.ops.epa_ext.*",
                          -1, module_methods};

// Lives as long as the process: the ops stay declared after import.
std::unique_ptr<torch::Library> op_library;

}  // namespace

TORCH_LIBRARY_IMPL(epa_ext, ADInplaceOrView, m) {
  m.impl("token_logps_backward_", TORCH_FN(token_logps_backward_inplace_ad));
}

PyMODINIT_FUNC PyInit__C(void) {
  try {
    if (!op_library) {
      auto library = std::make_unique<torch::Library>(torch::Library::DEF, "epa_ext", std::nullopt, __FILE__,
                                                      __LINE__);
      define_ops(*library);
      op_library = std::move(library);
    }
  } catch (const std::exception& error) {
    PyErr_Format(PyExc_RuntimeError,
                 "epa_ext's compiled extension could not declare its ops (is another copy of epa_ext already "
                 "loaded in this process? import only one): %s",
                 message_of(error));
    return nullptr;
  }
  return PyModule_Create(&module_def);
}
