"""TRL's metric names for EPATrainer's batches (gathered over processes as TRL gathers them), and
EPA's own: rewards/weak, and weak/log_weight(_std) with the importance correction."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from ..._kernel_contract import IGNORE_INDEX
from ...losses import preference_metrics


def log_batch_metrics(store: defaultdict, gather, statistics: dict[str, Tensor], labels: Tensor, policy: Tensor,
                      ref: Tensor, candidate_mask: Tensor, *, beta: float, num_strong: int) -> None:
    """Appends one batch's metrics to store (TRL's ``_metrics[mode]``): the rewards, log-probs and
    accuracies of ``preference_metrics`` over the [B, C] policy and reference log-probs
    (candidate-major [C*B] in), logits/chosen and logits/rejected (the mean over the kept tokens
    of the chosen, resp. strong, answers of the mean logit; statistics from
    ``preference.loss.token_statistics``), and with token statistics' "entropy" and "top1",
    entropy and mean_token_accuracy."""
    batch, num_candidates = candidate_mask.shape
    per_prompt = {"policy": policy.view(num_candidates, batch).T, "ref": ref.view(num_candidates, batch).T}
    metrics = preference_metrics(gather(per_prompt["policy"]), gather(per_prompt["ref"]), beta=beta,
                                 num_strong=num_strong, mask=gather(candidate_mask))
    candidate = (labels != IGNORE_INDEX).nonzero()[:, 0] // batch
    chosen_tokens = candidate == 0
    rejected_tokens = (candidate >= 1) & (candidate <= num_strong)
    if "entropy" in statistics:
        entropy = statistics["entropy"]
        store["entropy"].append(gathered_ratio(gather, entropy.sum(), entropy.numel()))
    mean_logits = statistics["mean_logits"]
    store["logits/chosen"].append(gathered_ratio(gather, mean_logits[chosen_tokens].sum(), chosen_tokens.sum()))
    store["logits/rejected"].append(gathered_ratio(gather, mean_logits[rejected_tokens].sum(), rejected_tokens.sum()))
    if "top1" in statistics:
        store["mean_token_accuracy"].append(gathered_ratio(gather, statistics["top1"][chosen_tokens].sum(),
                                                           chosen_tokens.sum()))
    for key, value in metrics.items():
        store[key].append(value.item())


def log_weak_weights(store: defaultdict, gather, log_weights: Tensor, num_strong: int) -> None:
    """The mean and spread of the weak negatives' importance log-weights (columns after 1 + K)."""
    weak = gather(log_weights[:, 1 + num_strong:]).float()
    store["weak/log_weight"].append(weak.mean().item())
    store["weak/log_weight_std"].append(weak.std(unbiased=False).item())


def gathered_ratio(gather, total: Tensor, count: Tensor | int) -> float:
    """sum over processes of total / sum of count (0 when there is nothing to count), as TRL."""
    device = total.device
    total = gather(total.float().reshape(1)).sum().item()
    count = gather(torch.as_tensor(count, device=device).float().reshape(1)).sum().item()
    return total / count if count > 0 else 0.0
