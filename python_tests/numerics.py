"""How close an epa_ext result must be to the float64 ground truth, in one table per dtype.

float32 / float64 inputs: elementwise, |actual - truth| <= atol * max(max|truth|, 1) + rtol * |truth|
(the floor at 1: log-probs and their gradients are O(1) quantities, and an fp32 log(1 + tiny) is
off by half an ulp of 1 whatever computes it).
bfloat16 / float16 inputs (flash-attention's rule): the kernel's largest error against float64
may be at most LOW_PRECISION_FACTOR times the largest error of plain PyTorch computing the same
thing in that dtype, plus one ulp of that dtype at the scale of max|truth| (its machine
epsilon): a result returned in bf16/fp16 is rounded once, and so are the bf16/fp16 inputs of any
matmul after the kernel, whatever the kernel does; and on tiny tensors plain torch's own error
can be near zero by luck.

Two refinements, each for a bound the caller can state:
- inputs_scale: a result computed in fp32 from inputs of magnitude M carries an absolute error of
  about eps32 * M whatever its own size (a log-ratio or a logsumexp minus one of its terms cancels),
  so the fp32/fp64 atol is taken relative to max(max|truth|, inputs_scale, 1).
- assert_rounded_once: results that the kernels compute in fp32 and round once to a bf16/fp16
  output (the loss gradients): within half an ulp of that dtype, relative; a tighter bound than
  the low-precision rule above, which is for results whose computation itself is in that dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

# dtype -> (rtol, atol relative to max|truth|)
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
}
# torch.autograd.gradcheck / gradgradcheck on float64 log-probs of O(1) logits: a central difference
# with step eps is off by about eps^2 + 2^-52 / eps ~ 1e-10, so atol can be 1000x tighter than
# gradcheck's default 1e-5, which would let a gradient off by 1e-6 pass.
GRADCHECK = dict(eps=1e-6, atol=1e-8)
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_SLACK = {torch.bfloat16: torch.finfo(torch.bfloat16).eps, torch.float16: torch.finfo(torch.float16).eps}
# dtype -> rtol of one rounding to that dtype of an fp32 (fp64) result: half its machine epsilon for
# bf16/fp16; for fp32/fp64 the rtol of TOLERANCES (the computation's own error dominates).
ONE_ROUNDING_RTOL = {
    torch.float64: TOLERANCES[torch.float64][0],
    torch.float32: TOLERANCES[torch.float32][0],
    torch.bfloat16: torch.finfo(torch.bfloat16).eps / 2,
    torch.float16: torch.finfo(torch.float16).eps / 2,
}


def max_error(actual: Tensor, truth: Tensor) -> float:
    both_finite = truth.isfinite() & actual.isfinite()
    if not both_finite.any():
        return 0.0
    return (actual.double() - truth)[both_finite].abs().max().item()


def assert_close_to_truth(actual: Tensor, truth: Tensor, *, dtype: torch.dtype, plain: Tensor | None = None,
                          what: str = "result", extra_rtol: float = 0.0, slack_ulps: float = 1.0,
                          inputs_scale: float = 0.0) -> None:
    """actual: the epa_ext result; truth: float64 reference; plain: plain torch in `dtype`.

    extra_rtol widens the fp32/fp64 rtol by an error the caller can bound; slack_ulps widens the
    bf16/fp16 slack for results that are sums of many rounded terms (see their uses);
    inputs_scale is the magnitude of the inputs the result is computed from (see above).
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
        torch.testing.assert_close(actual.double(), truth, rtol=rtol, atol=atol * max(scale, inputs_scale, 1.0),
                                   equal_nan=True,
                                   msg=lambda m: f"{what} ({dtype}): {m}")
        return
    assert plain is not None, "low-precision checks compare against plain torch in that dtype"
    error = max_error(actual, truth)
    bound = LOW_PRECISION_FACTOR * max_error(plain.detach().cpu(), truth) + slack_ulps * LOW_PRECISION_SLACK[dtype] * scale
    assert error <= bound, f"{what} ({dtype}): max error {error:.3g} > {bound:.3g} (2x plain torch + slack)"


def assert_paths_agree(actual: Tensor | float, expected: Tensor | float, *, what: str = "result",
                       inputs_scale: float = 0.0) -> None:
    """Two paths of the same fp32 computation (the fused-linear op against the logits path, the
    three-matmul path against the recomputing one, compiled against eager, a metric epa-train
    logged against the test's own plain-torch forward): each lies within the fp32 tolerance of
    the float64 truth, so they agree within twice that tolerance. inputs_scale: the magnitude of
    the inputs a result is computed from (a reward beta * (policy - reference) from log-probs of
    magnitude M cancels down to an absolute error of about eps32 * M; see the module docstring)."""
    rtol, atol = TOLERANCES[torch.float32]
    actual = torch.as_tensor(actual).detach().cpu().double()
    expected = torch.as_tensor(expected).detach().cpu().double()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, inputs_scale, 1.0)
    torch.testing.assert_close(actual, expected, rtol=2 * rtol, atol=2 * atol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def assert_rounded_once(actual: Tensor, truth: Tensor, *, dtype: torch.dtype, what: str = "result") -> None:
    """actual: an fp32 (fp64) computation returned in `dtype`; truth: float64. Relative error at
    most ONE_ROUNDING_RTOL[dtype]; the atol (1% of it, at unit scale) only covers values near 0,
    where the fp32 computation's own absolute error (~1e-7) dominates the rounding."""
    rtol = ONE_ROUNDING_RTOL[dtype]
    torch.testing.assert_close(actual.detach().cpu().double(), truth.detach().cpu().double(), rtol=rtol,
                               atol=rtol * 1e-2, equal_nan=True, msg=lambda m: f"{what} ({dtype}): {m}")


# --- EPATrainer against TRL's DPOTrainer (python_tests/test_trl.py) ----------------------------------
# Losses and logged metrics of the two trainers, same model, seed and batches, fp32, step by step:
# |epa - trl| <= atol * max(|trl|, 1) + rtol * |trl|, the fp32 rule above. Both compute the same fp32
# quantities and differ only in reduction order (TRL scores every position in vocabulary tiles, epa_ext
# the kept rows in token chunks; different matmul blockings, sequence sums and loss formulas): each
# step's log-probs, losses and gradients agree to a few ulps of their scale (measured: 3e-7 relative on
# losses and metrics, 3e-7 of each gradient tensor's largest element). A missed or extra token, a wrong
# length normalization or a mis-stacked candidate moves them by far more than 1e-5.
TRL_PARITY = TOLERANCES[torch.float32]
# Final weights after AdamW: the fp32 rule plus ADAM_SLACK * (optimizer steps * lr). AdamW's step
# m / (sqrt(v) + eps) is normalized per element, so an element whose gradient is near zero, and hence
# carries a large relative rounding error (measured: 2e-4 at 1e-4 of its tensor's largest gradient),
# moves by a different fraction of lr in each run; steps * lr bounds how far AdamW moves any weight,
# and 1 % of it stays far below what a systematic error does to every element (measured: 3e-6 =
# 0.06 % with IPO, 1.5e-7 with sigmoid, over 5 steps at lr 1e-3). With plain SGD the update is
# lr * gradient and the fp32 rule alone applies (tested).
ADAM_SLACK = 1e-2


def assert_trl_parity(actual: float | Tensor, expected: float | Tensor, what: str, *, extra_atol: float = 0.0) -> None:
    """actual (epa_ext's) against expected (TRL's) under TRL_PARITY, elementwise for tensors;
    extra_atol widens the absolute tolerance (AdamW's, see ADAM_SLACK)."""
    rtol, atol = TRL_PARITY
    actual = torch.as_tensor(actual, dtype=torch.float64).detach().cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64).detach().cpu()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale + extra_atol,
                               msg=lambda m: f"{what}: {m}")


# --- epa-train runs against each other (python_tests/test_train*.py) ----------------------------------
# Final weights of two fp32 runs of the same training whose reductions are ordered differently (2
# ranks of B prompts against 1 process of 2B, DDP or FSDP2): AdamW divides each gradient element by
# its own running RMS, which magnifies the rounding differences of near-zero gradients (rarely used
# embedding rows), so elementwise tolerances do not fit. Instead each tensor's change from the initial
# weights is compared in norm: |second - first| <= WEIGHT_CHANGE_RTOL * |first - initial|. Measured on
# the tiny model (3-4 steps at lr 1e-3, torch 2.14.1, CPU): 1.5e-5 for DDP, 1.2e-5 for FSDP2, the
# worst tensor. AdamW's update hardly depends on the gradient's scale, so final weights cannot tell a
# sum over ranks from a mean: test_train_distributed.py compares the reduced gradients themselves.
WEIGHT_CHANGE_RTOL = 10 * TOLERANCES[torch.float32][0]
