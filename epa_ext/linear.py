"""Sequence log-probs from hidden states and the lm_head, never forming the [N, V] logits.

    logits[n] = hidden[n] @ weight.T + bias          (only rows whose label is kept)
    logp[n]   = logits[n, y_n] - logsumexp(logits[n])   (of c * tanh(logits / c) with a softcap c)

The op (csrc/linear_logps.cpp) drops ignored rows before any matmul and goes through the rest
``max_chunk_tokens`` rows at a time: at most [max_chunk_tokens, V] logits exist at once, in forward
and in backward. The backward recomputes each chunk's logits (one extra matmul) instead of storing them:
4 matmuls of 2*N*H*V per training step. The preference losses have a 3-matmul path of their own
(epa_ext/linear_losses.py); this one is for log-probs that callers differentiate further.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import check_autograd_support
from ._kernel_contract import (IGNORE_INDEX, accumulate_dtype, check_gradient_and_saved, check_linear_inputs,
                               softcap_in_range)
from ._validation import (RENAMED, check_bool, check_int, check_optional_tensor, check_softcap, check_tensor,
                          refuse_renamed)


def _check_max_chunk_tokens(op: str, hidden: Tensor, max_chunk_tokens: int) -> None:
    torch._check_value(hidden.dim() == 2, lambda: f"{op}: hidden must have shape [N, H]; got {list(hidden.shape)}")
    torch._check_value(max_chunk_tokens >= 0, lambda: f"{op}: max_chunk_tokens must be a positive number of tokens "
                       f"(0: automatic, max(H, 512)); got {max_chunk_tokens}")


def refuse_second_order(op: str) -> None:
    """Raises when a backward runs under create_graph=True (a double backward, a Hessian-vector
    product, torch.func transforms). These backwards are not built of differentiable operations:
    the gradients they return would carry no graph, and a second derivative through them would
    silently miss this op's part."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: second-order gradients are not supported (the backward ran with create_graph=True: a double "
            "backward, a Hessian-vector product or a torch.func transform); compute them with the plain-torch "
            "definitions in epa_ext.eager")


@torch.library.register_fake("epa_ext::linear_token_logps")
def _linear_token_logps_fake(hidden, weight, bias, labels, ignore_index, max_chunk_tokens, fp32_weight_grad=True,
                             softcap=None):
    check_linear_inputs("linear_token_logps", hidden, weight, bias, labels)
    _check_max_chunk_tokens("linear_token_logps", hidden, max_chunk_tokens)
    softcap_in_range("linear_token_logps", softcap)
    out = hidden.new_empty(hidden.shape[:1], dtype=accumulate_dtype(hidden))
    return out, torch.empty_like(out)


@torch.library.register_fake("epa_ext::linear_token_logps_backward")
def _linear_token_logps_backward_fake(grad_logps, hidden, weight, bias, labels, lse, logps, ignore_index,
                                      max_chunk_tokens, output_mask, fp32_weight_grad, softcap=None):
    check_linear_inputs("linear_token_logps_backward", hidden, weight, bias, labels)
    _check_max_chunk_tokens("linear_token_logps_backward", hidden, max_chunk_tokens)
    softcap_in_range("linear_token_logps_backward", softcap)
    check_gradient_and_saved("linear_token_logps_backward", grad_logps, hidden, labels, lse, logps)
    need_hidden, need_weight, need_bias = output_mask
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else None,
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None,
        torch.empty_like(bias) if need_bias and bias is not None else None,
    )


def _linear_setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, ignore_index, max_chunk_tokens, *options = inputs
    logps, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, logps)
    ctx.options = (ignore_index, max_chunk_tokens)
    ctx.fp32_weight_grad = bool(options[0]) if options else True
    ctx.softcap = options[1] if len(options) > 1 else None
    ctx.mark_non_differentiable(lse)


def _linear_backward(ctx, grad_logps: Tensor | None, _grad_lse: Tensor | None):
    hidden, weight, bias, labels, lse, logps = ctx.saved_tensors
    output_mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if grad_logps is None or not any(output_mask):
        return (None,) * 8
    refuse_second_order("linear_token_logps")
    grad_hidden, grad_weight, grad_bias = torch.ops.epa_ext.linear_token_logps_backward(
        grad_logps, hidden, weight, bias, labels, lse, logps, *ctx.options, output_mask, ctx.fp32_weight_grad,
        ctx.softcap
    )
    return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


torch.library.register_autograd("epa_ext::linear_token_logps", _linear_backward, setup_context=_linear_setup_context)


def linear_token_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                       ignore_index: int = IGNORE_INDEX, max_chunk_tokens: int | None = None,
                       fp32_weight_grad: bool = True, softcap: float | None = None, **renamed) -> Tensor:
    """Per-token log-probs of labels under ``hidden @ weight.T + bias``, chunked over tokens.

    Args:
        hidden: [B, T, H] or [N, H] final hidden states (fp32/bf16/fp16).
        weight: [V, H] lm_head weight (may be tied to the input embedding), hidden's dtype.
        labels: [B, T] or [N] aligned labels; ignored positions skip every matmul.
        bias: optional [V].
        max_chunk_tokens: tokens (rows) per chunk (None: max(H, 512), so a chunk's logits are
            about the size of the lm_head); the fused-linear losses' name for it (formerly
            ``chunk_size`` here).
        fp32_weight_grad: accumulate the weight and bias gradients over chunks in fp32 for
            bf16/fp16 weights (one rounding at the end instead of one per chunk).
        softcap: None, or c > 0: the log-probs of ``c * tanh(logits / c)`` (as ``token_logps``).

    Returns:
        labels' shape, fp32: log-probs, 0 where ignored. Differentiable in hidden, weight and
        bias; gradients that are not needed (a frozen head) are not computed.
    """
    refuse_renamed("linear_token_logps", renamed, RENAMED)
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        check_tensor(name, value)
    check_optional_tensor("bias", bias)
    check_int("ignore_index", ignore_index)
    check_bool("fp32_weight_grad", fp32_weight_grad)
    softcap = check_softcap(softcap)
    check_autograd_support("linear_token_logps", hidden, weight, bias)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape [B, T, H] or [N, H]; got {list(hidden.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have the shape of hidden without its last dimension "
                         f"({list(hidden.shape[:-1])}); got {list(labels.shape)}")
    if labels.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        labels = labels.long()
    if max_chunk_tokens is not None and check_int("max_chunk_tokens", max_chunk_tokens) <= 0:
        raise ValueError(f"max_chunk_tokens must be a positive number of tokens or None; got {max_chunk_tokens}")
    logps, _ = torch.ops.epa_ext.linear_token_logps(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), ignore_index, max_chunk_tokens or 0,
        fp32_weight_grad, softcap,
    )
    return logps.view(labels.shape)


def linear_sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                          ignore_index: int = IGNORE_INDEX, average: bool = False,
                          max_chunk_tokens: int | None = None, fp32_weight_grad: bool = True,
                          softcap: float | None = None, **renamed) -> Tensor:
    """Sequence log-probs from hidden states and the lm_head, never forming [B*T, V] logits.

    Args:
        hidden: [B, T, H] (or [N, H] for one sequence); weight [V, H]; labels [B, T] (or [N]).
        average: divide by the number of non-ignored labels (0 for a sequence that has none).
        Other arguments as in ``linear_token_logps``.

    Returns:
        [B] fp32 (a scalar for [N, H] hidden): ``sum_t log softmax(hidden[b, t] @ weight.T + bias)[labels[b, t]]``.
    """
    refuse_renamed("linear_sequence_logps", renamed, RENAMED)
    check_bool("average", average)
    tokens = linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                max_chunk_tokens=max_chunk_tokens, fp32_weight_grad=fp32_weight_grad, softcap=softcap)
    total = tokens.sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp_min(1).to(total.dtype)
    return total
