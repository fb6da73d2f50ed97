"""Preference losses straight from logits, or from hidden states and the lm_head, in one
autograd graph.

Sequences are stacked candidate-major, as TRL stacks [chosen; rejected]: row c*B + b is candidate
c of prompt b. The sequence log-probs come from the fused kernels, the loss from the loss kernel;
backward runs the loss's backward on [B, C] numbers and then, for logits, writes d(logits) in a
single pass over them, each row scaled by its sequence's loss gradient (with
inplace_backward=True into the logits' own storage, so the step allocates no second
logits-sized buffer); for hidden states, goes through the chunked linear backward.

From hidden states, two paths (docs/losses.md, "Fused-linear path"):
- three matmuls (the default): with reduction "mean" or "sum", a constant reference and
  ``differentiable_logps=False``, the op epa_ext::linear_{dpo,epa}_loss forms the gradient in the
  forward, whole prompt groups at a time, and the returned policy log-probs are detached;
- recomputing (linear_token_logps, 4 matmuls): for reduction="none", for ref_logps that require
  grad, and for ``differentiable_logps=True`` (policy log-probs that the caller differentiates
  further, e.g. in a term of their own).

Reference log-probs: ``ref_logps`` are SUMMED sequence log-probs, what ``sequence_logps`` and
``linear_sequence_logps`` return by default. When the loss is taken on length-averaged log-probs
(``average=True``, or loss_type="ipo" by default), these functions divide the policy's and the
reference's sums by the same per-sequence completion-token counts (both score the same labels),
as TRL does (TRL 1.16's precomputed reference columns are sums too, for IPO as well).
``ref_logps_averaged=True`` says that ref_logps are already averaged. See docs/losses.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import check_autograd_support
from ._validation import check_bool, check_int, check_optional_tensor, check_same_device, check_softcap, check_tensor
from .linear import linear_token_logps
from .linear_losses import output_mask
from .logps import IGNORE_INDEX, token_logps
from .losses import check_loss_options, check_num_strong, check_sft_weight, dpo_loss, epa_loss


def _check_stacking(name: str, stacked: Tensor, ref_logps: Tensor, num_candidates: int) -> int:
    """stacked: the [C*B, T, X] logits or hidden states. Returns B, the number of prompts."""
    check_tensor(name, stacked)
    check_tensor("ref_logps", ref_logps)
    if stacked.dim() != 3:
        last = "V" if name == "logits" else "H"
        raise ValueError(f"{name} must have shape [C*B, T, {last}]; got {list(stacked.shape)}")
    num_candidates = check_int("num_candidates", num_candidates)
    rows = stacked.shape[0]
    if num_candidates < 2 or rows % num_candidates:
        raise ValueError(
            f"{name} must stack num_candidates = {num_candidates} candidates of each prompt "
            f"(C*B rows, candidate-major); got {rows} rows, which {num_candidates} does not divide"
        )
    if ref_logps.shape != (rows,):
        raise ValueError(f"ref_logps must have shape [C*B] = [{rows}]; got {list(ref_logps.shape)}")
    check_same_device("ref_logps", ref_logps, name, stacked)
    return rows // num_candidates


def _check_options(name: str, stacked: Tensor, labels: Tensor, mask: Tensor | None, ignore_index: int, average: bool,
                   ref_logps_averaged: bool, sft_weight: float, softcap: float | None,
                   log_weights: Tensor | None = None) -> float | None:
    """The options every fused function takes; stacked: the logits or hidden states (name).
    Returns softcap as the ops take it."""
    check_tensor("labels", labels)
    for option, value in (("mask", mask), ("log_weights", log_weights)):
        if check_optional_tensor(option, value) is not None:
            check_same_device(option, value, name, stacked)
    check_int("ignore_index", ignore_index)
    check_bool("average", average)
    check_bool("ref_logps_averaged", ref_logps_averaged)
    if ref_logps_averaged and not average:
        raise ValueError("ref_logps_averaged=True says ref_logps are length-averaged, but this loss is taken on "
                         "summed log-probs (average=False): pass summed ref_logps, or average=True")
    check_sft_weight(sft_weight)
    return check_softcap(softcap)


def _check_linear_options(function: str, hidden: Tensor, weight: Tensor, bias: Tensor | None, ref_logps: Tensor,
                          max_chunk_tokens: int | None, fp32_weight_grad: bool, differentiable_logps: bool) -> int:
    """The fused-linear functions' own options; returns max_chunk_tokens as the op takes it (0: automatic)."""
    check_tensor("weight", weight)
    check_optional_tensor("bias", bias)
    check_bool("fp32_weight_grad", fp32_weight_grad)
    check_bool("differentiable_logps", differentiable_logps)
    check_autograd_support(function, hidden, weight, bias, ref_logps)
    if max_chunk_tokens is None:
        return 0
    budget = check_int("max_chunk_tokens", max_chunk_tokens)
    if budget <= 0:
        raise ValueError(f"max_chunk_tokens must be a positive number of tokens or None (automatic: max(H, 512)); "
                         f"got {budget}")
    return budget


def _forms_gradient_in_forward(reduction: str, differentiable_logps: bool, *constants: Tensor | None) -> bool:
    """The three-matmul path applies: a reduced loss, constant reference log-probs (and
    log-weights), and policy log-probs that nobody differentiates further."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in constants)
    return reduction != "none" and not differentiable_logps and not needs_grad


def _long(labels: Tensor) -> Tensor:
    return labels.long() if labels.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8) else labels


def _sequences(token: Tensor, labels: Tensor, ref_logps: Tensor, ignore_index: int, average: bool,
               ref_logps_averaged: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(policy sequence log-probs, reference log-probs in the same form, completion-token counts):
    sums over each row's tokens, or both divided by the row's token count when ``average``."""
    counts = (labels != ignore_index).sum(-1)
    seq = token.sum(-1)
    if not average:
        return seq, ref_logps, counts
    divisor = counts.clamp_min(1).to(seq.dtype)
    return seq / divisor, ref_logps if ref_logps_averaged else ref_logps / divisor, counts


def _dpo_on_sequences(seq: Tensor, ref: Tensor, counts: Tensor, batch: int, average: bool, **options) -> Tensor:
    return dpo_loss(seq[:batch], seq[batch:], ref[:batch], ref[batch:], chosen_token_counts=counts[:batch],
                    average=average, **options)


def _epa_on_sequences(seq: Tensor, ref: Tensor, counts: Tensor, num_candidates: int, batch: int, average: bool,
                      **options) -> Tensor:
    return epa_loss(seq.view(num_candidates, batch).T, ref.view(num_candidates, batch).T,
                    chosen_token_counts=counts[:batch], average=average, **options)


def fused_dpo_loss(
    logits: Tensor,
    labels: Tensor,
    ref_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    average: bool | None = None,
    sft_weight: float = 0.0,
    ref_logps_averaged: bool = False,
    inplace_backward: bool = False,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """DPO loss from the logits of [chosen; rejected].

    Args:
        logits: [2B, T, V], rows 0..B-1 the chosen answers, B..2B-1 the rejected ones.
        labels: [2B, T] aligned labels (``completion_labels``).
        ref_logps: [2B] reference sequence log-probs, stacked the same way, SUMMED over each
            sequence's completion tokens (what ``sequence_logps`` returns); when the loss
            averages, they are divided by the same token counts as the policy's.
        average: take the loss on length-averaged log-probs, policy and reference alike (None:
            only for loss_type="ipo", as TRL does).
        sft_weight: lambda >= 0: adds lambda * the chosen answers' NLL averaged over all their
            completion tokens in the batch (TRL's rpo_alpha; see ``dpo_loss``).
        ref_logps_averaged: ref_logps are already length-averaged (only with averaging).
        inplace_backward: d(logits) overwrites logits during backward (see ``token_logps``).
        softcap: None, or c > 0: the log-probs of ``c * tanh(logits / c)`` (Gemma-2/3's
            final_logit_softcapping; see ``token_logps``).
        Other options as in ``dpo_loss``.

    Returns:
        (loss, policy_seq_logps [2B] fp32, in the form the loss used: summed, or averaged).
    """
    batch = _check_stacking("logits", logits, ref_logps, 2)
    check_loss_options(beta=beta, reduction=reduction, loss_type=loss_type, label_smoothing=label_smoothing)
    average = (loss_type == "ipo") if average is None else average
    softcap = _check_options("logits", logits, labels, None, ignore_index, average, ref_logps_averaged, sft_weight,
                             softcap)
    token = token_logps(logits, labels, ignore_index=ignore_index, inplace_backward=inplace_backward, softcap=softcap)
    seq, ref, counts = _sequences(token, labels, ref_logps, ignore_index, average, ref_logps_averaged)
    loss = _dpo_on_sequences(seq, ref, counts, batch, average, beta=beta, loss_type=loss_type,
                             label_smoothing=label_smoothing, reduction=reduction, sft_weight=sft_weight)
    return loss, seq


def fused_epa_loss(
    logits: Tensor,
    labels: Tensor,
    ref_logps: Tensor,
    *,
    num_candidates: int,
    beta: float = 0.1,
    num_strong: int | None = None,
    weak_weight: float = 1.0,
    mask: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    average: bool = False,
    sft_weight: float = 0.0,
    ref_logps_averaged: bool = False,
    inplace_backward: bool = False,
    log_weights: Tensor | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """EPA loss from the logits of C candidates per prompt.

    Args:
        logits: [C*B, T, V] candidate-major: rows c*B..c*B+B-1 hold candidate c of every prompt;
            candidate 0 is the chosen answer, 1..num_strong strong negatives, the rest weak.
        labels: [C*B, T] aligned labels. ref_logps: [C*B] SUMMED reference sequence log-probs
            (divided by the policy's token counts when ``average``; see ``fused_dpo_loss``).
        num_candidates: C. mask: [B, C] bool, False for absent candidates.
        average: take the loss on length-averaged log-probs, policy and reference alike.
        sft_weight, ref_logps_averaged: as in ``fused_dpo_loss`` (the chosen answers are column 0).
        inplace_backward: d(logits) overwrites logits during backward (see ``token_logps``).
        log_weights: [B, C] per-candidate log-weights added to the scores (see ``epa_loss``).
        softcap: as in ``fused_dpo_loss``.
        Other options as in ``epa_loss``.

    Returns:
        (loss, policy_seq_logps [C*B] fp32, summed or averaged as the loss used them).
    """
    batch = _check_stacking("logits", logits, ref_logps, num_candidates)
    check_loss_options(beta=beta, reduction=reduction, weak_weight=weak_weight)
    num_strong = check_num_strong(num_strong, num_candidates)
    softcap = _check_options("logits", logits, labels, mask, ignore_index, average, ref_logps_averaged, sft_weight,
                             softcap, log_weights)
    token = token_logps(logits, labels, ignore_index=ignore_index, inplace_backward=inplace_backward, softcap=softcap)
    seq, ref, counts = _sequences(token, labels, ref_logps, ignore_index, average, ref_logps_averaged)
    loss = _epa_on_sequences(seq, ref, counts, num_candidates, batch, average, beta=beta, num_strong=num_strong,
                             weak_weight=weak_weight, mask=mask, reduction=reduction, sft_weight=sft_weight,
                             log_weights=log_weights)
    return loss, seq


def fused_linear_dpo_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_logps: Tensor,
    *,
    bias: Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    average: bool | None = None,
    sft_weight: float = 0.0,
    ref_logps_averaged: bool = False,
    max_chunk_tokens: int | None = None,
    fp32_weight_grad: bool = True,
    differentiable_logps: bool = False,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """DPO loss from the final hidden states of [chosen; rejected] and the lm_head.

    Args:
        hidden: [2B, T, H], rows 0..B-1 the chosen answers, B..2B-1 the rejected ones.
        weight: [V, H] lm_head weight (may be tied to the embedding); bias: optional [V].
        labels, ref_logps (summed), average, sft_weight, ref_logps_averaged and the loss options:
            as in ``fused_dpo_loss``.
        max_chunk_tokens: the token budget of a chunk (None: max(H, 512), so that a chunk's
            [n, V] logits take about the memory of the [V, H] lm_head). Whole prompt groups are
            packed into a chunk; a group over the budget goes in pieces, the logits of all but
            the last recomputed for the gradient.
        fp32_weight_grad: accumulate the weight and bias gradients in fp32 for bf16/fp16 weights.
        differentiable_logps: return policy_seq_logps that carry gradients (the recomputing
            path, 4 matmuls instead of 3).
        softcap: None, or c > 0: the log-probs of ``c * tanh(logits / c)``, capped inside the
            row kernels (Gemma-2/3's final_logit_softcapping).

    Returns:
        (loss, policy_seq_logps [2B] fp32, summed or averaged as the loss used them); no
        [2B*T, V] logits are ever formed. On the three-matmul path (reduction "mean"/"sum", a
        reference that needs no gradient, differentiable_logps=False) policy_seq_logps are
        detached, the gradient exists after the forward and backward only scales it; a second
        backward through the same graph raises.
    """
    batch = _check_stacking("hidden", hidden, ref_logps, 2)
    check_loss_options(beta=beta, reduction=reduction, loss_type=loss_type, label_smoothing=label_smoothing)
    average = (loss_type == "ipo") if average is None else average
    softcap = _check_options("hidden", hidden, labels, None, ignore_index, average, ref_logps_averaged, sft_weight,
                             softcap)
    budget = _check_linear_options("fused_linear_dpo_loss", hidden, weight, bias, ref_logps, max_chunk_tokens,
                                   fp32_weight_grad, differentiable_logps)
    if _forms_gradient_in_forward(reduction, differentiable_logps, ref_logps):
        loss, seq, *_ = torch.ops.epa_ext.linear_dpo_loss(
            hidden, weight, bias, _long(labels), ref_logps, float(beta), loss_type, float(label_smoothing),
            float(sft_weight), bool(average), bool(ref_logps_averaged), reduction, ignore_index, budget,
            output_mask(hidden, weight, bias), fp32_weight_grad, softcap)
        return loss, seq
    token = linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                               max_chunk_tokens=max_chunk_tokens, fp32_weight_grad=fp32_weight_grad,
                               softcap=softcap)
    seq, ref, counts = _sequences(token, labels, ref_logps, ignore_index, average, ref_logps_averaged)
    loss = _dpo_on_sequences(seq, ref, counts, batch, average, beta=beta, loss_type=loss_type,
                             label_smoothing=label_smoothing, reduction=reduction, sft_weight=sft_weight)
    return loss, seq


def fused_linear_epa_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    ref_logps: Tensor,
    *,
    num_candidates: int,
    bias: Tensor | None = None,
    beta: float = 0.1,
    num_strong: int | None = None,
    weak_weight: float = 1.0,
    mask: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    average: bool = False,
    sft_weight: float = 0.0,
    ref_logps_averaged: bool = False,
    max_chunk_tokens: int | None = None,
    fp32_weight_grad: bool = True,
    differentiable_logps: bool = False,
    log_weights: Tensor | None = None,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """EPA loss from the final hidden states of C candidates per prompt and the lm_head.

    Args:
        hidden: [C*B, T, H] candidate-major (as the logits of ``fused_epa_loss``).
        weight: [V, H] lm_head weight; bias: optional [V].
        labels, ref_logps (summed), num_candidates, mask, average, sft_weight, ref_logps_averaged
            and the loss options: as in ``fused_epa_loss``. max_chunk_tokens, fp32_weight_grad,
            differentiable_logps, softcap: as in ``fused_linear_dpo_loss``.
        log_weights: [B, C] per-candidate log-weights added to the scores (see ``epa_loss``);
            when they require grad, the loss takes the recomputing path, which gives them theirs.

    Returns:
        (loss, policy_seq_logps [C*B] fp32); no [C*B*T, V] logits are ever formed. On the
        three-matmul path policy_seq_logps are detached (see ``fused_linear_dpo_loss``).
    """
    batch = _check_stacking("hidden", hidden, ref_logps, num_candidates)
    check_loss_options(beta=beta, reduction=reduction, weak_weight=weak_weight)
    num_strong = check_num_strong(num_strong, num_candidates)
    softcap = _check_options("hidden", hidden, labels, mask, ignore_index, average, ref_logps_averaged, sft_weight,
                             softcap, log_weights)
    budget = _check_linear_options("fused_linear_epa_loss", hidden, weight, bias, ref_logps, max_chunk_tokens,
                                   fp32_weight_grad, differentiable_logps)
    if _forms_gradient_in_forward(reduction, differentiable_logps, ref_logps, log_weights):
        loss, seq, *_ = torch.ops.epa_ext.linear_epa_loss(
            hidden, weight, bias, _long(labels), ref_logps, mask, num_candidates, float(beta), num_strong,
            float(weak_weight), float(sft_weight), bool(average), bool(ref_logps_averaged), reduction, ignore_index,
            budget, output_mask(hidden, weight, bias), fp32_weight_grad, log_weights, softcap)
        return loss, seq
    token = linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                               max_chunk_tokens=max_chunk_tokens, fp32_weight_grad=fp32_weight_grad,
                               softcap=softcap)
    seq, ref, counts = _sequences(token, labels, ref_logps, ignore_index, average, ref_logps_averaged)
    loss = _epa_on_sequences(seq, ref, counts, num_candidates, batch, average, beta=beta, num_strong=num_strong,
                             weak_weight=weak_weight, mask=mask, reduction=reduction, sft_weight=sft_weight,
                             log_weights=log_weights)
    return loss, seq
