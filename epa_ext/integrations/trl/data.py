"""EPATrainer's data: rows whose ``rejected`` holds several answers, tokenized as TRL 1.16
tokenizes one, and the collator of candidate-major batches (the preference core's layout,
``epa_ext.preference.candidates``) from TRL's tokenized rows."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from torch import Tensor
from trl.data_utils import _tokenize, common_prefix_length, extract_prompt, is_conversational
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import global_then_local_main_first, pad

from ...preference.candidates import borrowed_answer, candidate_answers, weak_negative_sources
from ...preference.options import check_weak_batch
from ...preference.weak_correction import other_prompts

# Keys of a collated batch that are not model inputs.
NON_MODEL_KEYS = frozenset({"completion_mask", "candidate_mask", "ref_chosen_logps", "ref_rejected_logps",
                            "weak_prompts_input_ids", "weak_prompts_attention_mask", "weak_prompts_completion_mask",
                            "weak_source_index"})


def model_inputs(inputs: dict) -> dict:
    """The model's keyword arguments of a collated batch."""
    return {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS}


def has_answer_lists(example: dict) -> bool:
    """True when ``rejected`` holds several answers (a list of strings or of message lists)."""
    rejected = example["rejected"]
    return isinstance(rejected, list) and (not rejected or isinstance(rejected[0], (str, list)))


def named_datasets(train_dataset, eval_dataset):
    """(name, dataset) of the training set and each evaluation set, as messages name them."""
    if train_dataset is not None:
        yield "train_dataset", train_dataset
    if isinstance(eval_dataset, dict):
        yield from ((f"eval_dataset[{key!r}]", dataset) for key, dataset in eval_dataset.items())
    elif eval_dataset is not None:
        yield "eval_dataset", eval_dataset


def prepare_answer_lists(dataset, processing_class, args, dataset_name: str, eos: str):
    """TRL 1.16's ``_prepare_dataset`` (implicit prompt, EOS, tokenization, dropping rows whose
    prompt fills max_length) for rows with a list of rejected answers: every answer tokenized
    against the same prompt; rows end with prompt_ids, chosen_ids and rejected_ids (a list of
    token lists)."""
    map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}

    def prepare(example):
        chosen, rejected = example["chosen"], example["rejected"]
        if "prompt" in example:
            prompt = example["prompt"]
        else:
            if not rejected:
                raise ValueError(f"{dataset_name} has a row with an implicit prompt and no rejected answer: the "
                                 "prompt is what chosen and rejected share, so it cannot be found")
            shared = min(len(extract_prompt({"chosen": chosen, "rejected": r})["prompt"]) for r in rejected)
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], [r[shared:] for r in rejected]
        conversational = is_conversational({"prompt": prompt}) if prompt else is_conversational({"chosen": chosen})
        answers = [chosen, *rejected]
        tools = example.get("tools")
        template_kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})} if conversational else {}
        if conversational:
            prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **template_kwargs)
            full = [_tokenize(processing_class, prompt + a, **template_kwargs)["input_ids"] for a in answers]
        else:
            answers = [a if a.endswith(eos) else a + eos for a in answers]
            prompt_ids = _tokenize(processing_class, prompt)
            full = [_tokenize(processing_class, prompt + a)["input_ids"] for a in answers]
        prompt_ids = prompt_ids["input_ids"]
        prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full)
        return {"prompt_ids": prompt_ids[:prompt_len], "chosen_ids": full[0][prompt_len:],
                "rejected_ids": [ids[prompt_len:] for ids in full[1:]]}

    with global_then_local_main_first():
        dataset = dataset.map(prepare, **map_kwargs)
        if args.max_length is not None and args.truncation_mode == "keep_start":
            dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length, **map_kwargs)
    return dataset


@dataclass
class EPADataCollator(DataCollatorForPreference):
    """Candidate-major batches for EPA from rows with ``prompt_ids``, ``chosen_ids`` and
    ``rejected_ids`` (a list of token lists).

    For B rows and C = 1 + K + M candidates, row ``c * B + b`` of ``input_ids`` [C*B, T] is
    prompt b followed by candidate c (``epa_ext.preference.candidates.candidate_answers``): c = 0
    the chosen answer, 1..K the rejected answers (absent ones are the bare prompt, False in
    ``candidate_mask``), K+1..K+M weak negatives: the chosen (k = 0) or first rejected (k = 1; the
    chosen one if the row has none) answer of row j != b of this batch, for
    ``(j, k) = weak_negative_sources(B, M, seed, weak_source)[b]``. Each sequence is truncated and
    padded as TRL's DataCollatorForPreference does. Returns input_ids, attention_mask,
    completion_mask [C*B, T], candidate_mask [B, C] and, when the rows carry precomputed reference
    log-probs, ref_chosen_logps [B] and ref_rejected_logps [B, K] (0 for absent answers).

    With weak_correction_prompts = S > 0 (weak_correction="importance"), also the sequences that
    score each weak answer under S - 1 other prompts of the batch (rows other than its own, drawn
    from the seed and the row positions): weak_prompts_{input_ids,attention_mask,completion_mask}
    [B*M*(S-1), T'] in (b, m, s) order, and weak_source_index [B, M]: where the weak answer's
    own sequence (row j's chosen or first rejected answer) is in the candidate-major rows.
    """

    num_strong: int = 1
    num_weak: int = 0
    seed: int = 0
    weak_correction_prompts: int = 0
    weak_source: str = "any"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch, num_strong = len(examples), self.num_strong
        check_weak_batch(self.num_weak, batch, "every batch (its number of rows)")
        answers = [[example["chosen_ids"], *example["rejected_ids"][:num_strong]] for example in examples]
        weak_sources = weak_negative_sources(batch, self.num_weak, self.seed, self.weak_source) if self.num_weak \
            else [[] for _ in examples]
        weak = [[borrowed_answer(answers[j], k) for j, k in sources] for sources in weak_sources]
        candidates, candidate_mask = candidate_answers(answers, weak, num_strong, absent="none")
        sequences, masks = [], []
        for r, answer in enumerate(candidates):
            prompt, answer = examples[r % batch]["prompt_ids"], answer or []
            sequences.append(prompt + answer)
            masks.append([0] * len(prompt) + [1] * len(answer))
        output = {**self._padded(sequences, masks), "candidate_mask": candidate_mask}
        if self.weak_correction_prompts and self.num_weak:
            rows, masks, own = [], [], []
            for b, sources in enumerate(weak_sources):
                for m, (j, k) in enumerate(sources):
                    answer = weak[b][m]
                    own.append((1 if k == 1 and len(answers[j]) > 1 else 0) * batch + j)
                    rng = random.Random(f"weak-correction/{self.seed}/{b}/{m}")
                    for other in other_prompts(batch, j, self.weak_correction_prompts - 1, rng):
                        rows.append(examples[other]["prompt_ids"] + answer)
                        masks.append([0] * len(examples[other]["prompt_ids"]) + [1] * len(answer))
            output.update({f"weak_prompts_{key}": value for key, value in self._padded(rows, masks).items()})
            output["weak_source_index"] = torch.tensor(own).view(batch, self.num_weak)
        if "ref_chosen_logps" in examples[0]:
            output["ref_chosen_logps"] = torch.tensor([example["ref_chosen_logps"] for example in examples])
            output["ref_rejected_logps"] = torch.tensor(
                [(list(example["ref_rejected_logps"]) + [0.0] * num_strong)[:num_strong] for example in examples])
        return output

    def _padded(self, sequences: list[list[int]], masks: list[list[int]]) -> dict[str, Tensor]:
        """input_ids, attention_mask, completion_mask of (prompt + answer) sequences and their
        answer masks, truncated and right-padded as TRL's DataCollatorForPreference does."""
        if self.max_length is not None:
            keep = (slice(None, self.max_length) if self.truncation_mode == "keep_start"
                    else slice(-self.max_length, None))
            sequences, masks = [s[keep] for s in sequences], [m[keep] for m in masks]

        def padded(rows: list[list[int]], value: int) -> Tensor:
            return pad([torch.tensor(r, dtype=torch.long) for r in rows], padding_value=value, padding_side="right",
                       pad_to_multiple_of=self.pad_to_multiple_of)

        return {"input_ids": padded(sequences, self.pad_token_id),
                "attention_mask": padded([[1] * len(s) for s in sequences], 0), "completion_mask": padded(masks, 0)}
