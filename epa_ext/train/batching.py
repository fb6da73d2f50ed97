"""From parsed preference examples to epa-train's batches: rendering and tokenizing (with the
truncation rule), the held-out split and the seeded batch order (optionally grouped by length).
The batches themselves (candidate-major, weak negatives, padded or packed) are the preference
core's (``epa_ext.preference.candidates``); the pure-Python half (files, formats, parsing) is
``data.py``.

    tokenized = tokenize(examples, tokenizer, max_length=512, max_prompt_length=256, report=report)
    split = make_split(tokenized, num_weak=2, seed=0)
"""

from __future__ import annotations

from typing import Any

import torch

from ..preference.candidates import TokenizedExample, keep_prompt_end
from .data import DataError, DropReport, Messages, Part, PreferenceExample

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


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- the held-out split and the batch order ------------------------------------------------------


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


