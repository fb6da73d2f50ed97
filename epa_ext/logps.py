"""Log-probabilities of labels under logits: public functions, fake kernels and autograd.

Formulas (per row r of logits, vocabulary V, target y_r):

    logp[r]    = z[r, y_r] - logsumexp_v z[r, v]          (0 where y_r == ignore_index)
    d/dz[r, v] = g[r] * (1[v == y_r] - softmax(z[r])_v)   (0 where y_r == ignore_index)

With ``softcap`` c (Gemma-2/3's final_logit_softcapping) every logit z is replaced by
c * tanh(z / c) before the softmax, and each column's gradient is multiplied by 1 - tanh^2(z / c).

The forward kernel keeps only two fp32 numbers per row (the logsumexp and the log-prob it
returns); the backward kernel recomputes the softmax from them in one pass and writes d(logits)
in the logits' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import eager
from ._autograd import check_autograd_support, gradients_by_definition
from ._kernel_contract import (IGNORE_INDEX, SUPPORTED_DTYPES, accumulate_dtype, check_gradient_and_saved,
                               softcap_in_range)
from ._validation import check_bool, check_int, check_same_device, check_softcap, check_tensor


def _check_logits_and_labels(op: str, logits: Tensor, labels: Tensor) -> None:
    """The checks of csrc/logps_checks.h, for fake tensors (torch.compile, meta)."""
    torch._check_value(
        logits.dim() in (2, 3),
        lambda: f"{op}: logits must have shape [N, V] or [B, T, V]; got shape {list(logits.shape)}",
    )
    torch._check_type(
        logits.dtype in SUPPORTED_DTYPES,
        lambda: f"{op}: logits must be float32, bfloat16, float16 or float64; got {logits.dtype}",
    )
    torch._check_value(logits.shape[-1] != 0, lambda: f"{op}: logits has an empty vocabulary dimension (V = 0)")
    torch._check_type(labels.dtype == torch.long,
                      lambda: f"{op}: labels must be int64 (torch.long); got {labels.dtype}")
    torch._check_value(
        labels.shape == logits.shape[:-1],
        lambda: f"{op}: labels must have the shape of logits without its last dimension "
        f"({list(logits.shape[:-1])}); got {list(labels.shape)}",
    )
    torch._check_value(
        labels.device == logits.device,
        lambda: f"{op}: labels and logits must be on the same device; got labels on "
        f"{labels.device} and logits on {logits.device}",
    )


def _rows_may_overlap(logits: Tensor) -> bool:
    """csrc/logps_checks.h's rows_may_overlap: may two rows of logits share memory?"""
    extent = logits.shape[-1]
    for stride, size in sorted(zip(logits.stride()[:-1], logits.shape[:-1])):
        if size == 1:
            continue
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def _check_rows_writable(op: str, logits: Tensor) -> None:
    torch._check_value(
        not _rows_may_overlap(logits),
        lambda: f"{op}: inplace_backward=True writes the gradient over logits, whose rows share memory (an "
        f"expanded or overlapping view; strides {list(logits.stride())}). Pass inplace_backward=False, or "
        "logits.contiguous()",
    )


def _check_backward_inputs(op: str, grad_logps: Tensor, logits: Tensor, labels: Tensor, lse: Tensor,
                           logps: Tensor) -> None:
    """csrc/logps_checks.h's check_backward_inputs."""
    _check_logits_and_labels(op, logits, labels)
    check_gradient_and_saved(op, grad_logps, logits, labels, lse, logps)


@torch.library.register_fake("epa_ext::token_logps")
def _token_logps_fake(
    logits: Tensor, labels: Tensor, ignore_index: int, inplace_backward: bool = False, softcap: float | None = None
) -> tuple[Tensor, Tensor]:
    _check_logits_and_labels("token_logps", logits, labels)
    softcap_in_range("token_logps", softcap)
    if inplace_backward:
        _check_rows_writable("token_logps", logits)
    dtype = accumulate_dtype(logits)
    return labels.new_empty(labels.shape, dtype=dtype), labels.new_empty(labels.shape, dtype=dtype)


@torch.library.register_fake("epa_ext::token_logps_backward")
def _token_logps_backward_fake(
    grad_logps: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, logps: Tensor, ignore_index: int,
    softcap: float | None = None,
) -> Tensor:
    _check_backward_inputs("token_logps_backward", grad_logps, logits, labels, lse, logps)
    softcap_in_range("token_logps_backward", softcap)
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.register_fake("epa_ext::token_logps_backward_")
def _token_logps_backward_inplace_fake(
    grad_logps: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, logps: Tensor, ignore_index: int,
    softcap: float | None = None,
) -> None:
    _check_backward_inputs("token_logps_backward_", grad_logps, logits, labels, lse, logps)
    _check_rows_writable("token_logps_backward_", logits)
    softcap_in_range("token_logps_backward_", softcap)


# --- autograd of token_logps ---------------------------------------------------------------------


def _token_logps_setup_context(ctx, inputs, output) -> None:
    logits, labels, ignore_index, *options = inputs
    logps, lse = output
    ctx.save_for_backward(logits, labels, lse, logps)
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = bool(options and options[0])
    ctx.softcap = options[1] if len(options) > 1 else None
    ctx.logits_consumed = False
    ctx.mark_non_differentiable(lse)


def _token_logps_backward(ctx, grad_logps: Tensor | None, _grad_lse: Tensor | None):
    if grad_logps is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    # Under create_graph=True the gradient must stay differentiable (token_logps_backward has a
    # double backward, below), and it needs the logits: the in-place variant would destroy them.
    in_place = ctx.inplace_backward and not torch.is_grad_enabled()
    if in_place and ctx.logits_consumed:
        raise RuntimeError(
            "token_logps: this graph was built with inplace_backward=True, and an earlier backward through it "
            "already overwrote the logits with their gradient, so it cannot be differentiated again "
            "(retain_graph=True does not keep the logits). Pass inplace_backward=False to backpropagate more "
            "than once."
        )
    logits, labels, lse, logps = ctx.saved_tensors
    if in_place:
        # The caller promised not to read logits again: their storage becomes their gradient. The op
        # bumps logits' version, so any other node that saved them refuses to run on the result.
        torch.ops.epa_ext.token_logps_backward_(grad_logps, logits, labels, lse, logps, ctx.ignore_index,
                                                ctx.softcap)
        ctx.logits_consumed = True
        return logits, None, None, None, None
    grad_logits = torch.ops.epa_ext.token_logps_backward(grad_logps, logits, labels, lse, logps, ctx.ignore_index,
                                                         ctx.softcap)
    return grad_logits, None, None, None, None


torch.library.register_autograd(
    "epa_ext::token_logps", _token_logps_backward, setup_context=_token_logps_setup_context
)


# --- double backward: autograd of token_logps_backward ----------------------------------------------
#
# With G = g * (onehot(y) - p), p = softmax(z), and U the gradient flowing into G:
#     d/dg = U_y - <U, p>
#     d/dz = -g * p * (U - <U, p>)
# (0 on ignored rows). Written with torch ops, so it is itself differentiable. lse and logps are
# functions of z whose effect on G the d/dz above already holds in full: they get no gradient.
# With a softcap, G also carries the cap's slope; its derivatives come from autograd on the
# plain-torch definition (epa_ext.eager.token_logps) instead.


def _token_logps_backward_setup_context(ctx, inputs, output) -> None:
    grad_logps, logits, labels, _lse, _logps, ignore_index, *softcap = inputs
    ctx.save_for_backward(grad_logps, logits, labels)
    ctx.ignore_index = ignore_index
    ctx.softcap = softcap[0] if softcap else None


def _capped_double_backward(ctx, grad_grad_logits: Tensor):
    """d/d(grad_logps, logits) of <U, G(grad_logps, logits)> through the definition of G: the
    gradient of sum(grad_logps * eager.token_logps(logits)) with respect to logits."""
    grad_logps, logits, labels = ctx.saved_tensors
    acc = accumulate_dtype(logits)
    kept = (labels != ctx.ignore_index).unsqueeze(-1)

    def gradient(g: Tensor, z: Tensor) -> Tensor:
        if not z.requires_grad:  # only grad_logps needs a gradient: G still is a function of z
            z = z.detach().requires_grad_()
        # Ignored rows are never read by the kernels and may hold anything: keep them out of softmax.
        logps = eager.token_logps(torch.where(kept, z.to(acc), 0), labels, ctx.ignore_index, softcap=ctx.softcap)
        (grad,) = torch.autograd.grad(logps, z, g.to(acc), create_graph=True)
        return grad

    grad_g, grad_z = gradients_by_definition(gradient, (grad_logps, logits), ctx.needs_input_grad[:2],
                                             grad_grad_logits)
    return grad_g, grad_z, None, None, None, None, None


def _token_logps_double_backward(ctx, grad_grad_logits: Tensor):
    if ctx.softcap is not None:
        return _capped_double_backward(ctx, grad_grad_logits)
    grad_logps, logits, labels = ctx.saved_tensors
    acc = accumulate_dtype(logits)
    kept = labels != ctx.ignore_index
    # Ignored rows are never read by the kernels and may hold anything: keep them out of softmax.
    probs = torch.softmax(torch.where(kept.unsqueeze(-1), logits, 0).to(acc), dim=-1)
    upstream = grad_grad_logits.to(acc)
    inner = (upstream * probs).sum(-1)
    target = upstream.gather(-1, labels.masked_fill(~kept, 0).unsqueeze(-1)).squeeze(-1)
    grad_g = torch.where(kept, target - inner, 0).to(grad_logps.dtype) if ctx.needs_input_grad[0] else None
    grad_z = None
    if ctx.needs_input_grad[1]:
        scale = torch.where(kept, grad_logps.to(acc), 0).unsqueeze(-1)
        grad_z = (-scale * probs * (upstream - inner.unsqueeze(-1))).to(logits.dtype)
    return grad_g, grad_z, None, None, None, None, None


torch.library.register_autograd(
    "epa_ext::token_logps_backward", _token_logps_double_backward, setup_context=_token_logps_backward_setup_context
)


# --- public functions --------------------------------------------------------------------------------


def _prepare(function: str, logits: object, labels: object, ignore_index: object,
             inplace_backward: object, softcap: object) -> tuple[Tensor, Tensor, float | None]:
    """Argument checks and the two conversions the kernels leave to the caller."""
    logits = check_tensor("logits", logits)
    labels = check_tensor("labels", labels)
    check_int("ignore_index", ignore_index)
    check_bool("inplace_backward", inplace_backward)
    softcap = check_softcap(softcap)
    check_autograd_support(function, logits)
    check_same_device("labels", labels, "logits", logits)
    if labels.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        labels = labels.long()
    if inplace_backward and logits.requires_grad:
        _check_not_a_leaf(logits)
    if logits.dim() > 0 and logits.stride(-1) != 1:
        # The kernels need unit stride along V; any other stride pattern is read in place.
        logits = logits.contiguous()
    return logits, labels, softcap


def _check_not_a_leaf(logits: Tensor) -> None:
    """inplace_backward=True overwrites logits' storage: refuse when it is (a view of) a leaf."""
    base = logits if logits._base is None else logits._base
    if base.is_leaf:
        what = "a leaf tensor" if base is logits else "a view of a leaf tensor"
        raise ValueError(
            f"inplace_backward=True would overwrite logits, {what} (a parameter or a tensor you created), with "
            "its gradient. Pass inplace_backward=False, or logits computed by the model (e.g. its lm_head output)"
        )


def token_logps(
    logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX, inplace_backward: bool = False,
    softcap: float | None = None,
) -> Tensor:
    """Log-probability of each label under its row of logits, fused and without a [.., V] buffer.

    Args:
        logits: [N, V] or [B, T, V], float32/bfloat16/float16 (float64 for checks). Any strides
            with the last dimension contiguous (``logits[:, :-1]`` is read without a copy).
        labels: [N] or [B, T] integer class ids aligned with logits (see ``completion_labels``);
            positions equal to ``ignore_index`` are skipped and never read.
        inplace_backward: write d(logits) into logits' own storage during backward instead of
            a new [.., V] buffer, for callers that never read logits after the backward. Refused
            (ValueError) for a leaf tensor or a view of one, and for logits whose rows share
            memory (an expanded view). A second backward through the same graph raises, and so
            does any other autograd node that saved logits and runs after this backward (their
            version counter is bumped). Not detectable: reading logits yourself after the backward
            (you get the gradient), or another view of the same storage that autograd did not save.
            Under ``create_graph=True`` the backward writes a new buffer instead (the graph of
            the gradient needs the logits).
        softcap: None, or c > 0 (finite): the log-probs are those of ``c * tanh(logits / c)``
            (Gemma-2/3's ``final_logit_softcapping``), capped in fp32 inside the kernel; the
            gradient carries the cap's slope ``1 - tanh^2(logits / c)``.

    Returns:
        [N] or [B, T] float32 (float64 for float64 logits):
        ``z[..., y] - logsumexp(z[...])`` with z the (capped) logits, 0 where ignored. Differentiable in logits,
        twice and more (``torch.autograd.grad(..., create_graph=True)``); not under torch.func's
        differentiating transforms or forward-mode AD (NotImplementedError), see epa_ext._autograd.
    """
    logits, labels, softcap = _prepare("token_logps", logits, labels, ignore_index, inplace_backward, softcap)
    logps, _ = torch.ops.epa_ext.token_logps(logits, labels, ignore_index, inplace_backward, softcap)
    return logps


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    average: bool = False,
    inplace_backward: bool = False,
    softcap: float | None = None,
) -> Tensor:
    """Sum (or mean) of the token log-probabilities of each sequence.

    Args:
        logits: [B, T, V] (or [N, V] for a single sequence); as in ``token_logps``.
        labels: [B, T] (or [N]) aligned labels, ``ignore_index`` outside the completion.
        average: divide by the number of non-ignored labels (0 for a sequence that has none);
            the length-normalized log-prob that IPO uses.
        inplace_backward, softcap: as in ``token_logps``.

    Returns:
        [B] float32 (a scalar for [N, V] logits):
        ``sum_t logp[b, t]`` or ``sum_t logp[b, t] / #{t : labels[b, t] != ignore_index}``.
    """
    check_bool("average", average)
    logits, labels, softcap = _prepare("sequence_logps", logits, labels, ignore_index, inplace_backward, softcap)
    total = torch.ops.epa_ext.token_logps(logits, labels, ignore_index, inplace_backward, softcap)[0].sum(-1)
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
    input_ids = check_tensor("input_ids", input_ids)
    completion_mask = check_tensor("completion_mask", completion_mask)
    check_int("ignore_index", ignore_index)
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
    check_same_device("completion_mask", completion_mask, "input_ids", input_ids)
    next_ids = input_ids[..., 1:].long()
    shifted = torch.where(completion_mask[..., 1:].bool(), next_ids, torch.full_like(next_ids, ignore_index))
    last = torch.full_like(input_ids[..., :1], ignore_index, dtype=torch.long)
    return torch.cat([shifted, last], dim=-1)
