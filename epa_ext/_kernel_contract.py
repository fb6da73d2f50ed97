"""What the compiled ops and the Python modules around them agree on, kept in one leaf module.

- ``IGNORE_INDEX``, the label of positions that are not scored;
- ``SUPPORTED_DTYPES``, the dtypes the kernels read logits and hidden states in, and
  ``accumulate_dtype``, the one they accumulate and return log-probs and sums in (csrc/accumulate.h);
- the checks of csrc's ``*_checks.h`` / ``linear_common.h`` that the fake kernels (torch.compile,
  meta tensors) of more than one op module share. A check that one module's fake kernels use
  alone stays in that module.

It imports only torch and epa_ext._validation, so every other module may import it, epa_ext.eager
included: the layers of epa_ext point one way (python_tests/test_layout.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import LARGEST_FLOAT32, SMALLEST_NORMAL_FLOAT32

IGNORE_INDEX = -100
"""The label of positions that are not scored (prompt, padding), as in PyTorch's cross_entropy and TRL."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The dtypes of logits and hidden states that the kernels take."""


def accumulate_dtype(t: Tensor) -> torch.dtype:
    """The dtype the kernels accumulate in and return sums and log-probs in (csrc/accumulate.h):
    float64 for float64 input, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def softcap_in_range(op: str, softcap: float | None) -> None:
    """csrc/logps_checks.h's check_softcap."""
    torch._check_value(
        softcap is None or SMALLEST_NORMAL_FLOAT32 <= softcap <= LARGEST_FLOAT32,
        lambda: f"{op}: softcap must be None or a number in [{SMALLEST_NORMAL_FLOAT32}, {LARGEST_FLOAT32}] "
        f"(float32's normal range; logits become softcap * tanh(logits / softcap)); got {softcap}",
    )


def check_gradient_and_saved(op: str, grad_logps: Tensor, source: Tensor, labels: Tensor, lse: Tensor,
                             logps: Tensor) -> None:
    """csrc/logps_checks.h's check_gradient_and_saved: the incoming gradient and the forward's
    outputs of a backward op whose forward read ``source`` (the logits, or the hidden states)."""
    torch._check_type(grad_logps.is_floating_point(),
                      lambda: f"{op}: grad_logps must be a floating-point tensor; got {grad_logps.dtype}")
    torch._check_value(
        grad_logps.shape == labels.shape and grad_logps.device == source.device,
        lambda: f"{op}: grad_logps must have the shape and device of labels ({list(labels.shape)} on "
        f"{source.device}); got {list(grad_logps.shape)} on {grad_logps.device}",
    )
    acc = accumulate_dtype(source)
    for name, t in (("lse", lse), ("logps", logps)):
        torch._check_type(t.dtype == acc, lambda: f"{op}: {name} must be the forward's {acc} output; got {t.dtype}")
        torch._check_value(
            t.shape == labels.shape and t.device == source.device,
            lambda: f"{op}: {name} must be the forward's output of shape {list(labels.shape)} on {source.device}; "
            f"got {list(t.shape)} on {t.device}",
        )


def check_linear_inputs(op: str, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> None:
    """The checks of csrc/linear_common.h: hidden states, the lm_head's weight and bias, and labels."""
    torch._check_value(hidden.dim() >= 2,
                       lambda: f"{op}: hidden must have shape [N, H] or [R, T, H]; got {list(hidden.shape)}")
    torch._check_value(weight.dim() == 2,
                       lambda: f"{op}: weight must have shape [V, H] (the lm_head); got {list(weight.shape)}")
    torch._check_type(hidden.dtype in SUPPORTED_DTYPES,
                      lambda: f"{op}: hidden must be float32, bfloat16, float16 or float64; got {hidden.dtype}")
    torch._check_type(weight.dtype == hidden.dtype,
                      lambda: f"{op}: weight and hidden must have the same dtype; got {weight.dtype} and {hidden.dtype}")
    torch._check_value(weight.shape[1] == hidden.shape[-1],
                       lambda: f"{op}: weight must have H = {hidden.shape[-1]} columns (the hidden size); "
                       f"got shape {list(weight.shape)}")
    torch._check_value(weight.shape[0] != 0, lambda: f"{op}: weight has an empty vocabulary dimension (V = 0)")
    torch._check_value(weight.device == hidden.device,
                       lambda: f"{op}: weight must be on the device of hidden ({hidden.device}); got {weight.device}")
    if bias is not None:
        torch._check_value(bias.shape == weight.shape[:1],
                           lambda: f"{op}: bias must have shape [V] = [{weight.shape[0]}]; got {list(bias.shape)}")
        torch._check_type(bias.dtype == hidden.dtype,
                          lambda: f"{op}: bias must have the dtype of hidden ({hidden.dtype}); got {bias.dtype}")
        torch._check_value(bias.device == hidden.device,
                           lambda: f"{op}: bias must be on the device of hidden ({hidden.device}); got {bias.device}")
    torch._check_type(labels.dtype == torch.long, lambda: f"{op}: labels must be int64 (torch.long); got {labels.dtype}")
    torch._check_value(labels.shape == hidden.shape[:-1],
                       lambda: f"{op}: labels must have the shape of hidden without its last dimension "
                       f"({list(hidden.shape[:-1])}); got {list(labels.shape)}")
    torch._check_value(labels.device == hidden.device,
                       lambda: f"{op}: labels must be on the device of hidden ({hidden.device}); got {labels.device}")
