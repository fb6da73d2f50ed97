"""Log-probabilities of labels under logits: public functions, fake kernels and autograd.

Formulas (per row r of logits, vocabulary V, target y_r):

    logp[r]    = z[r, y_r] - logsumexp_v z[r, v]          (0 where y_r == ignore_index)
    d/dz[r, v] = g[r] * (1[v == y_r] - softmax(z[r])_v)   (0 where y_r == ignore_index)

The forward kernel keeps only two fp32 numbers per row (the logsumexp and the log-prob it
returns); the backward kernel recomputes the softmax from them in one pass and writes d(logits)
in the logits' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""The label of positions that are not scored (prompt, padding), as in PyTorch's cross_entropy and TRL."""

_SUPPORTED_LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _accumulate_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_logits_and_labels(op: str, logits: Tensor, labels: Tensor) -> None:
    """The checks of csrc/logps_checks.h, for fake tensors (torch.compile, meta)."""
    torch._check(
        logits.dim() in (2, 3),
        lambda: f"{op}: logits must have shape [N, V] or [B, T, V]; got shape {list(logits.shape)}",
    )
    torch._check(
        logits.dtype in _SUPPORTED_LOGITS_DTYPES,
        lambda: f"{op}: logits must be float32, bfloat16, float16 or float64; got {logits.dtype}",
    )
    torch._check(logits.shape[-1] != 0, lambda: f"{op}: logits has an empty vocabulary dimension (V = 0)")
    torch._check(labels.dtype == torch.long, lambda: f"{op}: labels must be int64 (torch.long); got {labels.dtype}")
    torch._check(
        labels.shape == logits.shape[:-1],
        lambda: f"{op}: labels must have the shape of logits without its last dimension "
        f"({list(logits.shape[:-1])}); got {list(labels.shape)}",
    )
    torch._check(
        labels.device == logits.device,
        lambda: f"{op}: labels and logits must be on the same device; got labels on "
        f"{labels.device} and logits on {logits.device}",
    )


@torch.library.register_fake("epa_ext::token_logps")
def _token_logps_fake(
    logits: Tensor, labels: Tensor, ignore_index: int, inplace_backward: bool = False
) -> tuple[Tensor, Tensor]:
    _check_logits_and_labels("token_logps", logits, labels)
    dtype = _accumulate_dtype(logits)
    return labels.new_empty(labels.shape, dtype=dtype), labels.new_empty(labels.shape, dtype=dtype)


@torch.library.register_fake("epa_ext::token_logps_backward")
def _token_logps_backward_fake(
    grad_logps: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, logps: Tensor, ignore_index: int
) -> Tensor:
    _check_logits_and_labels("token_logps_backward", logits, labels)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("epa_ext::token_logps_backward_")
def _token_logps_backward_inplace_fake(
    grad_logps: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, logps: Tensor, ignore_index: int
) -> None:
    _check_logits_and_labels("token_logps_backward", logits, labels)


def _token_logps_setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, *inplace = inputs
    logps, lse = output
    ctx.save_for_backward(logits, labels, lse, logps)
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = bool(inplace and inplace[0])
    ctx.mark_non_differentiable(lse)


def _token_logps_backward(ctx, grad_logps: Tensor | None, _grad_lse: Tensor | None):
    logits, labels, lse, logps = ctx.saved_tensors
    if grad_logps is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    if ctx.inplace_backward:
        # The caller promised not to read logits again: their storage becomes their gradient.
        torch.ops.epa_ext.token_logps_backward_(grad_logps, logits, labels, lse, logps, ctx.ignore_index)
        return logits, None, None, None
    grad_logits = torch.ops.epa_ext.token_logps_backward(grad_logps, logits, labels, lse, logps, ctx.ignore_index)
    return grad_logits, None, None, None


torch.library.register_autograd(
    "epa_ext::token_logps", _token_logps_backward, setup_context=_token_logps_setup_context
)


def _prepare(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Argument types and the two conversions the kernels leave to the caller."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor; got {type(logits).__name__}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {type(ignore_index).__name__}")
    if labels.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        labels = labels.long()
    if logits.dim() > 0 and logits.stride(-1) != 1:
        # The kernels need unit stride along V; any other stride pattern is read in place.
        logits = logits.contiguous()
    return logits, labels


def token_logps(
    logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX, inplace_backward: bool = False
) -> Tensor:
    """Log-probability of each label under its row of logits, fused and without a [.., V] buffer.

    Args:
        logits: [N, V] or [B, T, V], float32/bfloat16/float16 (float64 for checks). Any strides
            with the last dimension contiguous (``logits[:, :-1]`` is read without a copy).
        labels: [N] or [B, T] integer class ids aligned with logits (see ``completion_labels``);
            positions equal to ``ignore_index`` are skipped and never read.
        inplace_backward: write d(logits) into logits' own storage during backward instead of
            a new [.., V] buffer. Only for callers that do not read logits after the backward
            (and whose logits are not saved by another autograd node, e.g. a softcapping tanh).

    Returns:
        [N] or [B, T] float32 (float64 for float64 logits):
        ``logits[..., y] - logsumexp(logits[...])``, 0 where ignored. Differentiable in logits.
    """
    logits, labels = _prepare(logits, labels, ignore_index)
    logps, _ = torch.ops.epa_ext.token_logps(logits, labels, ignore_index, inplace_backward)
    return logps


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    average: bool = False,
    inplace_backward: bool = False,
) -> Tensor:
    """Sum (or mean) of the token log-probabilities of each sequence.

    Args:
        logits: [B, T, V] (or [N, V] for a single sequence); as in ``token_logps``.
        labels: [B, T] (or [N]) aligned labels, ``ignore_index`` outside the completion.
        average: divide by the number of non-ignored labels (0 for a sequence that has none);
            the length-normalized log-prob that IPO uses.
        inplace_backward: as in ``token_logps``.

    Returns:
        [B] float32 (a scalar for [N, V] logits):
        ``sum_t logp[b, t]`` or ``sum_t logp[b, t] / #{t : labels[b, t] != ignore_index}``.
    """
    logits, labels = _prepare(logits, labels, ignore_index)
    total = torch.ops.epa_ext.token_logps(logits, labels, ignore_index, inplace_backward)[0].sum(-1)
    if average:
        counts = (labels != ignore_index).sum(-1).clamp_min(1)
        total = total / counts.to(total.dtype)
    return total


def completion_labels(input_ids: Tensor, completion_mask: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Labels aligned with the logits of a causal LM, keeping only completion tokens.

    The logits at position t predict token t + 1, so

        labels[b, t] = input_ids[b, t + 1]  if completion_mask[b, t + 1]  else ignore_index
        labels[b, T - 1] = ignore_index

    Args:
        input_ids: [B, T] (or [T]) integer token ids.
        completion_mask: same shape, bool (or 0/1 integers): True on completion tokens, False on
            the prompt and on padding.

    Returns:
        [B, T] (or [T]) int64, to pass with the model's logits to ``sequence_logps``.
    """
    if not isinstance(input_ids, Tensor) or not isinstance(completion_mask, Tensor):
        raise TypeError("input_ids and completion_mask must be torch.Tensors")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids; got {input_ids.dtype}")
    if completion_mask.is_floating_point() or completion_mask.is_complex():
        raise TypeError(f"completion_mask must be bool (or 0/1 integers); got {completion_mask.dtype}")
    if input_ids.dim() == 0:
        raise ValueError("input_ids must have shape [B, T] or [T]; got a scalar")
    if completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"completion_mask must have the shape of input_ids ({list(input_ids.shape)}); "
            f"got {list(completion_mask.shape)}"
        )
    if completion_mask.device != input_ids.device:
        raise ValueError(
            f"completion_mask and input_ids must be on the same device; got {completion_mask.device} "
            f"and {input_ids.device}"
        )
    next_ids = input_ids[..., 1:].long()
    shifted = torch.where(completion_mask[..., 1:].bool(), next_ids, torch.full_like(next_ids, ignore_index))
    last = torch.full_like(input_ids[..., :1], ignore_index, dtype=torch.long)
    return torch.cat([shifted, last], dim=-1)
