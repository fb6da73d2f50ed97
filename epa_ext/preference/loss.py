"""The loss of a candidate-major batch and its logged statistics, from the lm_head's inputs
(``causal_lm.HeadInputs``): DPO or EPA through the fused linear losses, the SFT term, EPA's
importance log-weights, and an MoE model's router loss, written once for epa-train and
EPATrainer.

    spec = LossSpec(loss="epa", beta=0.1, num_strong=1, weak_weight=0.5)
    loss, policy_logps = preference_loss(head, labels, ref_logps, candidate_mask, spec)

Every other loss of TRL 1.16's DPOTrainer (``pairwise.PairwiseSpec``: its 15 loss types, their
mixtures, f-divergences, LD-DPO, WPO) goes through ``pairwise_preference_loss``: per-token
log-probs from the fused linear op (no logits kept), then ``pairwise.pairwise_loss``;
``fused_dpo_spec`` says which PairwiseSpecs the faster fused DPO loss computes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .._kernel_contract import IGNORE_INDEX
from ..causal_lm import HeadInputs, LogitTransform, logit_chunks, logit_transform, mean_logits
from ..fused import fused_linear_dpo_loss, fused_linear_epa_loss
from ..linear import linear_token_logps
from ..losses import DPO_LOSS_TYPES
from .packing import Packed
from .prefix import Shared
from .pairwise import PairwiseSpec, ld_token_weights, log_sum_squared_probs, pairwise_loss, wpo_sequence_weights
from .scoring import reference_logps, through_batch


@dataclass(frozen=True)
class LossSpec:
    """What a preference loss computes (docs/losses.md): loss "dpo" (dpo_loss_type, label_smoothing)
    or "epa" (num_strong K strong negatives; weak ones weighted weak_weight), at KL strength beta,
    plus sft_weight times the chosen answers' NLL."""

    loss: Literal["dpo", "epa"]
    beta: float
    dpo_loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    num_strong: int = 1
    weak_weight: float = 1.0
    sft_weight: float = 0.0


def preference_loss(head: HeadInputs, labels: Tensor, ref_logps: Tensor, candidate_mask: Tensor, spec: LossSpec,
                    log_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(loss, policy sequence log-probs [C*B] fp32, as the loss used them) of a candidate-major
    batch: head.hidden [C*B, T, H], labels [C*B, T], summed ref_logps [C*B], candidate_mask [B, C]
    (C = 2 for DPO), EPA's log_weights [B, C] or None."""
    if spec.loss == "dpo":
        return fused_linear_dpo_loss(head.hidden, head.weight, labels, ref_logps, **head.as_kwargs(), beta=spec.beta,
                                     loss_type=spec.dpo_loss_type, label_smoothing=spec.label_smoothing,
                                     sft_weight=spec.sft_weight)
    return fused_linear_epa_loss(head.hidden, head.weight, labels, ref_logps, **head.as_kwargs(),
                                 num_candidates=candidate_mask.shape[1], beta=spec.beta, num_strong=spec.num_strong,
                                 weak_weight=spec.weak_weight, mask=candidate_mask, sft_weight=spec.sft_weight,
                                 log_weights=log_weights)


class PreferenceLoss(nn.Module):
    """The policy and its loss in one module, so DDP/FSDP see every parameter used in forward
    (the lm_head's weight is read by the fused linear loss, not by a forward call of its own).

    forward(input_ids [C*B, T], attention_mask, labels, ref_logps [C*B], candidate_mask [B, C],
    log_weights [B, C] or None: EPA's per-candidate log-weights, packed: the batch's rows packed
    without padding or prefix-shared, or None, ``scoring.through_batch``) returns (loss, policy_seq_logps [C*B],
    logit_sums [C*B] (see ``logit_sums``; no graph), the router loss or None). With
    router_aux_coef > 0 (an MoE model whose config asks for router logits) the loss includes
    router_aux_coef times the model's router load-balancing loss, as transformers and TRL add it.
    """

    def __init__(self, policy: nn.Module, spec: LossSpec, *, transform: LogitTransform | None = None,
                 router_aux_coef: float = 0.0):
        super().__init__()
        self.policy, self.spec = policy, spec
        self.transform = logit_transform(policy) if transform is None else transform
        self.router_aux_coef = router_aux_coef

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, ref_logps: Tensor,
                candidate_mask: Tensor, log_weights: Tensor | None = None, packed: Packed | Shared | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        def loss_of(head: HeadInputs) -> tuple[Tensor, Tensor, Tensor]:
            loss, seq = preference_loss(head, labels, ref_logps, candidate_mask, self.spec, log_weights)
            return loss, seq, logit_sums(head, labels)

        (loss, seq, sums), aux_loss = through_batch(self.policy, self.transform, loss_of, input_ids, attention_mask,
                                                    packed, router_logits=self.router_aux_coef > 0)
        if aux_loss is not None:
            loss = loss + self.router_aux_coef * aux_loss.to(loss.dtype)
        return loss, seq, sums, aux_loss


@torch.no_grad()
def token_statistics(head: HeadInputs, labels: Tensor, *, full: bool = False) -> dict[str, Tensor]:
    """Per kept token (labels != IGNORE_INDEX, in labels' row-major order) of the model's own
    logits (softcap included): "mean_logits", its mean logit over the vocabulary; with full also
    "entropy" of its next-token distribution and "top1", whether the label is its first argmax
    (the full softmax: one more pass of the lm_head over the kept tokens, in chunks)."""
    kept = labels != IGNORE_INDEX
    weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
    hidden = head.hidden.detach()[kept]
    statistics = {"mean_logits": mean_logits(hidden, weight, bias, head.softcap)}
    if full:
        entropies, top1 = [], []
        kept_labels = labels[kept]
        for start, logits in logit_chunks(hidden, weight, bias, head.softcap):
            log_probs = logits.log_softmax(-1)
            entropies.append(-(log_probs.exp() * log_probs).sum(-1))
            top1.append(logits.argmax(-1) == kept_labels[start:start + logits.shape[0]])
        empty = hidden.new_empty(0, dtype=torch.float32)
        statistics["entropy"] = torch.cat(entropies) if entropies else empty
        statistics["top1"] = torch.cat(top1) if top1 else empty.bool()
    return statistics


@torch.no_grad()
def logit_sums(head: HeadInputs, labels: Tensor) -> Tensor:
    """[R]: for each row, the sum over its kept tokens of the token's mean logit over the
    vocabulary (``token_statistics``). Divided by the kept token count it gives TRL's
    logits/chosen and logits/rejected."""
    kept = labels != IGNORE_INDEX
    per_token = token_statistics(head, labels)["mean_logits"]
    return torch.zeros(labels.shape, dtype=per_token.dtype, device=per_token.device).masked_scatter(
        kept, per_token).sum(-1)


def fused_dpo_spec(spec: PairwiseSpec) -> tuple[LossSpec, float] | None:
    """(dpo, w) such that w * preference_loss(.., dpo) is spec's loss, where the fused DPO loss
    computes it exactly; None where only ``pairwise_preference_loss`` does.

    Exact: one type of ``losses.DPO_LOSS_TYPES`` at weight w > 0, at most one "sft" (weight
    w_sft, as sft_weight = w_sft / w), reverse KL, no LD-DPO, no WPO. label_smoothing is passed
    for "robust" only: TRL 1.16 ignores it for the other three, where the fused loss would apply
    it (cDPO for "sigmoid").
    """
    preference = [(t, w) for t, w in zip(spec.loss_types, spec.weights) if t != "sft"]
    sft = [w for t, w in zip(spec.loss_types, spec.weights) if t == "sft"]
    if len(preference) != 1 or len(sft) > 1 or spec.f_divergence_type != "reverse_kl" or spec.ld_alpha is not None \
            or spec.use_weighting:
        return None
    loss_type, weight = preference[0]
    if loss_type not in DPO_LOSS_TYPES or not 0 < weight < float("inf"):
        return None
    dpo = LossSpec("dpo", spec.beta, dpo_loss_type=loss_type,
                   label_smoothing=spec.label_smoothing if loss_type == "robust" else 0.0,
                   sft_weight=sft[0] / weight if sft else 0.0)
    return dpo, weight


def pairwise_token_weights(labels: Tensor, ld_alpha: float | None) -> Tensor:
    """[2B, T] fp32 weight of each position's log-prob in the sequence log-probs of a pair batch
    (rows [chosen; rejected], labels aligned with the logits): 1 on kept tokens (labels !=
    IGNORE_INDEX) and 0 elsewhere; with LD-DPO's ld_alpha, ``pairwise.ld_token_weights`` of each
    chosen / rejected pair (1 on the shared length, ld_alpha on the longer answer's tail)."""
    kept = labels != IGNORE_INDEX
    if ld_alpha is None:
        return kept.float()
    chosen, rejected = kept.chunk(2)
    return torch.cat(ld_token_weights(chosen, rejected, ld_alpha)).float()


def pairwise_preference_loss(head: HeadInputs, labels: Tensor, ref_logps: Tensor, spec: PairwiseSpec,
                             completion_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, policy sequence log-probs [2B] fp32, as the loss used them: LD-weighted with
    spec.ld_alpha) of a pair batch: TRL 1.16 DPOTrainer's loss for spec (``pairwise.pairwise_loss``).

    head.hidden [2B, T, H], labels [2B, T] (rows [chosen; rejected], aligned with the logits);
    ref_logps [2B]: the reference's sequence log-probs weighted as the policy's
    (``pairwise_reference_logps``); completion_tokens [2B]: each answer's token count as TRL
    counts it (the unshifted completion_mask's sum), which "ipo" and "sigmoid_norm" divide by.

    The policy's per-token log-probs come from ``linear_token_logps`` (chunked, differentiable, no
    [2B, T, V] logits); with spec.use_weighting, WPO's log sum_v p_v^2 of each kept token from
    ``pairwise.log_sum_squared_probs`` on its hidden state (no grad), and each pair's weight
    w(chosen) * w(rejected), w = exp(mean over the answer of log p_t - log sum_v p_v^2).
    """
    token_logps = linear_token_logps(head.hidden, head.weight, labels, **head.as_kwargs())  # 0 where ignored
    kept = labels != IGNORE_INDEX
    policy = (token_logps * pairwise_token_weights(labels, spec.ld_alpha)).sum(-1)
    plain = policy if spec.ld_alpha is None else token_logps.sum(-1)  # sft and WPO read plain sums
    kept_tokens = kept.sum(-1)
    wpo_weights = None
    if spec.use_weighting:
        log_sum_sq = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device).masked_scatter(
            kept, log_sum_squared_probs(head.hidden[kept], head.weight, head.bias, head.softcap))
        chosen_weights, rejected_weights = wpo_sequence_weights(plain, log_sum_sq.sum(-1), kept_tokens).chunk(2)
        wpo_weights = chosen_weights * rejected_weights
    policy_chosen, policy_rejected = policy.chunk(2)
    ref_chosen, ref_rejected = ref_logps.float().chunk(2)
    chosen_tokens, rejected_tokens = completion_tokens.chunk(2)
    loss, _ = pairwise_loss(spec, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                            chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                            chosen_nll=-plain.chunk(2)[0], chosen_nll_tokens=kept_tokens.chunk(2)[0],
                            wpo_weights=wpo_weights)
    return loss, policy


@torch.no_grad()
def pairwise_reference_logps(scorer: nn.Module, transform: LogitTransform, input_ids: Tensor,
                             attention_mask: Tensor, labels: Tensor, packed=None, *,
                             ld_alpha: float | None = None) -> Tensor:
    """[2B] fp32 reference sequence log-probs of a pair batch (rows [chosen; rejected]) weighted as
    ``pairwise_preference_loss`` weighs the policy's: ``scoring.reference_logps`` (plain sums), or
    with ld_alpha the LD-DPO sums sum_t pairwise_token_weights * log p_t from the fused per-token
    log-probs (no logits kept), which TRL 1.16 also precomputes and stores. packed: the layout
    ``scoring.through_batch`` takes (None: padded rows)."""
    if ld_alpha is None:
        return reference_logps(scorer, transform, input_ids, attention_mask, labels, packed)
    token_logps, _ = through_batch(
        scorer, transform, lambda head: linear_token_logps(head.hidden, head.weight, labels, **head.as_kwargs()),
        input_ids, attention_mask, packed)
    return (token_logps.float() * pairwise_token_weights(labels, ld_alpha)).sum(-1)
