"""Policy and reference through the decoder, for a candidate-major batch laid out padded, packed
(``packing.py``) or prefix-shared (``prefix.py``): the model's own forward
(``causal_lm.through_model``), and a consumer of the lm_head's inputs that gets the hidden
states in the padded layout either way, so the fused losses and labels do not depend on the layout.

    loss, router_loss = through_batch(policy, transform, lambda head: fused_linear_epa_loss(...),
                                      batch.input_ids, batch.attention_mask, batch.packed)
    ref = reference_logps(reference, transform, batch.input_ids, batch.attention_mask, batch.labels)
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import Tensor, nn

from ..causal_lm import HeadInputs, LogitTransform, through_model
from ..linear import linear_sequence_logps
from .packing import Packed, attn_implementation, pack, row_bound, through_packed_model
from .prefix import Shared, through_shared_model

T = TypeVar("T")


def through_batch(model: nn.Module, transform: LogitTransform, consume: Callable[[HeadInputs], T],
                  input_ids: Tensor, attention_mask: Tensor, packed: Packed | Shared | None = None, *,
                  router_logits: bool = False) -> tuple[T, Tensor | None]:
    """``causal_lm.through_model`` of the padded batch input_ids / attention_mask [R, T], or, with
    packed, of the same batch's packed rows (``packing.pack``) or prefix-shared rows
    (``prefix.share``); consume gets the hidden states in the padded layout either way. Returns
    (consume's result, the router loss or None)."""
    if isinstance(packed, Shared):
        return through_shared_model(model, transform, packed, consume, router_logits=router_logits), None
    if packed is not None:
        return through_packed_model(model, transform, packed, consume, router_logits=router_logits), None
    return through_model(model, transform, consume, router_logits=router_logits, input_ids=input_ids,
                         attention_mask=attention_mask)


def packed_for(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, max_row_tokens: int,
               pad_id: int | None) -> Packed:
    """The batch's sequences packed into rows of at most max_row_tokens tokens, as the model's
    attention implementation can take them (``packing.row_bound``: one row for flash attention);
    pad_id (None: 0) fills the rows' free tails, which no real token attends."""
    return pack(input_ids, attention_mask, row_bound(attn_implementation(model), max_row_tokens),
                0 if pad_id is None else pad_id)


@torch.no_grad()
def reference_logps(scorer: nn.Module, transform: LogitTransform, input_ids: Tensor, attention_mask: Tensor,
                    labels: Tensor, packed: Packed | Shared | None = None) -> Tensor:
    """[R] fp32 summed log-probs of the rows' labelled tokens under scorer (the reference; no
    graph), through the fused linear path: the rows' [R, T, V] logits are never formed."""
    logps, _ = through_batch(
        scorer, transform, lambda head: linear_sequence_logps(head.hidden, head.weight, labels, **head.as_kwargs()),
        input_ids, attention_mask, packed)
    return logps.float()
