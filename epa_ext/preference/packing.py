"""Padding-free batches: the sequences of a padded batch packed into rows without padding, the
position ids restarting at 0 at every sequence, so that transformers' attention keeps each
sequence to itself; the decoder's final hidden states are then gathered back into the padded
(candidate-major) layout, where the fused-linear losses score them with the padded batch's own
labels. Only the decoder runs on the packed rows: it is what padding costs (the fused losses
already skip ignored labels), and the padded batch's labels cannot cross a sequence boundary.

    packed = pack(batch.input_ids, batch.attention_mask, max_row_tokens=1024, pad_id=0)
    logps = through_packed_model(model, transform, packed, lambda head: linear_sequence_logps(
        head.hidden, head.weight, batch.labels, **head.as_kwargs()))  # head.hidden [R, T, H] as padded

Which attention implementations keep packed sequences apart (read in transformers 5.25):

- ``sdpa``, ``eager``, ``flex_attention``: ``masking_utils.create_causal_mask`` finds the
  sequences from the restarting position ids (``find_packed_sequence_indices``) when the
  attention mask is None and there is no cache, and masks attention block-diagonally, in rows of
  any number. The mask's cost grows with the square of the row length, hence ``max_row_tokens``.
- ``flash_attention_2`` / ``flash_attention_3``: ``_flash_attention_forward`` takes its varlen
  path from the position ids only for a batch of one row (``_is_packed_sequence``); several rows
  would attend across sequences. They get every sequence in one row (varlen attention computes
  nothing across sequences, so the row needs no bound).
- any other (paged, hub kernels, custom functions): refused.

Position ids: the RoPE types that read the largest position id in the batch (dynamic NTK, Phi-3's
longrope, PhiMoE's) see the padded batch's, T - 1: a row's free tail is numbered below T and holds
T - 1 (``tail_positions``), so packed rows give the padded batch's frequencies; the other RoPE
types (default, linear, yarn, llama3, proportional) depend on each position alone.

Without a cache only: a model called with ``use_cache`` (Llama's config default) creates one, and
``create_causal_mask`` then ignores the restarts; ``causal_lm.through_model`` calls the model with
``use_cache=False``. ``check_packed_attention`` refuses the implementations above and verifies the
rest on the model itself (packed and padded hidden states of a probe laid out like the run's
batches must agree), so a model whose attention ignores the restarts, or that reads more of the
rows' layout than the position ids above (a RoPE type not read here), is refused instead of
silently attending across sequences or computing other frequencies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
from torch import Tensor, nn

from ..causal_lm import HeadInputs, LogitTransform, backbone_and_head, through_model, unwrap
from .options import PACKED_ROW_LENGTHS

T = TypeVar("T")

ROWS_OF_ANY_NUMBER = ("sdpa", "eager", "flex_attention")
ONE_ROW_ONLY = ("flash_attention_2", "flash_attention_3")
PACKED_ATTENTION = ROWS_OF_ANY_NUMBER + ONE_ROW_ONLY
# The probe's bound on |packed - padded| / max|padded|: the same computation laid out differently
# differs by rounding (measured 0 to 1e-7 in fp32), attention leaking into the previous sequence
# by O(1) (measured 0.9 to 2.2 on a random tiny Llama), free tails numbered past the padded batch's
# largest position id by 2.3e-3 (dynamic NTK) and 3.1e-3 (longrope) on tiny models with sequences of
# 96 tokens; half precisions round at ~4e-3.
_PROBE_RTOL = {torch.float32: 1e-3, torch.float64: 1e-3}
_PROBE_RTOL_HALF = 5e-2
# The probe's longest sequence where the run does not bound them (TRL's max_length=None): TRL's default
# max_length.
_UNBOUNDED_PROBE_LENGTH = 1024
_ROUTER_LOSS_REFUSED = ("padding-free batches cannot give an MoE model's router load-balancing loss (it would count "
                        "the packed rows' free tails, which the padded batch's attention mask leaves out); train it "
                        "with padding, or without output_router_logits")


@dataclass
class Packed:
    """R right-padded sequences packed into P rows of S tokens.

    ``index[r, t]`` is the position in the flattened [P * S] rows of token t of sequence r (for
    t < its length; padding positions point at 0: their labels are ignored, and the fused losses
    give them zero gradient). A row's positions after its last sequence (its free tail) hold
    pad_id, attended by nothing real, with the position ids of ``tail_positions``: no position id
    exceeds the padded batch's largest, T - 1, and some position holds it (a batch padded beyond
    its longest sequence whose rows are all full gets one more column for it), so RoPE types that
    read the largest position id see the padded batch's.
    """

    input_ids: Tensor  # [P, S] int64
    position_ids: Tensor  # [P, S] int64: 0, 1, ... restarting at every sequence, all < T
    index: Tensor  # [R, T] int64 into the flattened [P * S] packed positions

    def to(self, device: torch.device) -> Packed:
        return Packed(self.input_ids.to(device), self.position_ids.to(device), self.index.to(device))

    @property
    def num_tokens(self) -> int:
        """Positions the decoder computes: P * S."""
        return self.input_ids.numel()


def row_bound(attn_implementation: str, max_row_tokens: int | None) -> int | None:
    """The bound on a packed row's length for this attention implementation: None (one row) for
    flash attention, which keeps sequences apart only in a batch of one row."""
    return None if attn_implementation in ONE_ROW_ONLY else max_row_tokens


def pack_lengths(lengths: list[int], max_row_tokens: int | None) -> list[list[int]]:
    """The sequences (indices into lengths) of each packed row, in rows of at most max_row_tokens
    (None: one row); a sequence longer than the bound gets a row of its own. Empty sequences are
    left out; deterministic (ties keep index order).

    The rows are padded to the fullest one, so the packing wants few rows of even fill: first fit
    longest first gives the fewest rows the bound allows (P), then the same sequences, longest
    first, each into the least filled of P rows, usually fill them evenly; that packing is taken
    when its fullest row is shorter and within the bound (first fit leaves its last row part
    empty: in HH-RLHF batches of 16 sequences packed into rows of at most 1024 tokens, first fit
    left 19 % of the packed positions as free tails, the even fill 1.5 %; measured with
    bench/bench_real_data.py, which reports the share)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    if max_row_tokens is None:
        return [order] if order else []
    rows: list[list[int]] = []
    fills: list[int] = []
    for i in order:
        fit = next((p for p, fill in enumerate(fills) if fill + lengths[i] <= max_row_tokens), None)
        if fit is None:
            rows.append([])
            fills.append(0)
            fit = len(rows) - 1
        rows[fit].append(i)
        fills[fit] += lengths[i]
    even_rows: list[list[int]] = [[] for _ in rows]
    even_fills = [0] * len(rows)
    for i in order:
        emptiest = min(range(len(rows)), key=lambda p: (even_fills[p], p))
        even_rows[emptiest].append(i)
        even_fills[emptiest] += lengths[i]
    if rows and max(even_fills) < max(fills) and max(even_fills) <= max_row_tokens:
        return even_rows
    return rows


def pack(input_ids: Tensor, attention_mask: Tensor, max_row_tokens: int | None, pad_id: int) -> Packed:
    """The padded batch input_ids / attention_mask [R, T] (right-padded) as packed rows
    (``pack_lengths``) of the longest packed row's length, on input_ids' device (one host
    synchronization, for the lengths).

    Raises:
        ValueError: the attention mask is not right padding (a prefix of ones in every row), or
            max_row_tokens < 1.
    """
    if max_row_tokens is not None and max_row_tokens < 1:
        raise ValueError(f"max_row_tokens must be >= 1 or None; got {max_row_tokens}")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"need input_ids and attention_mask of one shape [R, T]; got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions < lengths[:, None]):
        raise ValueError("padding-free packing needs right-padded rows (the attention mask a prefix of ones in every "
                         "row); this batch is left-padded or has holes")
    lengths_list = lengths.tolist()
    rows = pack_lengths(lengths_list, max_row_tokens)
    fills = [sum(lengths_list[i] for i in row) for row in rows] or [0]
    num_rows, width = len(fills), max(max(fills), 1)
    padded_width = max(mask.shape[1], 1)
    if max(lengths_list, default=0) < padded_width and min(fills) == width:
        width += 1  # no row has a free tail to hold position padded_width - 1: give each a one-token tail
    starts = [0] * len(lengths_list)  # where each sequence starts in the flattened rows
    for p, row in enumerate(rows):
        offset = p * width
        for i in row:
            starts[i] = offset
            offset += lengths_list[i]
    device = input_ids.device
    index = torch.where(mask, torch.tensor(starts, dtype=torch.long, device=device)[:, None] + positions, 0)
    real = index[mask]
    packed_ids = torch.full((num_rows * width,), pad_id, dtype=input_ids.dtype, device=device)
    packed_ids[real] = input_ids[mask]
    position_ids = torch.zeros(num_rows * width, dtype=torch.long, device=device)
    position_ids[real] = positions.expand_as(mask)[mask]
    for p, fill in enumerate(fills):
        position_ids[p * width + fill:(p + 1) * width] = tail_positions(width - fill, padded_width, device)
    return Packed(packed_ids.view(num_rows, width), position_ids.view(num_rows, width), index)


def tail_positions(length: int, padded_width: int, device: torch.device) -> Tensor:
    """The position ids of a packed row's free tail of `length` tokens: counting up, restarting at 0
    after padded_width - 1, and ending at padded_width - 1, the largest position id of the padded
    batch ([R, padded_width] numbered 0 .. padded_width - 1).

    Some RoPE types pick their frequencies from the largest position id in the batch (dynamic NTK
    scales them by it; Phi-3's longrope and PhiMoE switch to their long factors above
    original_max_position_embeddings), so a packed batch gives the padded batch's log-probs only
    with the same largest position id: tails that counted on to the row's end moved every sequence
    to other frequencies. A tail longer than padded_width is several pseudo-sequences, each
    restarting at 0; the first one may continue the row's last sequence's numbering, which only the
    tail's own (unscored) tokens see: attention is causal and the tail comes last."""
    return (torch.arange(length, device=device) - length) % padded_width


def unpack(hidden: Tensor, packed: Packed) -> Tensor:
    """Packed hidden states [P, S, H] -> [R, T, H] in the padded layout (a differentiable gather;
    padding positions hold row 0's first hidden state)."""
    return hidden.reshape(-1, hidden.shape[-1])[packed.index]


def through_packed_model(model: nn.Module, transform: LogitTransform, packed: Packed,
                         consume: Callable[[HeadInputs], T], *, router_logits: bool = False) -> T:
    """``causal_lm.through_model`` on the packed rows (the model's own forward, given input_ids and
    position_ids and no attention mask, without a cache): consume gets the HeadInputs with the
    hidden states gathered back into the padded layout [R, T, H].

    Raises ValueError for router_logits (_ROUTER_LOSS_REFUSED)."""
    if router_logits:
        raise ValueError(_ROUTER_LOSS_REFUSED)
    result, _ = through_model(model, transform, lambda head: consume(replace(head, hidden=unpack(head.hidden, packed))),
                              input_ids=packed.input_ids, position_ids=packed.position_ids)
    return result


def text_config(model: nn.Module):
    """The model's (text) config."""
    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attn_implementation(model: nn.Module) -> str:
    """The attention implementation the model's (text) config names."""
    return str(getattr(text_config(model), "_attn_implementation", None)
               or getattr(unwrap(model).config, "_attn_implementation", ""))


@contextmanager
def rope_state_kept(model: nn.Module) -> Iterator[None]:
    """Puts back, on exit, what the model's rotary embeddings remember of the batches they saw:
    dynamic NTK keeps the frequencies of the longest batch (``max_seq_len_cached``, a new
    ``inv_freq``) until one fits the original context, so a probe as long as the run's longest
    sequence would give the first training batches other frequencies than a run without it."""
    kept = [(module, {name: value for name, value in vars(module).items() if not isinstance(value, dict)},
             dict(module._buffers)) for module in unwrap(model).modules() if hasattr(module, "max_seq_len_cached")]
    try:
        yield
    finally:
        for module, attributes, buffers in kept:
            module.__dict__.update(attributes)
            module._buffers.clear()
            module._buffers.update(buffers)


@torch.no_grad()
def probe_hidden_states(model: nn.Module, transform: LogitTransform, input_ids: Tensor, attention_mask: Tensor,
                        through_rows: Callable[[Callable[[HeadInputs], Tensor]], Tensor]) -> tuple[Tensor, Tensor]:
    """A layout probe's final hidden states [R, T, H] of the padded batch input_ids /
    attention_mask and of the same batch laid out otherwise (through_rows(consume) runs the model
    on the other layout and gathers back), the model in eval mode (no dropout) and its rotary
    state put back afterwards (``rope_state_kept``): (padded, laid out)."""
    def hidden_of(head: HeadInputs) -> Tensor:
        return head.hidden

    was_training = model.training
    model.eval()
    try:
        with rope_state_kept(model):
            padded, _ = through_model(model, transform, hidden_of, input_ids=input_ids, attention_mask=attention_mask)
            return padded, through_rows(hidden_of)
    finally:
        model.train(was_training)


@torch.no_grad()
def check_packed_attention(model: nn.Module, transform: LogitTransform, *, max_length: int | None,
                           max_row_tokens: int | None, router_logits: bool = False) -> None:
    """Raises ValueError (one line) unless packed rows of this model give the padded batch's
    hidden states: its attention implementation must be one of PACKED_ATTENTION, it must not be
    asked for a router loss (``through_packed_model``), and a probe through ``through_packed_model``
    must agree with ``causal_lm.through_model`` of the padded batch. The model is run in eval mode
    (no dropout) and left as it was.

    The probe is laid out as the run's batches are (max_length: the longest sequence the run packs,
    None where it sets no bound: _UNBOUNDED_PROBE_LENGTH, at most the model's
    max_position_embeddings; max_row_tokens: its bound on a packed row, None for the trainers'
    default, PACKED_ROW_LENGTHS x the longest sequence): four sequences of the longest
    length that half a row holds (at most max_length) and one of a single token, packed two to a
    row (with flash attention, all in one row), so the third row's free tail is nearly a row long
    and the sequences reach the positions the run's do. A packing or a model that lets the tails'
    positions or lengths change what real tokens see (RoPE types that read the batch's largest
    position id) is refused here instead of training on other log-probs than the padded batch's."""
    implementation = attn_implementation(model)
    name = type(unwrap(model)).__name__
    if implementation not in PACKED_ATTENTION:
        raise ValueError(f"{name} uses attn_implementation={implementation!r}, which does not keep packed sequences "
                         f"apart in transformers 5.x; padding-free batches need one of {', '.join(PACKED_ATTENTION)} "
                         f"(load the model with attn_implementation='sdpa'), or train with padding")
    if router_logits:
        raise ValueError(_ROUTER_LOSS_REFUSED)
    weight = backbone_and_head(model)[1].weight
    if max_length is None:
        positions = getattr(text_config(model), "max_position_embeddings", None) or _UNBOUNDED_PROBE_LENGTH
        max_length = min(_UNBOUNDED_PROBE_LENGTH, positions)
    longest = max(1, min(max_length, (max_row_tokens or PACKED_ROW_LENGTHS * max_length) // 2))
    lengths = [longest] * 4 + [1]  # first fit: [longest, longest] twice and [1], which the even fill keeps
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, weight.shape[0], (len(lengths), longest), generator=generator).to(weight.device)
    attention_mask = (torch.arange(longest) < torch.tensor(lengths)[:, None]).long().to(weight.device)
    rows = pack(input_ids, attention_mask, row_bound(implementation, 2 * longest), pad_id=0)
    padded, packed = probe_hidden_states(model, transform, input_ids, attention_mask,
                                         lambda hidden_of: through_packed_model(model, transform, rows, hidden_of))
    real = attention_mask.bool()
    scale = padded[real].abs().max().clamp(min=1e-30)
    error = ((packed[real] - padded[real]).abs().max() / scale).item()
    if not error <= _PROBE_RTOL.get(padded.dtype, _PROBE_RTOL_HALF):
        raise ValueError(f"{name} with attn_implementation={implementation!r} does not keep packed sequences apart "
                         f"(the hidden states of packed rows differ from the padded batch's by {error:.2g} of their "
                         f"largest); train it with padding")
