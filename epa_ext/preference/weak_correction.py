"""Importance-corrected weak negatives (epa-train ``--weak-correction importance``; docs/losses.md,
"Weak negatives and their importance weights").

A weak negative of prompt x_i is an answer y~ written for another prompt x_j, so it is a draw from
the data's answer mixture q(y) = (1/N) sum_k mu(y|x_k) (mu = pi_ref, the distribution of the
strong negatives), not from mu(.|x_i). Adding

    log w(y~ | x_i) = log mu(y~|x_i) - log q(y~)

to its score in EPA's partition sum turns it into a draw from mu(.|x_i), and the loss's minimiser
into r* + C(x) for any number of weak negatives (without it: r* + log mu - log(K mu + M q) + C).

q is estimated per weak answer, stratified: its own prompt's term exactly (where answers are
written for their prompt, it dominates the sum) and the other N - 1 terms by the mean over S - 1
prompts drawn from them, fixed per (example, weak negative) by the seed:

    q^(y~) = mu(y~|x_j) / N + (N - 1) / N * mean_s mu(y~|x_{k_s})          (unbiased for q)

Every log-prob it needs is scored once, before training, by the reference (S + 1 sequences per
weak negative: y~ under x_i, x_j and the k_s), and the resulting [n, C] table of log-weights (0 on
the chosen and strong columns) is what the losses get with each batch. An answer is scored under
another prompt exactly as under its own: if the two do not fit max_length, the prompt keeps its
last tokens (``keep_prompt_end``).

``KnownProposal`` replaces the estimate by a q known in closed form (the known-reward experiment
tests the estimator against its task's exact q); answers it gives no mass are left out (log-weight
-inf: no finite weight turns them into draws from mu).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .candidates import Layout, Split, fit_borrowed_answer, keep_prompt_end, pad_rows

# One sequence scored by the reference: (prompt token ids, answer token ids).
Row = tuple[list[int], list[int]]
# The reference's summed log-probs [R] of rows (input_ids, attention_mask, labels [R, T]).
Scorer = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class KnownProposal:
    """log q(answer token ids) of weak answers known in closed form, instead of the estimate; its
    name goes into the cache fingerprint."""

    name: str
    log_q: Callable[[Sequence[int]], float]


def other_prompts(num_examples: int, own: int, count: int, rng: random.Random) -> list[int]:
    """count examples other than own, distinct when there are enough, with repetition otherwise."""
    others = num_examples - 1
    picks = rng.sample(range(others), count) if count <= others else rng.choices(range(others), k=count)
    return [k + (k >= own) for k in picks]


def answer_under(prompt_ids: list[int], answer: list[int], max_length: int, has_bos: bool) -> Row:
    """(prompt, answer) within max_length: the prompt keeps its last tokens."""
    return keep_prompt_end(prompt_ids, max_length - len(answer), has_bos), answer


@dataclass
class WeakPlan:
    """For each example i and weak negative m: the answer y~ (as collate puts it under x_i) and
    the rows that score it: under x_i, under its own prompt x_j, then under the S - 1 others."""

    answers: list[list[list[int]]]  # [n][M] token ids
    rows: list[Row]  # n * M * (S + 1), in (i, m, prompt) order
    prompts_per_answer: int  # S + 1 rows per weak negative (S = 0 with a known proposal: only x_i)


def plan(split: Split, layout: Layout, prompts_per_answer: int, seed: int, has_bos: bool, *,
         known: bool) -> WeakPlan:
    """The rows to score for split's weak negatives (S = prompts_per_answer; a known proposal
    needs only mu(y~|x_i))."""
    examples, sources = split.examples, split.weak_sources
    answers, rows = [], []
    for i, example in enumerate(examples):
        rng = random.Random(f"weak-correction/{seed}/{i}")  # a stream of its own (str seeds are hashed stably)
        per_example = []
        for j, k in sources[i][:layout.num_weak]:
            answer = fit_borrowed_answer(examples[j].answer_ids[k], example, i, layout.max_length)
            per_example.append(answer)
            prompts = [i] if known else [i, j, *other_prompts(len(examples), j, prompts_per_answer - 1, rng)]
            rows += [answer_under(examples[p].prompt_ids, answer, layout.max_length, has_bos) for p in prompts]
        answers.append(per_example)
    return WeakPlan(answers, rows, 1 if known else prompts_per_answer + 1)


def score_rows(rows: list[Row], score: Scorer, pad_id: int, rows_per_batch: int, device: torch.device) -> Tensor:
    """[R] fp32 reference log-probs of rows, rows_per_batch at a time (length-sorted, so a batch
    pads little)."""
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]) + len(rows[r][1]))
    out = torch.empty(len(rows))
    for start in range(0, len(rows), rows_per_batch):
        chunk = order[start:start + rows_per_batch]
        input_ids, attention_mask, labels = pad_rows([rows[r] for r in chunk], pad_id)
        out[chunk] = score(input_ids.to(device), attention_mask.to(device), labels.to(device)).float().cpu()
    return out


def estimated_log_q(own: Tensor, others: Tensor, num_examples: int) -> Tensor:
    """log q^ of the module docstring from log mu(y~|x_j) [...] and log mu(y~|x_{k_s}) [..., S-1]."""
    rest = torch.logsumexp(others, dim=-1) - math.log(others.shape[-1])
    return torch.logaddexp(own - math.log(num_examples), rest + math.log((num_examples - 1) / num_examples))


def log_weight_table(split: Split, layout: Layout, logps: Tensor, weak_plan: WeakPlan,
                     proposal: KnownProposal | None) -> Tensor:
    """[n, C] fp32 log-weights: 0 on the chosen and strong columns, log mu(y~|x_i) - log q(y~) on
    the weak ones (-inf where a known q is 0). logps: the plan's rows, scored."""
    n, weak = len(split.examples), layout.num_weak
    scored = logps.view(n, weak, weak_plan.prompts_per_answer)
    under_own_prompt = scored[..., 0]
    if proposal is None:
        log_q = estimated_log_q(scored[..., 1], scored[..., 2:], n)
    else:
        log_q = torch.tensor([[proposal.log_q(a) for a in per_example] for per_example in weak_plan.answers],
                             dtype=torch.float32).view(n, weak)
    weights = torch.where(torch.isneginf(log_q), float("-inf"), under_own_prompt - log_q)
    table = torch.zeros(n, layout.num_candidates)
    table[:, 1 + layout.num_strong:] = weights
    return table


def summary(table: Tensor, layout: Layout) -> dict[str, float]:
    """Mean and spread of the finite weak log-weights, and how many are -inf (left out)."""
    weak = table[:, 1 + layout.num_strong:]
    finite = weak[torch.isfinite(weak)]
    return {"mean": float(finite.mean()) if finite.numel() else float("nan"),
            "std": float(finite.std()) if finite.numel() > 1 else 0.0,
            "left_out": int((~torch.isfinite(weak)).sum())}
