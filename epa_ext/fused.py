"""Preference losses straight from logits, or from hidden states and the lm_head, in one
autograd graph.

Sequences are stacked candidate-major, as TRL stacks [chosen; rejected]: row c*B + b is candidate
c of prompt b. The sequence log-probs come from the fused kernels, the loss from the loss kernel;
backward runs the loss's backward on [B, C] numbers and then, for logits, writes d(logits) in a
single pass over them, each row scaled by its sequence's loss gradient (with
inplace_backward=True into the logits' own storage, so the step allocates no second
logits-sized buffer); for hidden states, goes through the chunked linear backward.

Reference log-probs: ``ref_logps`` are SUMMED sequence log-probs, what ``sequence_logps`` and
``linear_sequence_logps`` return by default. When the loss is taken on length-averaged log-probs
(``average=True``, or loss_type="ipo" by default), these functions divide the policy's and the
reference's sums by the same per-sequence completion-token counts (both score the same labels),
as TRL does. ``ref_logps_averaged=True`` says that ref_logps are already averaged (TRL's
precomputed IPO columns are). See docs/losses.md.
"""

from __future__ import annotations

from torch import Tensor

from .linear import linear_token_logps
from .logps import IGNORE_INDEX, token_logps
from .losses import check_sft_weight, dpo_loss, epa_loss


def _check_stacking(name: str, stacked: Tensor, ref_logps: Tensor, num_candidates: int) -> int:
    """stacked: the [C*B, T, X] logits or hidden states. Returns B, the number of prompts."""
    if not isinstance(stacked, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(stacked).__name__}")
    if not isinstance(ref_logps, Tensor):
        raise TypeError(f"ref_logps must be a torch.Tensor; got {type(ref_logps).__name__}")
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


def _check_options(labels: Tensor, mask: Tensor | None, average: bool, ref_logps_averaged: bool,
                   sft_weight: float) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor; got {type(labels).__name__}")
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None; got {type(mask).__name__}")
    if ref_logps_averaged and not average:
        raise ValueError("ref_logps_averaged=True says ref_logps are length-averaged, but this loss is taken on "
                         "summed log-probs (average=False): pass summed ref_logps, or average=True")
    check_sft_weight(sft_weight)


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
                    averaged=average, **options)


def _epa_on_sequences(seq: Tensor, ref: Tensor, counts: Tensor, num_candidates: int, batch: int, average: bool,
                      **options) -> Tensor:
    return epa_loss(seq.view(num_candidates, batch).T, ref.view(num_candidates, batch).T,
                    chosen_token_counts=counts[:batch], averaged=average, **options)


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
        Other options as in ``dpo_loss``.

    Returns:
        (loss, policy_seq_logps [2B] fp32, in the form the loss used: summed, or averaged).
    """
    batch = _check_stacking("logits", logits, ref_logps, 2)
    average = (loss_type == "ipo") if average is None else average
    _check_options(labels, None, average, ref_logps_averaged, sft_weight)
    token = token_logps(logits, labels, ignore_index=ignore_index, inplace_backward=inplace_backward)
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
        Other options as in ``epa_loss``.

    Returns:
        (loss, policy_seq_logps [C*B] fp32, summed or averaged as the loss used them).
    """
    batch = _check_stacking("logits", logits, ref_logps, num_candidates)
    _check_options(labels, mask, average, ref_logps_averaged, sft_weight)
    token = token_logps(logits, labels, ignore_index=ignore_index, inplace_backward=inplace_backward)
    seq, ref, counts = _sequences(token, labels, ref_logps, ignore_index, average, ref_logps_averaged)
    loss = _epa_on_sequences(seq, ref, counts, num_candidates, batch, average, beta=beta, num_strong=num_strong,
                             weak_weight=weak_weight, mask=mask, reduction=reduction, sft_weight=sft_weight)
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
) -> tuple[Tensor, Tensor]:
    """DPO loss from the final hidden states of [chosen; rejected] and the lm_head.

    Args:
        hidden: [2B, T, H], rows 0..B-1 the chosen answers, B..2B-1 the rejected ones.
        weight: [V, H] lm_head weight; bias: optional [V].
        labels, ref_logps (summed), average, sft_weight, ref_logps_averaged and the loss options:
            as in ``fused_dpo_loss``.
        max_chunk_tokens: tokens per chunk (None: max(H, 512)); fp32_weight_grad: as in
            ``linear_sequence_logps``.

    Returns:
        (loss, policy_seq_logps [2B] fp32); no [2B*T, V] logits are ever formed.
    """
    batch = _check_stacking("hidden", hidden, ref_logps, 2)
    average = (loss_type == "ipo") if average is None else average
    _check_options(labels, None, average, ref_logps_averaged, sft_weight)
    token = linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                               chunk_size=max_chunk_tokens, fp32_weight_grad=fp32_weight_grad)
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
) -> tuple[Tensor, Tensor]:
    """EPA loss from the final hidden states of C candidates per prompt and the lm_head.

    Args:
        hidden: [C*B, T, H] candidate-major (as the logits of ``fused_epa_loss``).
        weight: [V, H] lm_head weight; bias: optional [V].
        labels, ref_logps (summed), num_candidates, mask, average, sft_weight, ref_logps_averaged
            and the loss options: as in ``fused_epa_loss``. max_chunk_tokens, fp32_weight_grad:
            as in ``fused_linear_dpo_loss``.

    Returns:
        (loss, policy_seq_logps [C*B] fp32); no [C*B*T, V] logits are ever formed.
    """
    batch = _check_stacking("hidden", hidden, ref_logps, num_candidates)
    _check_options(labels, mask, average, ref_logps_averaged, sft_weight)
    token = linear_token_logps(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                               chunk_size=max_chunk_tokens, fp32_weight_grad=fp32_weight_grad)
    seq, ref, counts = _sequences(token, labels, ref_logps, ignore_index, average, ref_logps_averaged)
    loss = _epa_on_sequences(seq, ref, counts, num_candidates, batch, average, beta=beta, num_strong=num_strong,
                             weak_weight=weak_weight, mask=mask, reduction=reduction, sft_weight=sft_weight)
    return loss, seq
