"""From parsed preference examples to training batches: rendering and tokenizing (with the
truncation rule), the held-out split, weak negatives, the seeded batch order (optionally grouped
by length), and collation into the candidate-major layout of epa_ext's EPA losses (optionally
packed without padding as well, ``packing.py``).

    tokenized = tokenize(examples, tokenizer, max_length=512, max_prompt_length=256, report=report)
    weak = weak_negative_sources(len(tokenized), num_weak=2, seed=0)
    batch = collate(tokenized[:8], list(range(8)), num_strong=1, num_weak=2, weak_sources=weak,
                    all_examples=tokenized, pad_id=tokenizer.pad_token_id)

Candidate 0 of a prompt is its chosen answer, candidates 1..K its strong negatives (rejected
answers to the same prompt) and K+1..K+M its weak negatives (answers to other prompts, scored
under this one). The pure-Python half (files, formats, parsing) is ``data.py``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from ..logps import IGNORE_INDEX
from .data import DataError, DropReport, Messages, Part, PreferenceExample
from .packing import Packed, pack

# --- rendering and tokenizing --------------------------------------------------------------------


def render(part: Part, tokenizer: Any, *, is_prompt: bool, prompt: Messages | None = None) -> str:
    """Text of a prompt or an answer.

    Plain strings pass through. Message lists are rendered with
    ``tokenizer.apply_chat_template`` when the tokenizer (which may be None) has a chat template,
    else as "role: content" lines joined by newlines. A prompt ends where the assistant's answer
    starts (template: ``add_generation_prompt=True``; plain: a final "assistant:" line start). An
    answer is the text the whole conversation (prompt + answer) renders to, minus the rendered
    prompt, so that prompt text + answer text is exactly the rendered conversation.

    Args:
        part: the prompt, or an answer of the kind of its prompt.
        tokenizer: a transformers tokenizer, or None for the plain rendering.
        is_prompt: whether part is the prompt.
        prompt: for an answer message list, the prompt messages it follows (some templates render
            an answer differently depending on the conversation before it); None renders the answer
            after an empty conversation.

    Raises:
        DataError: the chat template does not render the prompt as a prefix of the conversation.
    """
    if isinstance(part, str):
        return part
    history = part if is_prompt else (prompt or [])
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        if is_prompt:
            return prompt_text
        full = tokenizer.apply_chat_template(history + part, tokenize=False)
    else:
        prompt_text = "".join(f"{m['role']}: {m['content']}\n" for m in history) + "assistant:"
        if is_prompt:
            return prompt_text
        full = "\n".join(f"{m['role']}: {m['content']}" for m in history + part)
    if not full.startswith(prompt_text):
        raise DataError(f"the chat template does not render the prompt {prompt_text!r:.200} as the start of the "
                         f"conversation {full!r:.200}")
    return full[len(prompt_text):]


@dataclass
class TokenizedExample:
    """Token ids of one example: ``answer_ids[0]`` is the chosen answer, then the strong negatives.
    Each answer ends with the EOS id (when the tokenizer has one) unless truncation cut it."""

    prompt_ids: list[int]
    answer_ids: list[list[int]]


def tokenize(examples: list[PreferenceExample], tokenizer: Any, *, max_length: int, max_prompt_length: int,
             report: DropReport, source: str = "data") -> list[TokenizedExample]:
    """Token ids of the examples, truncated to fit max_length.

    Prompt and answers are rendered (``render``) and tokenized separately with
    ``tokenizer(text, add_special_tokens=False)["input_ids"]``. The prompt gets the BOS id in front
    (``tokenizer.bos_token_id``, when not None and the rendered prompt does not start with it
    already, as chat templates often write it); each answer gets the EOS id at the end
    (``tokenizer.eos_token_id``, when not None and the answer does not end with it already).

    Truncation rule:

    1. The prompt keeps its LAST max_prompt_length tokens (the end of a prompt, next to the answer,
       matters most); the BOS stays in front and counts towards max_prompt_length.
    2. Each answer is then cut from the right so that prompt + answer <= max_length tokens (a cut
       answer loses its EOS).
    3. An example with an answer that ends up empty (every one of its tokens truncated away) is
       dropped and counted in report as "answer truncated to nothing", with a message naming its
       row (``PreferenceExample.row``) as bad rows are named; this happens when the prompt takes
       all of max_length (possible only with max_prompt_length == max_length), or for an answer
       that tokenizes to nothing with a tokenizer without EOS. Kept examples that were cut
       anywhere are counted as "truncated".

    Args:
        examples: from ``parse_rows``.
        tokenizer: a transformers tokenizer.
        max_length: most tokens of prompt + one answer, >= 1.
        max_prompt_length: most tokens of a prompt, in [1, max_length].
        report: where drops and truncations are counted.
        source: the name messages give the data (a file name).

    Returns:
        The kept examples, in order.
    """
    if max_length < 1 or not 1 <= max_prompt_length <= max_length:
        raise ValueError(f"need 1 <= max_prompt_length <= max_length; got max_prompt_length={max_prompt_length}, "
                         f"max_length={max_length}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenized: list[TokenizedExample] = []
    for index, example in enumerate(examples):
        prompt_ids = _ids(tokenizer, render(example.prompt, tokenizer, is_prompt=True))
        if bos is not None and prompt_ids[:1] != [bos]:
            prompt_ids.insert(0, bos)
        truncated = len(prompt_ids) > max_prompt_length
        if truncated:
            prompt_ids = keep_prompt_end(prompt_ids, max_prompt_length, bos is not None)
        budget = max_length - len(prompt_ids)
        answers: list[list[int]] = []
        history = example.prompt if isinstance(example.prompt, list) else None
        for answer in (example.chosen, *example.rejected):
            ids = _ids(tokenizer, render(answer, tokenizer, is_prompt=False, prompt=history))
            if eos is not None and ids[-1:] != [eos]:
                ids.append(eos)
            if len(ids) > budget:
                ids, truncated = ids[:budget], True
            answers.append(ids)
        if not all(answers):
            where = f"row {example.row}" if example.row is not None else f"example {index}"
            report.add("answer truncated to nothing",
                       f"{source}: {where}: an answer has no token left after a prompt of {len(prompt_ids)} "
                       f"tokens within max_length={max_length}")
            continue
        if truncated:
            report.add("truncated")
        tokenized.append(TokenizedExample(prompt_ids, answers))
    return tokenized


def keep_prompt_end(prompt_ids: list[int], limit: int, has_bos: bool) -> list[int]:
    """The prompt cut to its last tokens within limit (>= 1) tokens, the BOS (when the tokenizer
    has one, in front) kept first: the end of a prompt, next to the answer, matters most."""
    if len(prompt_ids) <= limit:
        return prompt_ids
    head = prompt_ids[:1] if has_bos else []
    return head + prompt_ids[len(prompt_ids) - (limit - len(head)):]


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- weak negatives and batches ------------------------------------------------------------------


WEAK_SOURCES = ("any", "rejected")


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
    packed: Packed | None = None  # the rows packed without padding (padding-free batches), or None


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
    num_candidates = 1 + num_strong + num_weak
    candidate_mask = torch.ones(batch_size, num_candidates, dtype=torch.bool)
    # (prompt, answer) of row c * B + b
    rows: list[tuple[list[int], list[int]]] = [([], [])] * (num_candidates * batch_size)
    for b, (example, example_id) in enumerate(zip(examples, example_ids)):
        chosen, strong = example.answer_ids[0], example.answer_ids[1:1 + num_strong]
        candidate_mask[b, 1 + len(strong):1 + num_strong] = False
        answers = [chosen, *strong, *[chosen] * (num_strong - len(strong))]
        if num_weak > 0:
            sources = weak_sources[example_id]
            if len(sources) < num_weak:
                raise ValueError(f"weak_sources[{example_id}] has {len(sources)} pairs; num_weak={num_weak}")
            for j, k in sources[:num_weak]:
                if j == example_id:
                    raise ValueError(f"weak_sources[{example_id}] borrows from example {example_id} itself")
                answers.append(fit_borrowed_answer(all_examples[j].answer_ids[k], example, example_id,
                                                   max_length))
        for c, answer in enumerate(answers):
            rows[c * batch_size + b] = (example.prompt_ids, answer)

    input_ids, attention_mask, labels = pad_rows(rows, pad_id)
    return Batch(input_ids, attention_mask, labels, candidate_mask, num_candidates, num_strong, list(example_ids))


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


# --- the held-out split and the batch order ------------------------------------------------------


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


def hold_out(examples: list[TokenizedExample], fraction: float, seed: int) -> tuple[list[TokenizedExample],
                                                                                  list[TokenizedExample]]:
    """(training, held-out) examples: a seeded share fraction held out (at least one example when
    fraction > 0, never all of them), both in their original order."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    num_eval = min(max(round(len(examples) * fraction), 1 if fraction > 0 else 0), len(examples) - 1)
    held, kept = sorted(order[:num_eval]), sorted(order[num_eval:])
    return [examples[i] for i in kept], [examples[i] for i in held]


def micro_batch_ids(num_examples: int, global_batch: int, seed: int, micro_index: int) -> list[int]:
    """The examples of the micro_index-th global micro-batch (``BatchOrder`` without grouping)."""
    return BatchOrder(num_examples, global_batch, seed)(micro_index)


# Global batches per mega-batch of --group-by-length: transformers' LengthGroupedSampler's 50.
MEGA_BATCH_BATCHES = 50


class BatchOrder:
    """The examples of each global micro-batch of a run, a pure function of (seed, micro_index,
    lengths), so that a resumed run sees the same batches.

    Each epoch draws a fresh permutation (seeded with seed + epoch) and drops the incomplete last
    batch. Without lengths, the batches are consecutive slices of it. With lengths
    (--group-by-length: each example's longest row, ``longest_rows``), the permutation's kept
    examples are cut into mega-batches of MEGA_BATCH_BATCHES global batches, each sorted by length
    (longest first; ties keep the permutation's order) and cut into global batches; these are then
    shuffled (so that the length does not trend over a run), except that the batch holding the
    epoch's longest example comes first (a run that does not fit in memory fails at once, as with
    transformers' sampler). Every example of an epoch's kept share appears once, so the ranks'
    slices of a global batch stay disjoint.
    """

    def __init__(self, num_examples: int, global_batch: int, seed: int, lengths: list[int] | None = None):
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"need one length per example; got {len(lengths)} for {num_examples}")
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self.per_epoch = num_examples // global_batch
        self.lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.long)
        self._epoch, self._batches = -1, torch.empty(0, global_batch, dtype=torch.long)

    def __call__(self, micro_index: int) -> list[int]:
        epoch, within = divmod(micro_index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[within].tolist()

    def _epoch_batches(self, epoch: int) -> torch.Tensor:
        """[per_epoch, global_batch] example indices of the epoch's batches, in order."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        kept = torch.randperm(self.num_examples, generator=generator)[:self.per_epoch * self.global_batch]
        if self.lengths is None:
            return kept.view(self.per_epoch, self.global_batch)
        mega = self.global_batch * MEGA_BATCH_BATCHES
        grouped = []
        for start in range(0, len(kept), mega):
            chunk = kept[start:start + mega]
            grouped.append(chunk[torch.sort(self.lengths[chunk], descending=True, stable=True).indices])
        batches = torch.cat(grouped).view(self.per_epoch, self.global_batch)
        order = torch.randperm(self.per_epoch, generator=generator)
        longest = int(self.lengths[batches[:, 0]].argmax())  # a sorted batch's longest example is its first
        order = torch.cat([order.new_tensor([longest]), order[order != longest]])
        return batches[order]


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
    into rows of at most max_row_tokens tokens (None: one row)."""

    num_strong: int
    num_weak: int
    pad_id: int
    max_length: int
    padding_free: bool = False
    max_row_tokens: int | None = None

    @property
    def num_candidates(self) -> int:
        return 1 + self.num_strong + self.num_weak


def make_batch(split: Split, ids: list[int], layout: Layout, device: torch.device) -> Batch:
    """``collate`` of split.examples[ids] in layout (without weak negatives for a split that has
    no weak pairing: one example), packed as well when layout.padding_free; its tensors on device."""
    batch = collate([split.examples[i] for i in ids], ids, num_strong=layout.num_strong,
                    num_weak=layout.num_weak if split.weak_sources else 0, weak_sources=split.weak_sources,
                    all_examples=split.examples, pad_id=layout.pad_id, max_length=layout.max_length)
    if layout.padding_free:
        batch.packed = pack(batch.input_ids, batch.attention_mask, layout.max_row_tokens, layout.pad_id).to(device)
    for name in ("input_ids", "attention_mask", "labels", "candidate_mask"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch
