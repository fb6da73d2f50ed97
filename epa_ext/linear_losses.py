"""DPO and EPA from hidden states and the lm_head with the gradient formed in the forward: fake
kernels and autograd of ``epa_ext::linear_dpo_loss`` / ``linear_epa_loss`` (csrc/linear_losses.cpp).

The op packs whole prompt groups (the C candidates of one prompt, candidate-major rows c*B + b)
into chunks of at most ``max_chunk_tokens`` kept tokens and per chunk runs

    logits = h W^T (+ b)  ->  log-probs  ->  sequence sums  ->  dL/dlogp per sequence
    ->  G = dL/dlogits (in place)  ->  d(hidden)[rows] = G W,  d(weight) += G^T h,  d(bias) += sum G

so a training step costs 3 matmuls of 2*N*H*V (eager's count) and no [N, V] buffer. It returns
the gradients with the loss; backward only multiplies them by the upstream gradient, in place
(skipped where that gradient is known to be 1 without a device synchronization: a CPU scalar).
Hence a second backward through the same graph is refused, and so is a second derivative.
``fused_linear_dpo_loss`` / ``fused_linear_epa_loss`` (epa_ext/fused.py) choose this path or the
recomputing one (docs/losses.md).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._kernel_contract import accumulate_dtype, check_linear_inputs, softcap_in_range
from ._validation import beta_in_range
from .linear import refuse_second_order


def _check_loss_inputs(op: str, hidden, weight, bias, labels, ref_logps, candidates: int, reduction: str,
                       sft_weight: float, average: bool, ref_logps_averaged: bool, max_chunk_tokens: int,
                       softcap: float | None) -> None:
    """The checks of csrc/linear_losses.cpp, for fake tensors (torch.compile, meta)."""
    check_linear_inputs(op, hidden, weight, bias, labels)
    softcap_in_range(op, softcap)
    torch._check_value(hidden.dim() == 3, lambda: f"{op}: hidden must have shape [C*B, T, H]; got {list(hidden.shape)}")
    rows = hidden.shape[0]
    torch._check_value(candidates >= 2 and rows % candidates == 0,
                       lambda: f"{op}: hidden must stack num_candidates = {candidates} candidates of each prompt "
                       f"(C*B rows, candidate-major); got {rows} rows")
    torch._check_type(ref_logps.is_floating_point(),
                      lambda: f"{op}: ref_logps must be a floating-point tensor; got {ref_logps.dtype}")
    torch._check_value(ref_logps.shape == (rows,),
                       lambda: f"{op}: ref_logps must have shape [C*B] = [{rows}]; got {list(ref_logps.shape)}")
    torch._check_value(ref_logps.device == hidden.device,
                       lambda: f"{op}: ref_logps must be on the device of hidden ({hidden.device}); got {ref_logps.device}")
    torch._check_value(reduction in ("mean", "sum"),
                       lambda: f"{op}: reduction must be 'mean' or 'sum' (reduction='none' takes the recomputing "
                       f"path of fused_linear_*_loss); got '{reduction}'")
    torch._check_value(0 <= sft_weight < float("inf"),
                       lambda: f"{op}: sft_weight must be a finite number >= 0; got {sft_weight}")
    torch._check_value(average or not ref_logps_averaged,
                       lambda: f"{op}: ref_logps_averaged=True says ref_logps are length-averaged, but this loss is "
                       "taken on summed log-probs (average=False)")
    torch._check_value(max_chunk_tokens >= 0,
                       lambda: f"{op}: max_chunk_tokens must be a positive number of tokens (0: automatic, "
                       f"max(H, 512)); got {max_chunk_tokens}")


def _fake_outputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, output_mask) -> tuple[Tensor, ...]:
    need_hidden, need_weight, need_bias = output_mask
    acc = accumulate_dtype(hidden)
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(hidden.shape[:1], dtype=acc),
        hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty((0,)),
        weight.new_empty(weight.shape) if need_weight else weight.new_empty((0,)),
        weight.new_empty(weight.shape[:1]) if need_bias and bias is not None else weight.new_empty((0,)),
    )


@torch.library.register_fake("epa_ext::linear_dpo_loss")
def _linear_dpo_loss_fake(hidden, weight, bias, labels, ref_logps, beta, loss_type, label_smoothing, sft_weight,
                          average, ref_logps_averaged, reduction, ignore_index, max_chunk_tokens, output_mask,
                          fp32_weight_grad, softcap=None):
    _check_loss_inputs("linear_dpo_loss", hidden, weight, bias, labels, ref_logps, 2, reduction, sft_weight, average,
                       ref_logps_averaged, max_chunk_tokens, softcap)
    beta_in_range("linear_dpo_loss", beta, hidden.dtype)
    return _fake_outputs(hidden, weight, bias, output_mask)


@torch.library.register_fake("epa_ext::linear_epa_loss")
def _linear_epa_loss_fake(hidden, weight, bias, labels, ref_logps, mask, num_candidates, beta, num_strong,
                          weak_weight, sft_weight, average, ref_logps_averaged, reduction, ignore_index,
                          max_chunk_tokens, output_mask, fp32_weight_grad, log_weights=None, softcap=None):
    op = "linear_epa_loss"
    _check_loss_inputs(op, hidden, weight, bias, labels, ref_logps, num_candidates, reduction, sft_weight, average,
                       ref_logps_averaged, max_chunk_tokens, softcap)
    beta_in_range(op, beta, hidden.dtype)
    prompts = hidden.shape[0] // num_candidates
    for name, t, kind in (("mask", mask, "a bool"), ("log_weights", log_weights, "a floating-point")):
        if t is None:
            continue
        torch._check_type(t.is_floating_point() if name == "log_weights" else t.dtype == torch.bool,
                          lambda: f"{op}: {name} must be {kind} tensor; got {t.dtype}")
        torch._check_value(t.shape == (prompts, num_candidates),
                           lambda: f"{op}: {name} must have shape [B, C] = [{prompts}, {num_candidates}]; "
                           f"got {list(t.shape)}")
        torch._check_value(t.device == hidden.device,
                           lambda: f"{op}: {name} must be on the device of hidden ({hidden.device}); got {t.device}")
    torch._check_value(1 <= num_strong <= num_candidates - 1,
                       lambda: f"{op}: num_strong must lie in [1, C - 1] = [1, {num_candidates - 1}]; got {num_strong}")
    return _fake_outputs(hidden, weight, bias, output_mask)


# Where each op's schema (csrc/registration.cpp) has its output_mask argument.
_OUTPUT_MASK_INDEX = {"epa_ext::linear_dpo_loss": 14, "epa_ext::linear_epa_loss": 16}


def _setup_context(ctx, inputs, output, *, output_mask_index: int) -> None:
    _, policy, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.mark_non_differentiable(policy, grad_hidden, grad_weight, grad_bias)
    # Only the loss has a gradient; autograd would otherwise hand backward zero-filled gradients
    # for the other outputs, the size of the hidden states and of the lm_head (one more copy of
    # the weight gradient at the peak, and the time to fill it).
    ctx.set_materialize_grads(False)
    ctx.num_inputs = len(inputs)
    ctx.output_mask = inputs[output_mask_index]
    ctx.consumed = False


def _traced(t: Tensor) -> bool:
    """Under torch.compile / AOTAutograd (fake or functional tensors), not in eager mode."""
    return type(t) is not Tensor or torch.compiler.is_compiling()


def _is_one(grad: Tensor) -> bool:
    """Whether the upstream gradient is 1, where that costs no device synchronization (a CPU
    scalar, outside tracing); on CUDA the gradients are always scaled."""
    return not _traced(grad) and grad.device.type == "cpu" and grad.item() == 1.0


def _scaled(buffer: Tensor, grad: Tensor) -> Tensor:
    """buffer * grad, in place where nothing else can hold the buffer: outside tracing (under
    torch.compile the buffer may also be a graph output, and the compiler manages its memory)."""
    return buffer * grad if _traced(buffer) else buffer.mul_(grad)


def _backward(ctx, grad_loss: Tensor | None, *_unused):
    if ctx.consumed:
        raise RuntimeError(
            "fused_linear_*_loss: the gradients this loss formed in its forward were handed out by the first "
            "backward; a second backward through the same graph (retain_graph=True) is not supported on this "
            "path. Compute the loss again, or call it with differentiable_logps=True (the recomputing path)."
        )
    refuse_second_order("fused_linear_*_loss")
    ctx.consumed = True
    if grad_loss is None:  # not materialized: no gradient reached the loss
        return (None,) * ctx.num_inputs
    unit = _is_one(grad_loss)
    grads = []
    for name, buffer, needed, formed in zip(("hidden", "weight", "bias"), ctx.saved_tensors, ctx.needs_input_grad,
                                            ctx.output_mask):
        if not needed:
            grads.append(None)
            continue
        if not formed:
            raise RuntimeError(f"linear_*_loss: a gradient for {name} is needed, but output_mask did not ask the "
                               "forward to form it")
        grads.append(buffer if unit else _scaled(buffer, grad_loss))
    return (*grads, *([None] * (ctx.num_inputs - 3)))


for _op, _index in _OUTPUT_MASK_INDEX.items():
    torch.library.register_autograd(_op, _backward,
                                    setup_context=functools.partial(_setup_context, output_mask_index=_index))


def output_mask(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> list[bool]:
    """Which of hidden, weight, bias the op forms gradients for: those that require grad, under grad mode."""
    enabled = torch.is_grad_enabled()
    return [enabled and hidden.requires_grad, enabled and weight.requires_grad,
            enabled and bias is not None and bias.requires_grad]
