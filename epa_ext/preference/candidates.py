"""Candidate-major batches, the layout of every preference batch: for B prompts and C = 1 + K + M
candidates each, row ``c * B + b`` holds prompt b followed by candidate c: c = 0 its chosen answer,
1..K its strong negatives (rejected answers to the same prompt), K+1..K+M its weak negatives
(answers to other prompts, scored under this one). Where weak answers come from is a parameter:
``weak_negative_sources`` pairs each example with answers of other examples of a dataset (epa-train)
or of the batch's other rows (EPATrainer); ``candidate_answers`` puts the answers in candidate-major
order for either, and ``collate`` / ``make_batch`` pad them (and pack them, ``packing.py``).

    weak = weak_negative_sources(len(examples), num_weak=2, seed=0)
    batch = collate(examples[:8], list(range(8)), num_strong=1, num_weak=2, weak_sources=weak,
                    all_examples=examples, pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TypeVar

import torch

from .._kernel_contract import IGNORE_INDEX
from .options import WEAK_SOURCES
from .packing import Packed, pack
from .prefix import Shared, SharedAttention, share, shared_token_ratio

A = TypeVar("A")


class DataError(ValueError):
    """Unusable data; the message names the source, the row (or line) number and the field."""


@dataclass
class TokenizedExample:
    """Token ids of one example: ``answer_ids[0]`` is the chosen answer, then the strong negatives.
    Each answer ends with the EOS id (when the tokenizer has one) unless truncation cut it."""

    prompt_ids: list[int]
    answer_ids: list[list[int]]


def keep_prompt_end(prompt_ids: list[int], limit: int, has_bos: bool) -> list[int]:
    """The prompt cut to its last tokens within limit (>= 1) tokens, the BOS (when the tokenizer
    has one, in front) kept first: the end of a prompt, next to the answer, matters most."""
    if len(prompt_ids) <= limit:
        return prompt_ids
    head = prompt_ids[:1] if has_bos else []
    return head + prompt_ids[len(prompt_ids) - (limit - len(head)):]


def weak_negative_sources(num_examples: int, num_weak: int, seed: int,
                          source: str = "any") -> list[list[tuple[int, int]]]:
    """For each example i, num_weak pairs (j, k): answer k of example j != i (k = 0 its chosen
    answer, k = 1 its first rejected one; every example has those two), to be scored under the
    prompt of example i as a weak negative.

    source "any": k is drawn, chosen or first rejected with equal chance. source "rejected": k = 1
    always, so a weak negative is always some example's rejected answer (with data whose rejected
    answers are reference samples drawn independently of the choice, the weak answers' law is
    then exactly the reference's mixture over prompts). The j are the same for either source.

    Example i's pairs depend only on (seed, i, num_examples, num_weak, source), not on batch
    order, so reference log-probs computed for them can be cached. The j are distinct when
    num_weak <= num_examples - 1, and drawn with repetition otherwise.

    Returns:
        [num_examples][num_weak] pairs (j, k).

    Raises:
        DataError: num_examples == 1 and num_weak > 0 (no other example to borrow from).
        ValueError: num_examples or num_weak < 0, or an unknown source.
    """
    if num_examples < 0 or num_weak < 0:
        raise ValueError(f"num_examples and num_weak must be >= 0; got {num_examples} and {num_weak}")
    if source not in WEAK_SOURCES:
        raise ValueError(f"weak_source must be one of {WEAK_SOURCES}; got {source!r}")
    if num_examples == 1 and num_weak > 0:
        raise DataError(f"weak negatives need at least 2 examples to borrow answers from; got 1 (num_weak={num_weak})")
    sources = []
    for i in range(num_examples):
        rng = random.Random(seed * 1_000_003 + i)
        others = num_examples - 1
        picks = rng.sample(range(others), num_weak) if num_weak <= others else rng.choices(range(others), k=num_weak)
        # Index among the other examples -> example index, skipping i itself.
        sources.append([(j + (j >= i), rng.randrange(2) if source == "any" else 1) for j in picks])
    return sources


@dataclass
class Batch:
    """Candidate-major batch of B prompts with C = 1 + K + M candidates each.

    Row ``c * B + b`` holds candidate c of prompt b: c = 0 the chosen answer, 1..K the strong
    negatives, K+1..K+M the weak negatives, each as prompt + answer tokens, right-padded.
    """

    input_ids: torch.Tensor  # [C*B, T] int64, padded with pad_id
    attention_mask: torch.Tensor  # [C*B, T] int64: 1 on real tokens
    labels: torch.Tensor  # [C*B, T] int64: input_ids[r, t+1] where t+1 is an answer token, else IGNORE_INDEX
    candidate_mask: torch.Tensor  # [B, C] bool: False for padding candidates
    num_candidates: int  # C = 1 + K + M
    num_strong: int  # K
    example_ids: list[int]  # the B example indices
    # the rows the decoder runs on instead of the padded ones: packed without padding (padding-free
    # batches) or prefix-shared (prefix.Shared), or None
    packed: Packed | Shared | None = None


def collate(examples: list[TokenizedExample], example_ids: list[int], *, num_strong: int, num_weak: int,
            weak_sources: list[list[tuple[int, int]]] | None, all_examples: list[TokenizedExample], pad_id: int,
            max_length: int | None = None) -> Batch:
    """A candidate-major Batch of B = len(examples) prompts.

    Candidates of prompt b: [chosen, rejected_1..rejected_K, weak_1..weak_M]. A prompt with fewer
    than K strong negatives gets padding candidates (copies of its chosen answer, False in
    candidate_mask); one with more uses its first K (the best-scored ones for scored data). Weak
    candidate m of prompt b is prompt_ids(b) + answer_ids[k] of all_examples[j] for
    (j, k) = weak_sources[example_ids[b]][m].

    Labels follow epa_ext.completion_labels (the logits at t predict token t + 1):
    labels[r, t] = input_ids[r, t + 1] where t + 1 is an answer token, IGNORE_INDEX elsewhere (prompt,
    padding, last column).

    Args:
        examples: the B tokenized examples of the batch.
        example_ids: their indices in all_examples (the keys of weak_sources).
        num_strong: K >= 0.
        num_weak: M >= 0; needs weak_sources when > 0.
        weak_sources: from ``weak_negative_sources`` over all_examples.
        all_examples: the examples weak answers are borrowed from.
        pad_id: the id right-padding fills input_ids with.
        max_length: when given, weak answers are cut from the right so that prompt + answer <=
            max_length, as ``tokenize`` does for the example's own answers (a borrowed answer was
            cut against its own prompt only, so it may run past max_length under another one).

    Raises:
        ValueError: inconsistent arguments, a weak source borrowing from the example itself, or a
            prompt leaving no room for a weak answer within max_length.
    """
    batch_size = len(examples)
    if batch_size == 0 or len(example_ids) != batch_size:
        raise ValueError(f"need one example id per example and at least one example; got {batch_size} examples "
                         f"and {len(example_ids)} ids")
    if num_strong < 0 or num_weak < 0:
        raise ValueError(f"num_strong and num_weak must be >= 0; got {num_strong} and {num_weak}")
    if num_weak > 0 and weak_sources is None:
        raise ValueError("num_weak > 0 needs weak_sources")
    prompts, answers, weak = [], [], []
    for example, example_id in zip(examples, example_ids):
        prompts.append(example.prompt_ids)
        answers.append(example.answer_ids)
        if num_weak > 0:
            sources = weak_sources[example_id]
            if len(sources) < num_weak:
                raise ValueError(f"weak_sources[{example_id}] has {len(sources)} pairs; num_weak={num_weak}")
            if any(j == example_id for j, _ in sources[:num_weak]):
                raise ValueError(f"weak_sources[{example_id}] borrows from example {example_id} itself")
            weak.append([fit_borrowed_answer(borrowed_answer(all_examples[j].answer_ids, k), example, example_id,
                                             max_length) for j, k in sources[:num_weak]])
        else:
            weak.append([])
    candidates, candidate_mask = candidate_answers(answers, weak, num_strong, absent="chosen")
    rows = [(prompts[r % batch_size], answer) for r, answer in enumerate(candidates)]
    input_ids, attention_mask, labels = pad_rows(rows, pad_id)
    return Batch(input_ids, attention_mask, labels, candidate_mask, candidate_mask.shape[1], num_strong,
                 list(example_ids))


def borrowed_answer(answers: list[A], k: int) -> A:
    """Answer k of an example whose answers are [chosen, rejected...] (k = 0 its chosen answer,
    1 its first rejected one; the chosen one for an example without rejected answers): what
    ``weak_negative_sources``' pair (j, k) borrows from example j."""
    return answers[k] if k < len(answers) else answers[0]


def candidate_answers(answers: list[list[A]], weak: list[list[A]], num_strong: int,
                      absent: str = "chosen") -> tuple[list[A | None], torch.Tensor]:
    """The candidates of B prompts in candidate-major order, and which of them are real.

    answers[b]: prompt b's chosen answer then its rejected ones (the first num_strong = K are its
    strong negatives); weak[b]: its M weak answers (the same M for every b). Entry ``c * B + b``
    of the list is candidate c of prompt b: 0 the chosen answer, 1..K the strong negatives,
    K+1..K+M the weak ones. A prompt with fewer than K rejected answers gets padding candidates,
    False in candidate_mask [B, C] (C = 1 + K + M): its chosen answer (absent="chosen", so that
    every row has answer tokens) or None (absent="none": the caller scores the bare prompt).
    """
    if absent not in ("chosen", "none"):
        raise ValueError(f"absent must be 'chosen' or 'none'; got {absent!r}")
    batch_size = len(answers)
    num_weak = len(weak[0]) if weak else 0
    if len(weak) != batch_size or any(len(w) != num_weak for w in weak):
        raise ValueError(f"weak needs the same number of weak answers for each of the {batch_size} prompts")
    num_candidates = 1 + num_strong + num_weak
    candidate_mask = torch.ones(batch_size, num_candidates, dtype=torch.bool)
    candidates: list[A | None] = [None] * (num_candidates * batch_size)
    for b, (own, borrowed) in enumerate(zip(answers, weak)):
        strong = own[1:1 + num_strong]
        candidate_mask[b, 1 + len(strong):1 + num_strong] = False
        padding = own[0] if absent == "chosen" else None
        for c, answer in enumerate([own[0], *strong, *[padding] * (num_strong - len(strong)), *borrowed]):
            candidates[c * batch_size + b] = answer
    return candidates, candidate_mask


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) [R, T] of (prompt, answer) token rows, right-padded;
    labels as ``collate`` documents them (the answer's tokens, one position early)."""
    length = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        sequence = torch.tensor(prompt + answer, dtype=torch.long)
        end = len(sequence)
        input_ids[r, :end] = sequence
        attention_mask[r, :end] = 1
        # Answer tokens sit at [len(prompt), end); the logits one position earlier predict them. An
        # answer with no prompt before it cannot have its first token predicted.
        start = max(len(prompt) - 1, 0)
        labels[r, start:end - 1] = sequence[start + 1:end]
    return input_ids, attention_mask, labels


def fit_borrowed_answer(answer: list[int], example: TokenizedExample, example_id: int,
                        max_length: int | None) -> list[int]:
    """A borrowed answer cut from the right to fit under example's prompt within max_length."""
    if max_length is None:
        return answer
    room = max_length - len(example.prompt_ids)
    if room < 1:
        raise ValueError(f"example {example_id}'s prompt has {len(example.prompt_ids)} tokens, leaving no room for "
                         f"an answer within max_length={max_length}")
    return answer[:room]


@dataclass
class Split:
    """The examples of one split, with the weak-negative pairing drawn within it (None without
    weak negatives)."""

    examples: list[TokenizedExample]
    weak_sources: list[list[tuple[int, int]]] | None


def make_split(examples: list[TokenizedExample], num_weak: int, seed: int, weak_source: str = "any") -> Split:
    """A Split whose weak negatives are borrowed within examples only (none for one example), from
    weak_source (``weak_negative_sources``)."""
    weak = num_weak if len(examples) > 1 else 0
    return Split(examples, weak_negative_sources(len(examples), weak, seed, weak_source) if weak else None)


def longest_rows(split: Split, layout: Layout) -> list[int]:
    """Per example of split, the longest row it brings to a batch (prompt + the longest of its
    chosen answer, K strong and M weak answers, weak ones cut to max_length as ``collate`` cuts
    them): what its batch is padded to, the length --group-by-length groups by."""
    lengths = []
    for i, example in enumerate(split.examples):
        answers = [len(a) for a in example.answer_ids[:1 + layout.num_strong]]
        if split.weak_sources:
            room = layout.max_length - len(example.prompt_ids)
            answers += [min(len(split.examples[j].answer_ids[k]), room)
                        for j, k in split.weak_sources[i][:layout.num_weak]]
        lengths.append(len(example.prompt_ids) + max(answers))
    return lengths


@dataclass(frozen=True)
class Layout:
    """How every batch of a run is laid out: K strong and M weak negatives per prompt, the pad id
    and the longest prompt + answer; with padding_free, the rows are also packed (``packing.pack``)
    into rows of at most max_row_tokens tokens (None: one row); with shared_attention (the model's,
    ``prefix.shared_attention``), each prompt and its candidates are laid out prefix-shared
    instead (``prefix.share``: the prompt once, its answers after it), groups packed into rows of at
    most max_row_tokens tokens."""

    num_strong: int
    num_weak: int
    pad_id: int
    max_length: int
    padding_free: bool = False
    max_row_tokens: int | None = None
    shared_attention: SharedAttention | None = None
    min_shared_ratio: float = 0.0  # share a batch only where prefix.shared_token_ratio reaches it

    @property
    def num_candidates(self) -> int:
        return 1 + self.num_strong + self.num_weak


def make_batch(split: Split, ids: list[int], layout: Layout, device: torch.device) -> Batch:
    """``collate`` of split.examples[ids] in layout (without weak negatives for a split that has
    no weak pairing: one example), prefix-shared or packed as well as the layout says; its tensors
    on device."""
    batch = collate([split.examples[i] for i in ids], ids, num_strong=layout.num_strong,
                    num_weak=layout.num_weak if split.weak_sources else 0, weak_sources=split.weak_sources,
                    all_examples=split.examples, pad_id=layout.pad_id, max_length=layout.max_length)
    prompt_lengths = [len(split.examples[i].prompt_ids) for i in ids]
    if layout.shared_attention is not None and \
            shared_token_ratio(batch.attention_mask, prompt_lengths, batch.num_candidates) >= layout.min_shared_ratio:
        batch.packed = share(batch.input_ids, batch.attention_mask, prompt_lengths, batch.num_candidates,
                             layout.max_row_tokens, layout.pad_id, attention=layout.shared_attention).to(device)
    elif layout.padding_free:
        batch.packed = pack(batch.input_ids, batch.attention_mask, layout.max_row_tokens, layout.pad_id).to(device)
    for name in ("input_ids", "attention_mask", "labels", "candidate_mask"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch
