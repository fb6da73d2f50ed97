// The one place where the schemas of all epa_ext ops are declared. Backends register their
// kernels with TORCH_LIBRARY_IMPL next to the kernels (logps_cpu.cpp, logps_cuda.cu); autograd and
// fake (meta) kernels are registered from Python (epa_ext/_logps_ops.py).
#include <Python.h>
#include <torch/library.h>

#include "cpu_capability.h"

TORCH_LIBRARY(epa_ext, m) {
  // logits [N, V] or [B, T, V] (fp32/bf16/fp16/fp64, last dim contiguous, other strides free),
  // labels int64 of logits' shape without V. Returns (logps, lse), each of labels' shape, fp32
  // (fp64 for fp64 logits); both are 0 where labels == ignore_index.
  m.def("token_logps(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)");
  // d(loss)/d(logits) = grad_logps * (onehot(labels) - softmax(logits)), 0 on ignored rows;
  // contiguous, in logits' dtype.
  m.def(
      "token_logps_backward(Tensor grad_logps, Tensor logits, Tensor labels, Tensor lse, "
      "int ignore_index) -> Tensor");
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
