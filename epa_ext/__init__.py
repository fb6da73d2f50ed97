"""epa_ext: fused CPU/CUDA kernels for preference alignment (DPO and EPA) in PyTorch.

Public functions (tensor shapes and formulas in their docstrings):

- ``token_logps(logits, labels)``: per-token log-probabilities, fused log-softmax + gather.
- ``sequence_logps(logits, labels)``: their masked sum (or mean) per sequence.
- ``completion_labels(input_ids, completion_mask)``: the aligned labels both of them take.
- ``dpo_loss``, ``epa_loss`` (and the ``DPOLoss``, ``EPALoss`` modules): losses on sequence
  log-probs; ``preference_metrics``: TRL's reward metrics.
- ``fused_dpo_loss``, ``fused_epa_loss``: from logits to the loss in one autograd graph.
- ``linear_sequence_logps`` and ``fused_linear_dpo_loss``, ``fused_linear_epa_loss``: the same
  from hidden states and the lm_head, chunked over tokens so the logits are never formed.

The compiled ops live in ``torch.ops.epa_ext`` (declared in csrc/registration.cpp). Errors follow one
convention: TypeError for an argument of the wrong type, ValueError for a bad value, each naming the
argument.
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from . import _C  # noqa: F401  (registers torch.ops.epa_ext.*)
except ImportError as error:  # most often: importing the source tree instead of the installed package
    raise ImportError(
        f"epa_ext's compiled extension could not be loaded from {__path__[0]}. Build and install it "
        "with `make build` (or `pip install --no-build-isolation .`), and run Python from outside the "
        "source directory so that the installed package is imported."
    ) from error
from .fused import fused_dpo_loss, fused_epa_loss, fused_linear_dpo_loss, fused_linear_epa_loss
from .linear import linear_sequence_logps, linear_token_logps
from .logps import IGNORE_INDEX, completion_labels, sequence_logps, token_logps
from .losses import DPOLoss, EPALoss, dpo_loss, epa_loss, preference_metrics

__version__ = "0.1.0"


def cpu_capability() -> str:
    """Instruction set of the CPU kernels in use: ``"avx2"`` or ``"default"``.

    Chosen from the processor at the first call, or forced with the environment variable
    ``EPA_EXT_CPU_CAPABILITY`` (``default`` or ``avx2``) set before it. Any other value of the
    variable, or ``avx2`` on a processor without it, raises ValueError here and in the first CPU
    kernel that runs.
    """
    return _C.cpu_capability()


__all__ = [
    "IGNORE_INDEX",
    "DPOLoss",
    "EPALoss",
    "completion_labels",
    "cpu_capability",
    "dpo_loss",
    "epa_loss",
    "fused_dpo_loss",
    "fused_epa_loss",
    "fused_linear_dpo_loss",
    "fused_linear_epa_loss",
    "linear_sequence_logps",
    "linear_token_logps",
    "preference_metrics",
    "sequence_logps",
    "token_logps",
]
