"""Prefix-shared rows: each prompt through the decoder once for all of its C candidates. A
group (prompt x_b and its answers y_{b,1..C}) is laid out as [x_b | y_{b,1} | ... | y_{b,C}] in a
row, groups packed into rows of at most max_row_tokens tokens, with an attention mask that keeps
each answer to its own prompt and itself; the decoder's final hidden states are then gathered back
into the padded candidate-major layout [C*B, T, H] (every candidate's prompt positions read the one
shared prompt), where the fused-linear losses score them with the padded batch's own labels.

    attention = shared_attention(model)
    shared = share(batch.input_ids, batch.attention_mask, prompt_lengths, batch.num_candidates,
                   max_row_tokens=1024, pad_id=0, attention=attention)
    logps = through_shared_model(model, transform, shared, lambda head: linear_sequence_logps(
        head.hidden, head.weight, batch.labels, **head.as_kwargs()))  # head.hidden [C*B, T, H] as padded

Why it is exact: a causal decoder never lets a prompt token see what follows it, so the prompt's
hidden states (in every layer) do not depend on the answers, and the C padded rows compute C
copies of the same ones. Each answer's position ids continue its prompt's (len(x), len(x)+1, ...),
as in its padded row; it attends its prompt and its own earlier tokens, as there. The first answer
token is predicted by the hidden state of the prompt's last token: the same shared state for all C
candidates.

What the attention needs (read in transformers 5.25, masking_utils.py): a user's 4D mask (a tensor
of shape [P, 1, S, S]) passes ``_preprocess_mask_arguments`` untouched, and the model then adds
nothing: no causal part, no sliding window, no packed-sequence detection. So the mask carries all
of it. Position ids alone cannot express sharing (the packed-sequence detection reads every
restart as a new sequence, and the answers do not restart at 0); a plain causal mask lets each
answer see the answers before it.

- ``sdpa``: a bool mask, True where a query may attend a key.
- ``eager``: the mask is added to the attention scores, so it must be additive (0 where allowed,
  the dtype's most negative value elsewhere); a bool mask there adds 1 and 0 and masks nothing.
- ``flex_attention``: would need a BlockMask; not built here (torch 2.14 has no flex backward on
  the CPU, and the CUDA path is untested), so refused, as is every other implementation.
- Sliding windows, by position distance (query position - key position < window, transformers'
  ``sliding_window_overlay``): a model with ``config.layer_types`` (Gemma-2/3, Qwen2/3, ...) reads
  a dict of masks keyed by layer type, the sliding layers' windowed; one without (Mistral, Phi-3
  with a window) takes one mask, windowed when config.sliding_window is set.

``check_prefix_sharing`` verifies all this on the model itself (shared and padded hidden states of
a few short groups must agree), so a model whose attention does not honour the mask, or whose
window is something else, is refused instead of trained on other log-probs than the padded batch's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
from torch import Tensor, nn

from ..causal_lm import HeadInputs, LogitTransform, backbone_and_head, through_model, unwrap
from .packing import attn_implementation, pack_lengths, probe_hidden_states, tail_positions, text_config

T = TypeVar("T")

SHARED_ATTENTION = ("sdpa", "eager")
LAYER_TYPES = ("full_attention", "sliding_attention")
# The probe's bounds. fp32: the same computation laid out differently differs by rounding only, up to
# 1e-6 of the largest hidden state on the tiny models of python_tests/test_prefix_sharing.py; a mask
# that is not honoured moves them by O(0.1-1). bf16/fp16: |shared - padded| / |padded| in norm over
# all real positions, so that the rounding noise of the two layouts averages out (measured on the
# same models, weights of std 0.02 to 0.5: up to 2.3e-3 in bf16, 2.4e-4 in fp16; the largest
# elementwise difference reaches one bf16 ulp, 7.8e-3, as much as a 1 % error), while a 1 % error
# of the shared rows' hidden states, and hence of their logits, gives 1e-2 and is refused.
_PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4}
_PROBE_RTOL_HALF = 5e-3
_ROUTER_LOSS_REFUSED = ("prefix-shared rows cannot give an MoE model's router load-balancing loss (it would count each "
                        "prompt once instead of once per candidate); train it without prefix sharing, or without "
                        "output_router_logits")
# The answers of a group are numbered 0..C-1 in the segment map; its prompt, and a free tail token:
_PROMPT_SEGMENT = -1
_TAIL_SEGMENT = -2


@dataclass(frozen=True)
class SharedAttention:
    """What the mask of prefix-shared rows must be for one model (``shared_attention``):
    implementation "sdpa" (bool mask) or "eager" (additive mask in dtype); layer_types: the model
    reads a dict of masks keyed by these layer types (None: one mask for every layer);
    sliding_window: the window of the sliding layers (every layer without layer_types; None: no
    window)."""

    implementation: str
    dtype: torch.dtype
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None


def shared_attention(model: nn.Module) -> SharedAttention:
    """The SharedAttention of the model's (text) config.

    Raises:
        ValueError: an attention implementation other than sdpa and eager (naming the model class
            and the implementation), bidirectional attention, or a layer type other than
            full_attention and sliding_attention.
    """
    implementation = attn_implementation(model)
    name = type(unwrap(model)).__name__
    config = text_config(model)
    if implementation == "flex_attention":
        reason = ("torch 2.14 has no flex_attention backward on the CPU" if not torch.cuda.is_available() else
                  "the BlockMask of prefix-shared rows is not built: it could not be tested without a GPU")
        raise ValueError(f"{name} uses attn_implementation='flex_attention': prefix-shared rows cannot use it "
                         f"({reason}); load the model with attn_implementation='sdpa' (or 'eager'), or train "
                         f"without prefix sharing")
    if implementation not in SHARED_ATTENTION:
        raise ValueError(f"{name} uses attn_implementation={implementation!r}, which cannot take the attention mask of "
                         f"prefix-shared rows; they need one of {', '.join(SHARED_ATTENTION)} (load the model with "
                         f"attn_implementation='sdpa'), or train without prefix sharing")
    if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
        raise ValueError(f"{name} attends bidirectionally (config.use_bidirectional_attention or is_causal=False): its "
                         f"prompts see their answers, so one prompt cannot serve several answers; train it without "
                         f"prefix sharing")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"{name} has layers of type {', '.join(unknown)}, whose masks prefix-shared rows do not "
                             f"build (only {', '.join(LAYER_TYPES)}); train it without prefix sharing")
        layer_types = tuple(sorted(set(layer_types)))
    window = getattr(config, "sliding_window", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    weight = unwrap(model).get_input_embeddings().weight
    return SharedAttention(implementation, weight.dtype, layer_types, None if window is None else int(window))


@dataclass
class Shared:
    """The B groups of a candidate-major batch [C*B, T] laid out in P rows of S tokens.

    A group is its prompt, then its C answers, contiguous in one row; ``index[r, t]`` is the
    position in the flattened [P * S] rows that token t of candidate row r reads: its group's one
    prompt for t < len(prompt), its own answer after (padding positions point at 0: their labels
    are ignored, and the fused losses give them zero gradient). A row's positions after its last
    group (its free tail) hold pad_id, attend only themselves and are attended by nothing, with the
    position ids of ``packing.tail_positions`` (the padded batch's largest position id, T - 1, is
    some position's, for the RoPE types that read it).
    """

    input_ids: Tensor  # [P, S] int64
    position_ids: Tensor  # [P, S] int64: a prompt 0..len(x)-1, each of its answers len(x), len(x)+1, ...
    attention_mask: Tensor | dict[str, Tensor]  # [P, 1, S, S] (bool or additive), or such masks by layer type
    index: Tensor  # [C*B, T] int64 into the flattened [P * S] rows
    unshared_tokens: int  # the padded batch's real tokens: what the decoder computes for it without sharing

    def to(self, device: torch.device) -> Shared:
        mask = ({kind: m.to(device) for kind, m in self.attention_mask.items()}
                if isinstance(self.attention_mask, dict) else self.attention_mask.to(device))
        return Shared(self.input_ids.to(device), self.position_ids.to(device), mask, self.index.to(device),
                      self.unshared_tokens)

    @property
    def num_tokens(self) -> int:
        """Positions the decoder computes: P * S."""
        return self.input_ids.numel()

    @property
    def saved_share(self) -> float:
        """The share of decoder tokens saved against unshared (padding-free) sequences:
        1 - P * S / (the padded batch's real tokens)."""
        return 1.0 - self.num_tokens / max(self.unshared_tokens, 1)


def shared_token_ratio(attention_mask: Tensor, prompt_lengths: Tensor | list[int], num_candidates: int) -> float:
    """C(P + A) / (P + sum A) of a candidate-major batch [C*B, T]: the real tokens of its rows over
    those of its prompt-shared groups, what sharing divides the decoder's tokens by (before the
    rows' free tails)."""
    real = int(attention_mask.sum())
    prompts = int(torch.as_tensor(prompt_lengths).sum())
    return real / max(real - (num_candidates - 1) * prompts, 1)


def share(input_ids: Tensor, attention_mask: Tensor, prompt_lengths: Tensor | list[int], num_candidates: int,
          max_row_tokens: int | None, pad_id: int, *, attention: SharedAttention) -> Shared:
    """The candidate-major batch input_ids / attention_mask [C*B, T] (row c*B + b: prompt b, then
    its candidate c, right-padded) as prefix-shared rows: group b is prompt b (prompt_lengths[b]
    tokens, the same in its C rows) followed by its C answers, groups packed into rows of at most
    max_row_tokens tokens (``packing.pack_lengths``: a group is never split; one longer than the
    bound gets a row of its own; None: one row), on input_ids' device (the checks and the lengths
    synchronize with the host: build it where the batch is collated, then ``Shared.to``). Every
    candidate row is laid out, padding candidates included (the loss masks them). The mask is
    built for attention (``shared_attention(model)``).

    Raises:
        TypeError: attention is not a SharedAttention.
        ValueError: shapes that do not fit, rows that are not right-padded, a prompt length
            outside [0, its rows' lengths], candidate rows of one prompt whose prompt tokens
            differ, or max_row_tokens < 1.
    """
    if not isinstance(attention, SharedAttention):
        raise TypeError(f"attention must be a SharedAttention (from shared_attention(model)); got "
                        f"{type(attention).__name__}")
    if max_row_tokens is not None and max_row_tokens < 1:
        raise ValueError(f"max_row_tokens must be >= 1 or None; got {max_row_tokens}")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"need input_ids and attention_mask of one shape [C*B, T]; got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    num_rows, width = input_ids.shape
    if num_candidates < 1 or num_rows % num_candidates:
        raise ValueError(f"num_candidates must be >= 1 and divide the batch's {num_rows} rows; got {num_candidates}")
    batch_size = num_rows // num_candidates
    device = input_ids.device
    prompt_lengths = torch.as_tensor(prompt_lengths, dtype=torch.long, device=device)
    if prompt_lengths.shape != (batch_size,):
        raise ValueError(f"prompt_lengths needs one length per prompt ({batch_size}); got shape "
                         f"{tuple(prompt_lengths.shape)}")
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    positions = torch.arange(width, device=device)
    if not torch.equal(mask, positions < lengths[:, None]):
        raise ValueError("prefix sharing needs right-padded rows (the attention mask a prefix of ones in every row); "
                         "this batch is left-padded or has holes")
    row_prompt = prompt_lengths.repeat(num_candidates)  # [C*B]: row c*B + b has prompt b
    if bool(((row_prompt < 0) | (row_prompt > lengths)).any()):
        raise ValueError(f"prompt_lengths must lie in [0, the length of each of the prompt's rows]; got "
                         f"{prompt_lengths.tolist()} for rows of lengths {lengths.tolist()}")
    in_prompt = positions < row_prompt[:, None]  # [C*B, T]
    by_candidate = input_ids.view(num_candidates, batch_size, width)
    if not bool(((by_candidate == by_candidate[:1]) | ~in_prompt.view_as(by_candidate)).all()):
        raise ValueError("the rows of a prompt must hold the same prompt tokens (prompt_lengths[b] of them) in each of "
                         "its candidates; these differ, so they cannot share one prompt")

    answer_lengths = (lengths - row_prompt).view(num_candidates, batch_size)  # [C, B]
    group_lengths = prompt_lengths + answer_lengths.sum(0)  # [B]
    group_lengths_list = group_lengths.tolist()
    rows = pack_lengths(group_lengths_list, max_row_tokens)
    fills = [sum(group_lengths_list[b] for b in row) for row in rows] or [0]
    num_packed, row_width = len(fills), max(max(fills), 1)
    if int(lengths.max()) < width and min(fills) == row_width:
        row_width += 1  # no row has a free tail to hold position T - 1: give each a one-token tail
    starts = [0] * batch_size  # where each group starts in the flattened rows
    for p, row in enumerate(rows):
        offset = p * row_width
        for b in row:
            starts[b] = offset
            offset += group_lengths_list[b]
    group_starts = torch.tensor(starts, dtype=torch.long, device=device)
    # Answer c of group b starts after the prompt and the answers before it.
    answer_starts = group_starts + prompt_lengths + answer_lengths.cumsum(0) - answer_lengths  # [C, B]
    index = torch.where(in_prompt, group_starts.repeat(num_candidates)[:, None] + positions,
                        answer_starts.reshape(-1)[:, None] + positions - row_prompt[:, None])
    index = torch.where(mask, index, 0)

    flat = num_packed * row_width
    real = index[mask]
    packed_ids = torch.full((flat,), pad_id, dtype=input_ids.dtype, device=device)
    packed_ids[real] = input_ids[mask]  # a prompt's C copies write the same tokens
    position_ids = torch.zeros(flat, dtype=torch.long, device=device)
    position_ids[real] = positions.expand_as(mask)[mask]
    # Each free tail token is a group of its own (ids from B on): it attends itself only.
    groups = torch.arange(batch_size, batch_size + flat, device=device)
    groups[real] = torch.arange(batch_size, device=device).repeat(num_candidates)[:, None].expand_as(mask)[mask]
    segments = torch.full((flat,), _TAIL_SEGMENT, dtype=torch.long, device=device)
    candidate_of_row = torch.arange(num_candidates, device=device).repeat_interleave(batch_size)
    segments[real] = torch.where(in_prompt, _PROMPT_SEGMENT, candidate_of_row[:, None])[mask]
    for p, fill in enumerate(fills):
        position_ids[p * row_width + fill:(p + 1) * row_width] = tail_positions(row_width - fill, width, device)
    shape = (num_packed, row_width)
    masks = prefix_masks(groups.view(shape), segments.view(shape), position_ids.view(shape), attention)
    return Shared(packed_ids.view(shape), position_ids.view(shape), masks, index, int(lengths.sum()))


def prefix_masks(groups: Tensor, segments: Tensor, position_ids: Tensor,
                 attention: SharedAttention) -> Tensor | dict[str, Tensor]:
    """The attention mask(s) of prefix-shared rows from their maps [P, S]: group (a group's prompt
    and answers share one id), segment (-1 the prompt, c answer c) and position id.

    Query i may attend key j (j <= i in the row) when both are of one group and j is of the prompt
    or of i's own answer; in a sliding layer also position_ids[i] - position_ids[j] < window.
    Returns [P, 1, S, S], or a dict by layer type (attention.layer_types), as
    attention.implementation takes it: bool (True: attend) for sdpa, additive (0 / the dtype's most
    negative value) for eager."""
    length = groups.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=groups.device).tril()
    same_group = groups[:, :, None] == groups[:, None, :]
    visible_segment = (segments[:, None, :] == _PROMPT_SEGMENT) | (segments[:, :, None] == segments[:, None, :])
    allowed = causal & same_group & visible_segment  # [P, S, S]: query, key

    def windowed(window: int | None) -> Tensor:
        if window is None:
            return allowed
        return allowed & (position_ids[:, :, None] - position_ids[:, None, :] < window)

    def for_model(mask: Tensor) -> Tensor:
        mask = mask[:, None]
        if attention.implementation == "sdpa":
            return mask
        return torch.zeros(mask.shape, dtype=attention.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(attention.dtype).min)

    if attention.layer_types is None:
        return for_model(windowed(attention.sliding_window))
    return {kind: for_model(windowed(attention.sliding_window if kind == "sliding_attention" else None))
            for kind in attention.layer_types}


def unshare(hidden: Tensor, shared: Shared) -> Tensor:
    """Shared hidden states [P, S, H] -> [C*B, T, H] in the padded layout (a differentiable
    gather: a prompt's hidden states reach each of its C candidates, and their gradients add up in
    the one shared prompt; padding positions hold row 0's first hidden state)."""
    return hidden.reshape(-1, hidden.shape[-1])[shared.index]


def through_shared_model(model: nn.Module, transform: LogitTransform, shared: Shared,
                         consume: Callable[[HeadInputs], T], *, router_logits: bool = False) -> T:
    """``causal_lm.through_model`` on the shared rows (the model's own forward, given input_ids,
    position_ids and the rows' attention mask(s), without a cache): consume gets the HeadInputs
    with the hidden states gathered back into the padded layout [C*B, T, H].

    Raises ValueError for router_logits (_ROUTER_LOSS_REFUSED)."""
    if router_logits:
        raise ValueError(_ROUTER_LOSS_REFUSED)

    def consume_unshared(head: HeadInputs) -> T:
        return consume(replace(head, hidden=unshare(head.hidden, shared)))

    result, _ = through_model(model, transform, consume_unshared, input_ids=shared.input_ids,
                              position_ids=shared.position_ids, attention_mask=shared.attention_mask)
    return result


# The probe's groups: prompt lengths and each prompt's answer lengths (C = 3), very different, packed
# into rows of at most _PROBE_ROW_TOKENS: the longest group (26 tokens) alone, the other two in one row.
_PROBE_PROMPTS = [7, 2, 12]
_PROBE_ANSWERS = [[4, 1, 9], [6, 3, 2], [1, 8, 5]]
_PROBE_ROW_TOKENS = 36


@torch.no_grad()
def check_prefix_sharing(model: nn.Module, transform: LogitTransform, *, router_logits: bool = False) -> None:
    """Refuses (ValueError naming the model class and its attention implementation) a model whose
    prefix-shared rows do not give the padded batch's hidden states: ``shared_attention``'s
    refusals, router_logits, or hidden states of three short groups (answers of very different
    lengths, two groups in one row) that differ, shared and padded, by more than rounding:
    fp32/fp64 max|shared - padded| / max|padded| <= 1e-4; bf16/fp16 |shared - padded| / |padded|
    <= 5e-3 (norms over all real positions: a 1 % error gives 1e-2).
    The model runs in eval mode (no dropout) and is left as it was."""
    attention = shared_attention(model)
    name = type(unwrap(model)).__name__
    if router_logits:
        raise ValueError(_ROUTER_LOSS_REFUSED)
    weight = backbone_and_head(model)[1].weight
    generator = torch.Generator().manual_seed(0)

    def tokens(length: int) -> list[int]:
        return torch.randint(3, weight.shape[0], (length,), generator=generator).tolist()

    prompts = [tokens(length) for length in _PROBE_PROMPTS]
    answers = [[tokens(length) for length in lengths] for lengths in _PROBE_ANSWERS]
    num_candidates = len(_PROBE_ANSWERS[0])
    rows = [(prompts[b], answers[b][c]) for c in range(num_candidates) for b in range(len(prompts))]  # row c*B + b
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        input_ids[r, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        attention_mask[r, :len(prompt) + len(answer)] = 1
    input_ids, attention_mask = input_ids.to(weight.device), attention_mask.to(weight.device)
    shared = share(input_ids, attention_mask, _PROBE_PROMPTS, num_candidates, _PROBE_ROW_TOKENS, 0,
                   attention=attention)

    padded, gathered = probe_hidden_states(model, transform, input_ids, attention_mask,
                                           lambda hidden_of: through_shared_model(model, transform, shared, hidden_of))
    real = attention_mask.bool()
    dtype = padded.dtype
    padded, gathered = padded[real].float(), gathered[real].float()
    if dtype in _PROBE_RTOL:
        error = float((gathered - padded).abs().max() / padded.abs().max().clamp(min=1e-30))
        bound, measure = _PROBE_RTOL[dtype], "of their largest"
    else:
        error = float((gathered - padded).norm() / padded.norm().clamp(min=1e-30))
        bound, measure = _PROBE_RTOL_HALF, "in norm, relative"
    if not error <= bound:
        raise ValueError(f"{name} with attn_implementation={attention.implementation!r} does not give the padded "
                         f"batch's hidden states in prefix-shared rows (they differ by {error:.2g} {measure}, over "
                         f"{bound:g}); train it without prefix sharing")
