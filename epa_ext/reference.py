"""Plain-torch definitions of every epa_ext op: the ground truth of the tests and the eager
baseline of the benchmarks.

Each function computes in the dtype it is given (pass float64 tensors for ground truth; pass
bf16 for "what plain torch does in bf16") and returns float32 (float64 for float64 input), the
output dtype of the fused op it defines.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """logits [..., V], labels [...] -> [...]: log_softmax, gather, 0 where ignored."""
    keep = labels != ignore_index
    safe_labels = labels.masked_fill(~keep, 0)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return logps.to(_out_dtype(logits)).masked_fill(~keep, 0.0)


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100, average: bool = False) -> Tensor:
    """logits [B, T, V], labels [B, T] -> [B]: masked sum (average: mean) of token log-probs."""
    total = token_logps(logits, labels, ignore_index).sum(-1)
    if average:
        total = total / (labels != ignore_index).sum(-1).clamp_min(1).to(total.dtype)
    return total
