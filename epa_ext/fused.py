"""Preference losses straight from logits, in one autograd graph.

logits are [C*B, T, V] candidate-major, as TRL stacks [chosen; rejected]: row c*B + b is
candidate c of prompt b. The sequence log-probs come from the fused kernel, the loss from the
loss kernel; backward runs the loss's backward on [B, C] numbers and then writes d(logits) in a
single pass over the logits, each row scaled by its sequence's loss gradient. With
inplace_backward=True that pass writes into the logits' own storage, so the step allocates no
second logits-sized buffer.
"""

from __future__ import annotations

from torch import Tensor

from .logps import sequence_logps
from .losses import dpo_loss, epa_loss


def _check_stacking(logits: Tensor, ref_logps: Tensor, num_candidates: int) -> int:
    """Returns B, the number of prompts."""
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [C*B, T, V]; got {list(logits.shape)}")
    rows = logits.shape[0]
    if num_candidates < 2 or rows % num_candidates:
        raise ValueError(
            f"logits must stack num_candidates = {num_candidates} candidates of each prompt "
            f"(C*B rows, candidate-major); got {rows} rows, which {num_candidates} does not divide"
        )
    if ref_logps.shape != (rows,):
        raise ValueError(f"ref_logps must have shape [C*B] = [{rows}]; got {list(ref_logps.shape)}")
    if ref_logps.device != logits.device:
        raise ValueError(f"ref_logps must be on the device of logits ({logits.device}); got {ref_logps.device}")
    return rows // num_candidates


def fused_dpo_loss(
    logits: Tensor,
    labels: Tensor,
    ref_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
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
    batch = _check_stacking(logits, ref_logps, 2)
    average = (loss_type == "ipo") if average is None else average
    seq = sequence_logps(logits, labels, ignore_index=ignore_index, average=average, inplace_backward=inplace_backward)
    loss = dpo_loss(seq[:batch], seq[batch:], ref_logps[:batch], ref_logps[batch:], beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing, reduction=reduction)
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
    ignore_index: int = -100,
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
    batch = _check_stacking(logits, ref_logps, num_candidates)
    seq = sequence_logps(logits, labels, ignore_index=ignore_index, average=average, inplace_backward=inplace_backward)
    loss = epa_loss(seq.view(num_candidates, batch).T, ref_logps.view(num_candidates, batch).T, beta=beta,
                    num_strong=num_strong, weak_weight=weak_weight, mask=mask, reduction=reduction)
    return loss, seq
