"""Plain-torch definitions of every epa_ext op: the ground truth of the tests, the eager
baseline of the benchmarks, and the ops' differentiable fallback.

Each function computes in the dtype it is given (pass float64 tensors for ground truth; pass
bf16 for "what plain torch does in bf16") and returns float32 (float64 for float64 input), the
output dtype of the fused op it defines.

Differentiable fallback: where a gradient must itself be differentiated (a backward under
``create_graph=True``: double backward, Hessian-vector products), the kernels' gradients would be
constants to autograd, so the ops take the gradient of these definitions instead:
``dpo_loss`` and ``epa_loss``'s backward (epa_ext/losses.py) and the double backward of
``token_logps`` with a softcap (epa_ext/logps.py). The fused-linear ops refuse second order and
point here. Hence this module imports only the leaf epa_ext._kernel_contract (and torch): the op
modules import it, never the other way round.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._kernel_contract import IGNORE_INDEX, accumulate_dtype


def softcapped(logits: Tensor, softcap: float | None) -> Tensor:
    """softcap * tanh(logits / softcap) (Gemma-2/3's final_logit_softcapping), or logits for None."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                softcap: float | None = None) -> Tensor:
    """logits [..., V], labels [...] -> [...]: (softcap,) log_softmax, gather, 0 where ignored."""
    logits = softcapped(logits, softcap)
    keep = labels != ignore_index
    safe_labels = labels.masked_fill(~keep, 0)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return logps.to(accumulate_dtype(logits)).masked_fill(~keep, 0.0)


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, average: bool = False,
                   softcap: float | None = None) -> Tensor:
    """logits [B, T, V], labels [B, T] -> [B]: masked sum (average: mean) of token log-probs."""
    total = token_logps(logits, labels, ignore_index, softcap).sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp_min(1).to(total.dtype)
    return total


def linear_sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                          ignore_index: int = IGNORE_INDEX, average: bool = False,
                          softcap: float | None = None) -> Tensor:
    """hidden [B, T, H], weight [V, H] -> [B]: the full logits hidden @ weight.T + bias, then
    sequence_logps (what an eager trainer does)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return sequence_logps(logits, labels, ignore_index, average, softcap)


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    return {"mean": losses.mean, "sum": losses.sum}.get(reduction, lambda: losses)()


def sft_nll(policy_chosen: Tensor, chosen_token_counts: Tensor, average: bool = False) -> Tensor:
    """The SFT term's NLL: -sum_b log pi(chosen_b) / sum_b n_b over the batch's chosen answers (0 without
    tokens); policy_chosen [B] are sums, or length-averaged log-probs when ``average``."""
    counts = chosen_token_counts.to(policy_chosen.dtype)
    sums = policy_chosen * counts if average else policy_chosen
    return -sums.sum() / counts.sum().clamp_min(1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             reduction: str = "mean", sft_weight: float = 0.0, chosen_token_counts: Tensor | None = None,
             average: bool = False) -> Tensor:
    """Inputs [B] -> the DPO-family loss, written from the formulas of epa-spec section 3, plus
    sft_weight * sft_nll on every pair (docs/losses.md)."""
    delta = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    z, eps = beta * delta, label_smoothing
    logsigmoid = torch.nn.functional.logsigmoid
    if loss_type == "sigmoid":
        losses = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * logsigmoid(z) + eps * logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if sft_weight:
        losses = losses + sft_weight * sft_nll(policy_chosen, chosen_token_counts, average)
    return _reduce(losses.to(accumulate_dtype(delta)), reduction)


def epa_loss(policy_logps: Tensor, ref_logps: Tensor, beta: float = 0.1, num_strong: int | None = None,
             weak_weight: float = 1.0, mask: Tensor | None = None, reduction: str = "mean", sft_weight: float = 0.0,
             chosen_token_counts: Tensor | None = None, average: bool = False,
             log_weights: Tensor | None = None) -> Tensor:
    """Inputs [B, C] -> the EPA loss of epa-spec section 4 with per-candidate log-weights w:
    s_j = beta h_j + omega_j + w_j, logsumexp_j s_j - s_0, plus sft_weight * sft_nll of column 0
    on every prompt."""
    candidates = policy_logps.shape[1]
    num_strong = candidates - 1 if num_strong is None else num_strong
    omega = torch.zeros(candidates, dtype=policy_logps.dtype, device=policy_logps.device)
    omega[num_strong + 1:] = torch.log(torch.tensor(weak_weight, dtype=omega.dtype))
    scores = beta * (policy_logps - ref_logps) + omega
    if log_weights is not None:
        scores = scores + log_weights
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    losses = torch.logsumexp(scores, dim=1) - scores[:, 0]
    if sft_weight:
        losses = losses + sft_weight * sft_nll(policy_logps[:, 0], chosen_token_counts, average)
    return _reduce(losses.to(accumulate_dtype(scores)), reduction)


def _policy_and_reference(logits: Tensor, labels: Tensor, ref_logps: Tensor, ignore_index: int, average: bool,
                          ref_logps_averaged: bool, softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """(policy sequence log-probs, reference log-probs in the same form, token counts [rows]):
    summed, or both divided by the sequence's completion-token count when ``average``."""
    sums = sequence_logps(logits, labels, ignore_index, softcap=softcap)
    counts = (labels != ignore_index).sum(-1)
    if not average:
        return sums, ref_logps, counts
    divisor = counts.clamp_min(1).to(sums.dtype)
    return sums / divisor, ref_logps if ref_logps_averaged else ref_logps / divisor, counts


def fused_dpo_loss(logits: Tensor, labels: Tensor, ref_logps: Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX, reduction: str = "mean",
                   average: bool | None = None, sft_weight: float = 0.0,
                   ref_logps_averaged: bool = False, softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """logits [2B, T, V] ([chosen; rejected]), summed ref_logps [2B] (averaged ones with
    ref_logps_averaged) -> (loss, policy sequence log-probs [2B]), eagerly."""
    average = (loss_type == "ipo") if average is None else average
    seq, ref, counts = _policy_and_reference(logits, labels, ref_logps, ignore_index, average, ref_logps_averaged,
                                             softcap)
    batch = seq.shape[0] // 2
    loss = dpo_loss(seq[:batch], seq[batch:], ref[:batch], ref[batch:], beta, loss_type, label_smoothing, reduction,
                    sft_weight, counts[:batch], average)
    return loss, seq


def fused_epa_loss(logits: Tensor, labels: Tensor, ref_logps: Tensor, num_candidates: int, beta: float = 0.1,
                   num_strong: int | None = None, weak_weight: float = 1.0, mask: Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX, reduction: str = "mean", average: bool = False,
                   sft_weight: float = 0.0, ref_logps_averaged: bool = False, log_weights: Tensor | None = None,
                   softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """logits [C*B, T, V] candidate-major, summed ref_logps [C*B], log_weights [B, C] -> (loss,
    sequence log-probs [C*B]), eagerly."""
    seq, ref, counts = _policy_and_reference(logits, labels, ref_logps, ignore_index, average, ref_logps_averaged,
                                             softcap)
    batch = seq.shape[0] // num_candidates
    loss = epa_loss(seq.view(num_candidates, batch).T, ref.view(num_candidates, batch).T, beta, num_strong,
                    weak_weight, mask, reduction, sft_weight, counts[:batch], average, log_weights)
    return loss, seq
