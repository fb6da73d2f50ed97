"""The loss of a candidate-major batch and its logged statistics, from the lm_head's inputs
(``causal_lm.HeadInputs``): DPO or EPA through the fused linear losses, the SFT term, EPA's
importance log-weights, and an MoE model's router loss, written once for epa-train and
EPATrainer.

    spec = LossSpec(loss="epa", beta=0.1, num_strong=1, weak_weight=0.5)
    loss, policy_logps = preference_loss(head, labels, ref_logps, candidate_mask, spec)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .._kernel_contract import IGNORE_INDEX
from ..causal_lm import HeadInputs, LogitTransform, logit_chunks, logit_transform, mean_logits
from ..fused import fused_linear_dpo_loss, fused_linear_epa_loss
from .packing import Packed
from .scoring import through_batch


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
    without padding or None, ``scoring.through_batch``) returns (loss, policy_seq_logps [C*B],
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
                candidate_mask: Tensor, log_weights: Tensor | None = None, packed: Packed | None = None
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
