"""Preference losses on sequence log-probs: DPO and its variants, and EPA.

With h = log pi_theta(y|x) - log pi_ref(y|x) per sequence (epa-spec sections 3 and 4):

    DPO   delta = h_chosen - h_rejected
          sigmoid  -(1-eps) log sigma(beta delta) - eps log sigma(-beta delta)       (cDPO for eps > 0)
          robust   [-(1-eps) log sigma(beta delta) + eps log sigma(-beta delta)] / (1 - 2 eps)
          hinge    relu(1 - beta delta)
          ipo      (delta - 1/(2 beta))^2                         (on length-averaged log-probs)
    EPA   s_ij = beta h_ij + omega_j + log_weights_ij,
          omega_j = 0 (j <= K), log(weak_weight) (j > K), -inf (masked)
          loss_i = logsumexp_j s_ij - s_i0
    SFT   loss_i += sft_weight * NLL,  NLL = -sum_i log pi_theta(chosen_i) / sum_i n_i   (both losses;
          n_i the chosen answer's completion tokens: TRL's rpo_alpha, or its "sft" loss term)

Column 0 of EPA's [B, C] inputs is the chosen answer, columns 1..K the strong negatives (rejected
answers to the same prompt), the rest weak negatives (answers to other prompts scored under this
one). The paper's exact constants are not verified: beta = 0.1 and weak_weight = 1 are defaults.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from . import eager
from ._autograd import check_autograd_support, gradients_by_definition
from ._kernel_contract import accumulate_dtype
from ._validation import (RENAMED, beta_in_range, check_bool, check_choice, check_float, check_int,
                          check_optional_tensor, check_positive_float, check_same_device,
                          check_tensor, refuse_renamed)

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")
REDUCTIONS = ("mean", "sum", "none")


def check_loss_options(*, beta: float, reduction: str, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                       weak_weight: float = 1.0) -> None:
    """Raises TypeError (wrong type) or ValueError (bad value) naming the first bad option."""
    check_positive_float("beta", beta)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    check_float("label_smoothing", label_smoothing, at_least=0.0, below=0.5)
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' and 'robust' only; got {loss_type!r}")
    check_float("weak_weight", weak_weight, at_least=0.0)


def check_num_strong(num_strong: object, candidates: int) -> int:
    """K in [1, C - 1] (None: C - 1, every negative strong)."""
    if num_strong is None:
        return candidates - 1
    number = check_int("num_strong", num_strong)
    if not 1 <= number <= candidates - 1:
        raise ValueError(f"num_strong must lie in [1, C - 1] = [1, {candidates - 1}]; got {number}")
    return number


def check_sft_weight(sft_weight: float) -> None:
    """Raises TypeError / ValueError unless sft_weight is a finite real number >= 0."""
    if isinstance(sft_weight, bool) or not isinstance(sft_weight, numbers.Real):
        raise TypeError(f"sft_weight must be a real number; got {type(sft_weight).__name__}")
    if not 0 <= sft_weight < float("inf"):
        raise ValueError(f"sft_weight must be a finite number >= 0; got {sft_weight}")


def check_sft_options(sft_weight: float, chosen_token_counts: Tensor | None, policy_chosen: Tensor) -> None:
    """The SFT term's options: a finite sft_weight >= 0 and, when it is > 0, the [B] token counts."""
    check_sft_weight(sft_weight)
    if sft_weight == 0:
        return
    if chosen_token_counts is None:
        raise ValueError("chosen_token_counts is required when sft_weight > 0: the SFT term averages the chosen "
                         "answers' negative log-likelihood over their completion tokens ([B] counts, e.g. "
                         "(labels != IGNORE_INDEX).sum(-1) of the chosen rows)")
    check_tensor("chosen_token_counts", chosen_token_counts)
    if chosen_token_counts.shape != policy_chosen.shape[:1]:
        raise ValueError(f"chosen_token_counts must have shape [B] = [{policy_chosen.shape[0]}]; "
                         f"got {list(chosen_token_counts.shape)}")
    check_same_device("chosen_token_counts", chosen_token_counts, "the log-probs", policy_chosen)


def sft_nll(policy_chosen: Tensor, chosen_token_counts: Tensor, average: bool) -> Tensor:
    """-sum_b log pi(chosen_b) / sum_b n_b (0 when there are no tokens), in the accumulation dtype.

    policy_chosen: [B] summed log-probs, or length-averaged ones when ``average`` (then they are
    multiplied back by their counts)."""
    chosen = policy_chosen.to(accumulate_dtype(policy_chosen))
    counts = chosen_token_counts.to(chosen.dtype)
    sums = chosen * counts if average else chosen
    return -sums.sum() / counts.sum().clamp_min(1)


def reduce_losses(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _check_same_shape(op: str, reference_name: str, reference: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is None:
            continue
        torch._check_value(
            t.shape == reference.shape,
            lambda: f"{op}: {name} must have the shape of {reference_name} ({list(reference.shape)}); got {list(t.shape)}",
        )
        torch._check_value(
            t.device == reference.device,
            lambda: f"{op}: {name} must be on the device of {reference_name} ({reference.device}); got {t.device}",
        )


def _check_floating(op: str, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        torch._check_type(t.is_floating_point(),
                          lambda: f"{op}: {name} must be a floating-point tensor; got {t.dtype}")


def _upcast(tensors, dtype: torch.dtype) -> list[Tensor | None]:
    return [t if t is None else t.to(dtype) for t in tensors]


# --- DPO ---------------------------------------------------------------------------------------


@torch.library.register_fake("epa_ext::dpo_loss")
def _dpo_loss_fake(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing):
    torch._check_value(policy_chosen.dim() == 1,
                       lambda: f"dpo_loss: policy_chosen must have shape [B]; got {list(policy_chosen.shape)}")
    _check_floating("dpo_loss", policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                    ref_rejected=ref_rejected)
    _check_same_shape("dpo_loss", "policy_chosen", policy_chosen, policy_rejected=policy_rejected,
                      ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    beta_in_range("dpo_loss", beta, policy_chosen.dtype)
    torch._check_value(0 <= label_smoothing < 0.5,
                       lambda: f"dpo_loss: label_smoothing must lie in [0, 0.5); got {label_smoothing}")
    out = policy_chosen.new_empty(policy_chosen.shape, dtype=accumulate_dtype(policy_chosen))
    return out, torch.empty_like(out)


def _dpo_setup_context(ctx, inputs, output) -> None:
    *logps, beta, loss_type, label_smoothing = inputs
    _, slopes = output
    ctx.save_for_backward(*logps, slopes)
    ctx.options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    ctx.mark_non_differentiable(slopes)


def _dpo_backward(ctx, grad_losses: Tensor, _grad_slopes: Tensor | None):
    *logps, slopes = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    if torch.is_grad_enabled():  # create_graph=True: a gradient autograd can differentiate again
        acc = accumulate_dtype(logps[0])
        grads = gradients_by_definition(
            lambda *t: eager.dpo_loss(*_upcast(t, acc), **ctx.options, reduction="none"), logps, needs, grad_losses)
        return (*grads, None, None, None)
    grad_chosen = grad_losses * slopes  # d loss / d h_chosen; h_rejected and the refs get +-1 times it
    signs = (1, -1, -1, 1)
    grads = tuple(
        (sign * grad_chosen).to(t.dtype) if needed else None for sign, t, needed in zip(signs, logps, needs)
    )
    return (*grads, None, None, None)


torch.library.register_autograd("epa_ext::dpo_loss", _dpo_backward, setup_context=_dpo_setup_context)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    sft_weight: float = 0.0,
    chosen_token_counts: Tensor | None = None,
    average: bool = False,
    **renamed,
) -> Tensor:
    """DPO-family loss of B preference pairs.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: [B] sequence log-probs of the
            chosen and rejected answers under the policy and the reference, all four in the
            form the loss is taken on: ipo is defined on length-averaged ones (sum / token
            count; ``fused_dpo_loss`` averages for it), the other types on sums; on one device,
            any floating dtype.
        beta: KL strength, finite and > 0. loss_type: "sigmoid" | "robust" | "hinge" | "ipo".
        label_smoothing: eps in [0, 0.5) for "sigmoid" (cDPO) and "robust".
        reduction: "mean" (over B) | "sum" | "none" ([B]).
        sft_weight: lambda >= 0; adds lambda * NLL to every pair's loss, with
            ``NLL = -sum_b log pi(chosen_b) / sum_b chosen_token_counts[b]`` the chosen answers'
            negative log-likelihood averaged over all their completion tokens in the batch
            (TRL's rpo_alpha; TRL 1.16's loss_type=[..., "sft"] with weight lambda). With
            reduction="mean" the loss is ``mean_b loss_b + lambda * NLL``.
        chosen_token_counts: [B] completion-token counts of the chosen answers; required when
            sft_weight > 0.
        average: True when the log-probs given are length-averaged (as for ipo; the name every
            function of epa_ext gives length averaging, formerly ``averaged``); the SFT term then
            takes ``policy_chosen * chosen_token_counts`` as the chosen sums.

    Returns:
        The loss (fp32, fp64 for fp64 policy_chosen; [B] for reduction="none"), differentiable in
        all four inputs, to any order (``create_graph=True``).

    Non-finite log-probs (a reference log-prob of +-inf, a NaN) affect only their pair: its loss
    and gradient are what plain torch gives for the formula (``epa_ext.eager.dpo_loss``), e.g.
    +inf for ``ref_chosen = +inf`` with the sigmoid loss, NaN where it is undefined (inf - inf).
    """
    refuse_renamed("dpo_loss", renamed, RENAMED)
    check_loss_options(beta=beta, reduction=reduction, loss_type=loss_type, label_smoothing=label_smoothing)
    tensors = {name: check_tensor(name, t) for name, t in (("policy_chosen", policy_chosen),
                                                            ("policy_rejected", policy_rejected),
                                                            ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected))}
    check_sft_options(sft_weight, chosen_token_counts, policy_chosen)
    check_bool("average", average)
    check_autograd_support("dpo_loss", *tensors.values())
    losses, _ = torch.ops.epa_ext.dpo_loss(*tensors.values(), float(beta), loss_type, float(label_smoothing))
    if sft_weight:
        losses = losses + sft_weight * sft_nll(policy_chosen, chosen_token_counts, average)
    return reduce_losses(losses, reduction)


# --- EPA ---------------------------------------------------------------------------------------


def _check_epa(op: str, policy_logps: Tensor, ref_logps: Tensor, mask: Tensor | None, beta: float, num_strong: int,
               weak_weight: float, log_weights: Tensor | None = None) -> None:
    """The checks of csrc/losses_checks.h's check_epa_inputs, for fake tensors."""
    torch._check_value(
        policy_logps.dim() == 2,
        lambda: f"{op}: policy_logps must have shape [B, C] (C = 1 + strong + weak candidates); got {list(policy_logps.shape)}",
    )
    _check_floating(op, policy_logps=policy_logps, ref_logps=ref_logps)
    candidates = policy_logps.shape[1]
    torch._check_value(candidates >= 2, lambda: f"{op}: policy_logps needs at least 2 candidates (a positive and a "
                       f"negative); got C = {candidates}")
    _check_same_shape(op, "policy_logps", policy_logps, ref_logps=ref_logps, mask=mask, log_weights=log_weights)
    if mask is not None:
        torch._check_type(mask.dtype == torch.bool, lambda: f"{op}: mask must be a bool tensor; got {mask.dtype}")
    if log_weights is not None:
        _check_floating(op, log_weights=log_weights)
    beta_in_range(op, beta, policy_logps.dtype)
    torch._check_value(
        1 <= num_strong <= candidates - 1,
        lambda: f"{op}: num_strong must lie in [1, C - 1] = [1, {candidates - 1}]; got {num_strong}",
    )
    torch._check_value(0 <= weak_weight < float("inf"),
                       lambda: f"{op}: weak_weight must be a finite number >= 0; got {weak_weight}")


@torch.library.register_fake("epa_ext::epa_loss")
def _epa_loss_fake(policy_logps, ref_logps, mask, beta, num_strong, weak_weight, log_weights=None):
    _check_epa("epa_loss", policy_logps, ref_logps, mask, beta, num_strong, weak_weight, log_weights)
    out = policy_logps.new_empty(policy_logps.shape[:1], dtype=accumulate_dtype(policy_logps))
    return out, torch.empty_like(out)


@torch.library.register_fake("epa_ext::epa_loss_backward")
def _epa_loss_backward_fake(grad_losses, policy_logps, ref_logps, mask, lse, beta, num_strong, weak_weight,
                            log_weights=None):
    op = "epa_loss_backward"
    _check_epa(op, policy_logps, ref_logps, mask, beta, num_strong, weak_weight, log_weights)
    _check_floating(op, grad_losses=grad_losses, lse=lse)
    for name, t in (("grad_losses", grad_losses), ("lse", lse)):
        torch._check_value(
            t.shape == policy_logps.shape[:1] and t.device == policy_logps.device,
            lambda: f"{op}: {name} must have shape [B] = [{policy_logps.shape[0]}] on {policy_logps.device}; got "
            f"{list(t.shape)} on {t.device}",
        )
    return policy_logps.new_empty(policy_logps.shape, dtype=accumulate_dtype(policy_logps))


def _epa_setup_context(ctx, inputs, output) -> None:
    policy_logps, ref_logps, mask, beta, num_strong, weak_weight, *log_weights = inputs
    log_weights = log_weights[0] if log_weights else None
    _, lse = output
    ctx.save_for_backward(policy_logps, ref_logps, mask, lse, log_weights)
    ctx.options = (beta, num_strong, weak_weight)
    ctx.mark_non_differentiable(lse)


def _epa_backward(ctx, grad_losses: Tensor, _grad_lse: Tensor | None):
    policy_logps, ref_logps, mask, lse, log_weights = ctx.saved_tensors
    needs = (*ctx.needs_input_grad[:2], len(ctx.needs_input_grad) > 6 and ctx.needs_input_grad[6])
    beta, num_strong, weak_weight = ctx.options
    if torch.is_grad_enabled():  # create_graph=True: a gradient autograd can differentiate again
        acc = accumulate_dtype(policy_logps)
        grad_policy, grad_ref, grad_log_weights = gradients_by_definition(
            lambda p, r, w: eager.epa_loss(*_upcast((p, r), acc), beta=beta, num_strong=num_strong,
                                           weak_weight=weak_weight, mask=mask, reduction="none",
                                           log_weights=None if w is None else w.to(acc)),
            (policy_logps, ref_logps, log_weights), needs, grad_losses)
    else:
        grad = torch.ops.epa_ext.epa_loss_backward(grad_losses, policy_logps, ref_logps, mask, lse, *ctx.options,
                                                   log_weights)
        grad_policy = grad.to(policy_logps.dtype) if needs[0] else None
        grad_ref = (-grad).to(ref_logps.dtype) if needs[1] else None
        # d loss / d log_weights = softmax - onehot(0) = (d loss / d policy_logps) / beta
        grad_log_weights = (grad / beta).to(log_weights.dtype) if needs[2] else None
    return (grad_policy, grad_ref, None, None, None, None, grad_log_weights)[:len(ctx.needs_input_grad)]


torch.library.register_autograd("epa_ext::epa_loss", _epa_backward, setup_context=_epa_setup_context)


def epa_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    *,
    beta: float = 0.1,
    num_strong: int | None = None,
    weak_weight: float = 1.0,
    mask: Tensor | None = None,
    reduction: str = "mean",
    sft_weight: float = 0.0,
    chosen_token_counts: Tensor | None = None,
    average: bool = False,
    log_weights: Tensor | None = None,
    **renamed,
) -> Tensor:
    """EPA loss: each chosen answer against its strong and weak negatives, a softmax contrast.

    Args:
        policy_logps, ref_logps: [B, C] sequence log-probs; column 0 the chosen answer, columns
            1..num_strong strong negatives, the remaining columns weak negatives.
        beta: KL strength, finite and > 0. num_strong: K, an int in [1, C - 1] (None: all C - 1
            negatives are strong).
        weak_weight: alpha, a finite number >= 0, the weight of each weak negative in the partition sum.
        mask: [B, C] bool, False for absent candidates (column 0 must be True); they contribute
            nothing to the value or the gradient.
        reduction: "mean" (over B) | "sum" | "none" ([B]).
        sft_weight, chosen_token_counts, averaged: the SFT term on the chosen answers (column
            0), as in ``dpo_loss``.
        log_weights: [B, C] floating, added to each candidate's score (a per-candidate log of
            its weight in the partition sum, e.g. importance weights log mu(y|x) - log q(y) of
            weak negatives drawn from q instead of the reference mu; docs/losses.md). -inf marks
            a candidate absent, as mask does; column 0 must be finite (on CUDA a device-side
            assertion); +inf and NaN are refused (ValueError). With weak_weight, both apply.

    Returns:
        ``mean_i [logsumexp_j (beta h_ij + omega_j + w_ij) - (beta h_i0 + w_i0)]`` (+ lambda *
        NLL) (fp32), differentiable in policy_logps, ref_logps and log_weights (d loss_i / d w_ij =
        softmax_j - 1[j == 0]), to any order (``create_graph=True``). K = 1 with no weak
        negatives is DPO's sigmoid loss.

    Non-finite log-probs affect only their row, whose loss and gradient are plain torch's
    (``epa_ext.eager.epa_loss``, with torch.logsumexp): a candidate score beta h_ij of +inf
    (policy +inf or reference -inf) makes the row's logsumexp +inf, so the loss is +inf when that
    candidate is a negative and NaN (inf - inf) when it is the chosen one; a score of -inf (policy
    -inf or reference +inf) drops the candidate as a mask does, so a chosen answer at -inf gives
    +inf; a NaN makes the row NaN.
    """
    check_loss_options(beta=beta, reduction=reduction, weak_weight=weak_weight)
    policy_logps = check_tensor("policy_logps", policy_logps)
    ref_logps = check_tensor("ref_logps", ref_logps)
    refuse_renamed("epa_loss", renamed, RENAMED)
    mask = check_optional_tensor("mask", mask)
    log_weights = check_optional_tensor("log_weights", log_weights)
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must have shape [B, C]; got {list(policy_logps.shape)}")
    num_strong = check_num_strong(num_strong, policy_logps.shape[1])
    check_sft_options(sft_weight, chosen_token_counts, policy_logps)
    check_bool("average", average)
    check_autograd_support("epa_loss", policy_logps, ref_logps, log_weights)
    losses, _ = torch.ops.epa_ext.epa_loss(policy_logps, ref_logps, mask, float(beta), num_strong, float(weak_weight),
                                           log_weights)
    if sft_weight:
        losses = losses + sft_weight * sft_nll(policy_logps[:, 0], chosen_token_counts, average)
    return reduce_losses(losses, reduction)


# --- modules and metrics -------------------------------------------------------------------------


class DPOLoss(nn.Module):
    """``dpo_loss`` with its options fixed at construction (checked there)."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reduction: str = "mean", sft_weight: float = 0.0):
        super().__init__()
        check_loss_options(beta=beta, reduction=reduction, loss_type=loss_type, label_smoothing=label_smoothing)
        check_sft_weight(sft_weight)
        self.beta, self.loss_type, self.label_smoothing, self.reduction = beta, loss_type, label_smoothing, reduction
        self.sft_weight = sft_weight

    def forward(self, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                chosen_token_counts: Tensor | None = None, average: bool = False, **renamed) -> Tensor:
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta,
                        loss_type=self.loss_type, label_smoothing=self.label_smoothing, reduction=self.reduction,
                        sft_weight=self.sft_weight, chosen_token_counts=chosen_token_counts, average=average,
                        **renamed)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"sft_weight={self.sft_weight}")


class EPALoss(nn.Module):
    """``epa_loss`` with its options fixed at construction (checked there)."""

    def __init__(self, beta: float = 0.1, num_strong: int | None = None, weak_weight: float = 1.0,
                 reduction: str = "mean", sft_weight: float = 0.0):
        super().__init__()
        check_loss_options(beta=beta, reduction=reduction, weak_weight=weak_weight)
        if num_strong is not None:
            check_int("num_strong", num_strong, at_least=1)
        check_sft_weight(sft_weight)
        self.beta, self.num_strong, self.weak_weight, self.reduction = beta, num_strong, weak_weight, reduction
        self.sft_weight = sft_weight

    def forward(self, policy_logps: Tensor, ref_logps: Tensor, mask: Tensor | None = None,
                chosen_token_counts: Tensor | None = None, average: bool = False,
                log_weights: Tensor | None = None, **renamed) -> Tensor:
        return epa_loss(policy_logps, ref_logps, beta=self.beta, num_strong=self.num_strong,
                        weak_weight=self.weak_weight, mask=mask, reduction=self.reduction, sft_weight=self.sft_weight,
                        chosen_token_counts=chosen_token_counts, average=average, log_weights=log_weights,
                        **renamed)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, num_strong={self.num_strong}, weak_weight={self.weak_weight}, sft_weight={self.sft_weight}"


@torch.no_grad()
def preference_metrics(policy_logps: Tensor, ref_logps: Tensor, *, beta: float = 0.1, num_strong: int | None = None,
                       mask: Tensor | None = None) -> dict[str, Tensor]:
    """The metrics TRL users know, from [B, C] sequence log-probs (C = 2 for DPO pairs).

    Rewards are beta * (policy - ref). "rejected" means the strong negatives (columns
    1..num_strong); margins and accuracies are over (chosen, strong negative) pairs, so with one
    negative they are TRL's. Weak negatives, when present, add "rewards/weak". Values are 0-d
    fp32 tensors (no host synchronization); masked candidates are left out.

    Args:
        policy_logps, ref_logps: [B, C] floating-point, C >= 2, on one device; as for ``epa_loss``.
        mask: [B, C] bool (False: an absent candidate), exactly that shape: a broadcastable one
            would change the weights of the means, so it is refused.
    """
    check_positive_float("beta", beta)
    policy = check_tensor("policy_logps", policy_logps)
    ref = check_tensor("ref_logps", ref_logps)
    mask = check_optional_tensor("mask", mask)
    for name, t in (("policy_logps", policy), ("ref_logps", ref)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of log-probs; got {t.dtype}")
    if policy.dim() != 2 or policy.shape[1] < 2:
        raise ValueError(f"policy_logps must have shape [B, C] with C >= 2 (the chosen answer and at least one "
                         f"negative); got {list(policy.shape)}")
    for name, t in (("ref_logps", ref), ("mask", mask)):
        if t is None:
            continue
        if t.shape != policy.shape:  # a broadcastable mask would silently reweight the means
            raise ValueError(f"{name} must have the shape of policy_logps ({list(policy.shape)}); got {list(t.shape)}")
        check_same_device(name, t, "policy_logps", policy)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor; got {mask.dtype}")
    policy, ref = policy.float(), ref.float()
    candidates = policy.shape[1]
    num_strong = check_num_strong(num_strong, candidates)
    present = torch.ones_like(policy, dtype=torch.bool) if mask is None else mask
    rewards = beta * (policy - ref)
    strong = slice(1, 1 + num_strong)
    strong_present = present[:, strong].float()

    def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
        return (values * weights).sum() / weights.sum().clamp_min(1.0)

    margins = rewards[:, :1] - rewards[:, strong]
    metrics = {
        "rewards/chosen": rewards[:, 0].mean(),
        "rewards/rejected": masked_mean(rewards[:, strong], strong_present),
        "rewards/margins": masked_mean(margins, strong_present),
        "rewards/accuracies": masked_mean((margins > 0).float(), strong_present),
        "logps/chosen": policy[:, 0].mean(),
        "logps/rejected": masked_mean(policy[:, strong], strong_present),
    }
    if candidates > 1 + num_strong:
        weak = slice(1 + num_strong, None)
        metrics["rewards/weak"] = masked_mean(rewards[:, weak], present[:, weak].float())
    return metrics
