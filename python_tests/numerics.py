"""How close an epa_ext result must be to the float64 ground truth, in one table per dtype.

float32 / float64 inputs: elementwise, |actual - truth| <= atol * max|truth| + rtol * |truth|.
bfloat16 / float16 inputs (flash-attention's rule): the kernel's largest error against float64
may be at most LOW_PRECISION_FACTOR times the largest error of plain PyTorch computing the same
thing in that dtype, plus a small slack relative to max|truth|.
"""

from __future__ import annotations

import torch
from torch import Tensor

# dtype -> (rtol, atol relative to max|truth|)
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
}
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_SLACK = {torch.bfloat16: 1e-3, torch.float16: 1e-4}


def max_error(actual: Tensor, truth: Tensor) -> float:
    both_finite = truth.isfinite() & actual.isfinite()
    if not both_finite.any():
        return 0.0
    return (actual.double() - truth)[both_finite].abs().max().item()


def assert_close_to_truth(actual: Tensor, truth: Tensor, *, dtype: torch.dtype, plain: Tensor | None = None,
                          what: str = "result", extra_rtol: float = 0.0) -> None:
    """actual: the epa_ext result; truth: float64 reference; plain: plain torch in `dtype`.

    extra_rtol widens the fp32/fp64 rtol by an error the caller can bound (see its use).
    """
    actual = actual.detach().cpu()
    truth = truth.detach().cpu().double()
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.equal(actual.isnan(), truth.isnan()), f"{what}: NaN in different places"
    assert torch.equal(actual.isinf(), truth.isinf()), f"{what}: inf in different places"
    scale = max(truth[truth.isfinite()].abs().max().item(), 1e-30) if truth.isfinite().any() else 1.0
    if dtype in TOLERANCES:
        rtol, atol = TOLERANCES[dtype]
        rtol += extra_rtol
        torch.testing.assert_close(actual.double(), truth, rtol=rtol, atol=atol * scale, equal_nan=True,
                                   msg=lambda m: f"{what} ({dtype}): {m}")
        return
    assert plain is not None, "low-precision checks compare against plain torch in that dtype"
    error = max_error(actual, truth)
    bound = LOW_PRECISION_FACTOR * max_error(plain.detach().cpu(), truth) + LOW_PRECISION_SLACK[dtype] * scale
    assert error <= bound, f"{what} ({dtype}): max error {error:.3g} > {bound:.3g} (2x plain torch + slack)"
