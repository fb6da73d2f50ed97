"""Preference losses straight from logits, or from hidden states and the lm_head, in one
autograd graph.

Sequences are stacked candidate-major, as TRL stacks [chosen; rejected]: row c*B + b is candidate
c of prompt b. The sequence log-probs come from the fused kernels, the loss from the loss kernel;
backward runs the loss's backward on [B, C] numbers and then, for logits, writes d(logits) in a
single pass over them, each row scaled by its sequence's loss gradient (with
inplace_backward=True into the logits' own storage, so the step allocates no second
logits-sized buffer); for hidden states, goes through the chunked linear backward.
"""

from __future__ import annotations

from torch import Tensor

from .linear import linear_sequence_logps
from .logps import IGNORE_INDEX, sequence_logps
from .losses import dpo_loss, epa_loss


def _check_stacking(name: str, stacked: Tensor, ref_logps: Tensor, num_candidates: int) -> int:
    """stacked: the [C*B, T, X] logits or hidden states. Returns B, the number of prompts."""
    if stacked.dim() != 3:
        last = "V" if name == "logits" else "H"
        raise ValueError(f"{name} must have shape [C*B, T, {last}]; got {list(stacked.shape)}")
    rows = stacked.shape[0]
    if num_candidates < 2 or rows % num_candidates:
        raise ValueError(
            f"{name} must stack num_candidates = {num_candidates} candidates of each prompt "
            f"(C*B rows, candidate-major); got {rows} rows, which {num_candidates} does not divide"
        )
    if ref_logps.shape != (rows,):
        raise ValueError(f"ref_logps must have shape [C*B] = [{rows}]; got {list(ref_logps.shape)}")
    if ref_logps.device != stacked.device:
        raise ValueError(f"ref_logps must be on the device of {name} ({stacked.device}); got {ref_logps.device}")
    return rows // num_candidates


def _dpo_on_sequences(seq: Tensor, ref_logps: Tensor, batch: int, **options) -> Tensor:
    return dpo_loss(seq[:batch], seq[batch:], ref_logps[:batch], ref_logps[batch:], **options)


def _epa_on_sequences(seq: Tensor, ref_logps: Tensor, num_candidates: int, batch: int, **options) -> Tensor:
    return epa_loss(seq.view(num_candidates, batch).T, ref_logps.view(num_candidates, batch).T, **options)


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
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """DPO loss from the logits of [chosen; rejected].

    Args:
        logits: [2B, T, V], rows 0..B-1 the chosen answers, B..2B-1 the rejected ones.
        labels: [2B, T] aligned labels (``completion_labels``).
        ref_logps: [2B] reference sequence log-probs, stacked the same way.
        average: length-normalize the sequence log-probs (None: only for loss_type="ipo").
        inplace_backward: d(logits) overwrites logits during backward (see ``token_logps``).
        Other options as in ``dpo_loss``.

    Returns:
        (loss, policy_seq_logps [2B] fp32).
    """
    batch = _check_stacking("logits", logits, ref_logps, 2)
    average = (loss_type == "ipo") if average is None else average
    seq = sequence_logps(logits, labels, ignore_index=ignore_index, average=average, inplace_backward=inplace_backward)
    loss = _dpo_on_sequences(seq, ref_logps, batch, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                             reduction=reduction)
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
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor]:
    """EPA loss from the logits of C candidates per prompt.

    Args:
        logits: [C*B, T, V] candidate-major: rows c*B..c*B+B-1 hold candidate c of every prompt;
            candidate 0 is the chosen answer, 1..num_strong strong negatives, the rest weak.
        labels: [C*B, T] aligned labels. ref_logps: [C*B] reference sequence log-probs.
        num_candidates: C. mask: [B, C] bool, False for absent candidates.
        average: length-normalize the sequence log-probs.
        inplace_backward: d(logits) overwrites logits during backward (see ``token_logps``).
        Other options as in ``epa_loss``.

    Returns:
        (loss, policy_seq_logps [C*B] fp32).
    """
    batch = _check_stacking("logits", logits, ref_logps, num_candidates)
    seq = sequence_logps(logits, labels, ignore_index=ignore_index, average=average, inplace_backward=inplace_backward)
    loss = _epa_on_sequences(seq, ref_logps, num_candidates, batch, beta=beta, num_strong=num_strong,
                             weak_weight=weak_weight, mask=mask, reduction=reduction)
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
    chunk_size: int | None = None,
    fp32_weight_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """DPO loss from the final hidden states of [chosen; rejected] and the lm_head.

    Args:
        hidden: [2B, T, H], rows 0..B-1 the chosen answers, B..2B-1 the rejected ones.
        weight: [V, H] lm_head weight; bias: optional [V].
        labels, ref_logps, average and the loss options: as in ``fused_dpo_loss``.
        chunk_size, fp32_weight_grad: as in ``linear_sequence_logps``.

    Returns:
        (loss, policy_seq_logps [2B] fp32); no [2B*T, V] logits are ever formed.
    """
    batch = _check_stacking("hidden", hidden, ref_logps, 2)
    average = (loss_type == "ipo") if average is None else average
    seq = linear_sequence_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index, average=average,
                                chunk_size=chunk_size, fp32_weight_grad=fp32_weight_grad)
    loss = _dpo_on_sequences(seq, ref_logps, batch, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                             reduction=reduction)
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
    chunk_size: int | None = None,
    fp32_weight_grad: bool = True,
) -> tuple[Tensor, Tensor]:
    """EPA loss from the final hidden states of C candidates per prompt and the lm_head.

    Args:
        hidden: [C*B, T, H] candidate-major (as the logits of ``fused_epa_loss``).
        weight: [V, H] lm_head weight; bias: optional [V].
        labels, ref_logps, num_candidates, mask, average and the loss options: as in
        ``fused_epa_loss``. chunk_size, fp32_weight_grad: as in ``linear_sequence_logps``.

    Returns:
        (loss, policy_seq_logps [C*B] fp32); no [C*B*T, V] logits are ever formed.
    """
    batch = _check_stacking("hidden", hidden, ref_logps, num_candidates)
    seq = linear_sequence_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index, average=average,
                                chunk_size=chunk_size, fp32_weight_grad=fp32_weight_grad)
    loss = _epa_on_sequences(seq, ref_logps, num_candidates, batch, beta=beta, num_strong=num_strong,
                             weak_weight=weak_weight, mask=mask, reduction=reduction)
    return loss, seq
