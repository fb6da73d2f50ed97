"""epa_ext: fused CPU/CUDA kernels for preference alignment (DPO and EPA) in PyTorch.

Public functions (tensor shapes in their docstrings; the math in docs of epa-spec section 2):

- ``token_logps(logits, labels)``: per-token log-probabilities, fused log-softmax + gather.
- ``sequence_logps(logits, labels)``: their masked sum (or mean) per sequence.
- ``completion_labels(input_ids, completion_mask)``: the aligned labels both of them take.

The compiled ops live in ``torch.ops.epa_ext`` (declared in csrc/registration.cpp).
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import _C  # noqa: F401  (registers torch.ops.epa_ext.*)
from .logps import completion_labels, sequence_logps, token_logps

__version__ = "0.1.0"


def cpu_capability() -> str:
    """Instruction set of the CPU kernels in use: ``"avx2"`` or ``"default"``.

    Chosen from the processor at the first call, or forced with the environment variable
    ``EPA_EXT_CPU_CAPABILITY`` (``default`` or ``avx2``) set before it.
    """
    return _C.cpu_capability()


__all__ = ["completion_labels", "cpu_capability", "sequence_logps", "token_logps"]
