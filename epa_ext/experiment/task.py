"""A preference task whose true reward is known exactly.

Prompts are ``prompt_length`` distinct letters of a small alphabet; answers are ``answer_length``
letters. The hidden true reward adds up one term per answer letter c, which depends on the
prompt x and on the letter:

    r*(x, y) = sum_j  t(x, y_j),   t(x, c) = +in_prompt_reward  if c occurs in x
                                             -in_prompt_reward  otherwise
                                             + value[c]          (a fixed, seeded value per letter)

so a tiny transformer can learn it (attend to the prompt, look the letter up) and it has a spread
of values rather than pass/fail. The broad base distribution that the reference policy is
trained on (SFT) draws each answer letter independently: with probability ``copy_prob`` a letter
of the prompt, otherwise any letter; the reference therefore puts mass on good and bad answers.

Because the base distribution and the reward both factor over answer positions, the policy that
the KL-regularized objective targets, π*(y|x) ∝ π_base(y|x)·exp(r*(x, y)/β), factors too, and its
expected reward and KL(π* ‖ π_base) have closed forms (``KnownRewardTask.optimum``): the best
reward reachable at each KL, against which trained policies are plotted.

Token ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, ``=`` 4 (ends a prompt), then the
letters. A prompt is fed as ``<s> c f a k =`` and an answer as ``b c c a f k </s>``, exactly as
``epa_ext.train`` tokenizes the rows of ``write_preferences``.
"""

from __future__ import annotations

import functools
import json
import math
import string
from pathlib import Path

import torch
from torch import Tensor

import epa_ext

from ..train.modeling import build_tiny_model
from ..preference.weak_correction import KnownProposal
from .config import ReferenceSpec, TaskSpec

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "=")
BOS_ID, EOS_ID, PROMPT_END_ID = 1, 2, 4
FIRST_LETTER_ID = len(SPECIAL_TOKENS)


class KnownRewardTask:
    """The task of ``spec``: prompts, the base answer distribution, the true reward, token ids."""

    def __init__(self, spec: TaskSpec = TaskSpec()):
        self.spec = spec
        self.letters = string.ascii_lowercase[:spec.alphabet_size]
        generator = torch.Generator().manual_seed(spec.seed)
        self.letter_values = (torch.rand(spec.alphabet_size, generator=generator, dtype=torch.float64) * 2 - 1) \
            * spec.letter_value_scale

    @property
    def vocab_size(self) -> int:
        return FIRST_LETTER_ID + self.spec.alphabet_size

    # --- prompts, answers and the true reward (letter indices 0..A-1) ---------------------------

    def sample_prompts(self, num_prompts: int, generator: torch.Generator) -> Tensor:
        """[n, P] letter indices, distinct within a prompt."""
        noise = torch.rand(num_prompts, self.spec.alphabet_size, generator=generator)
        return noise.argsort(dim=1)[:, :self.spec.prompt_length]

    def in_prompt(self, prompts: Tensor) -> Tensor:
        """[n, A] float64: 1 where letter c occurs in prompt x, else 0."""
        return torch.zeros(prompts.shape[0], self.spec.alphabet_size, dtype=torch.float64).scatter_(1, prompts.cpu(), 1.0)

    def letter_rewards(self, prompts: Tensor) -> Tensor:
        """[n, A] float64: t(x, c) for every letter c under each prompt x."""
        return (2 * self.in_prompt(prompts) - 1) * self.spec.in_prompt_reward + self.letter_values

    def reward(self, prompts: Tensor, answers: Tensor) -> Tensor:
        """True reward r*(x, y) [n] float64 of answers [n, L] (row i answers prompt i)."""
        return self.letter_rewards(prompts).gather(1, answers.cpu()).sum(dim=1)

    def base_letter_probs(self, prompts: Tensor) -> Tensor:
        """[n, A] float64: the base distribution of one answer letter under each prompt."""
        return self.spec.copy_prob * self.in_prompt(prompts) / self.spec.prompt_length \
            + (1 - self.spec.copy_prob) / self.spec.alphabet_size

    def sample_base_answers(self, prompts: Tensor, generator: torch.Generator) -> Tensor:
        """[n, L] answers drawn from the base distribution."""
        probs = self.base_letter_probs(prompts)
        return torch.multinomial(probs, self.spec.answer_length, replacement=True, generator=generator)

    def base_marginal_logps(self, answers: Tensor) -> Tensor:
        """log q(y) [n] float64 of answers [n, L] (letter indices): the base distribution
        marginalised over all prompts, q(y) = mean_x pi_base(y|x). Prompts are uniform over
        ordered letter tuples and pi_base depends on a prompt's set of letters only, so the mean
        over all C(A, P) sets is exact. The distribution weak negatives (answers to other prompts)
        come from, up to the preference draw's selection among a prompt's candidates."""
        log_base = self._log_base_per_prompt_set()  # [sets, A]
        per_set = log_base[:, answers.cpu()].sum(dim=-1)  # [sets, n]
        return torch.logsumexp(per_set, dim=0) - math.log(log_base.shape[0])

    @functools.cache
    def _log_base_per_prompt_set(self) -> Tensor:
        sets = torch.combinations(torch.arange(self.spec.alphabet_size), self.spec.prompt_length)
        return self.base_letter_probs(sets).log()

    def tilted_letter_probs(self, prompts: Tensor, beta: float) -> Tensor:
        """[n, A] float64: one answer letter's law under π_base·exp(r*/β) / Z, normalised per
        letter (exact: the base distribution and r* factor over answer positions, so the tilted law
        of a whole answer is the product of these). beta = inf gives the base distribution."""
        base = self.base_letter_probs(prompts)
        tilted = base * torch.exp(self.letter_rewards(prompts) / beta) if math.isfinite(beta) else base
        return tilted / tilted.sum(dim=1, keepdim=True)

    def sample_tilted_answers(self, prompts: Tensor, beta: float, generator: torch.Generator) -> Tensor:
        """[n, L] answers drawn exactly from π_base·exp(r*/β) / Z over all answers, letter by letter."""
        return torch.multinomial(self.tilted_letter_probs(prompts, beta), self.spec.answer_length, replacement=True,
                                 generator=generator)

    def optimum(self, prompts: Tensor, beta: float) -> tuple[float, float]:
        """(expected true reward, KL(π* ‖ π_base)) of π* ∝ π_base·exp(r*/β), averaged over prompts.
        beta = inf gives the base distribution itself (KL 0)."""
        base, rewards = self.base_letter_probs(prompts), self.letter_rewards(prompts)
        tilted = self.tilted_letter_probs(prompts, beta)
        length = self.spec.answer_length
        reward = length * (tilted * rewards).sum(dim=1)
        kl = length * (tilted * (tilted / base).log()).sum(dim=1)
        return float(reward.mean()), float(kl.mean())

    # --- token ids and text -------------------------------------------------------------------

    def prompt_ids(self, prompts: Tensor) -> Tensor:
        """[n, P + 2]: ``<s>``, the letters, ``=``."""
        n = prompts.shape[0]
        return torch.cat([torch.full((n, 1), BOS_ID), prompts.cpu() + FIRST_LETTER_ID,
                          torch.full((n, 1), PROMPT_END_ID)], dim=1)

    def answer_tokens(self, answers: Tensor) -> Tensor:
        """[n, L + 1] token ids of answers [n, L] (letter indices): the letters, then ``</s>``."""
        return torch.cat([answers.cpu() + FIRST_LETTER_ID, torch.full((answers.shape[0], 1), EOS_ID)], dim=1)

    def sequence_ids(self, prompts: Tensor, answer_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(input ids, labels) [n, P + 2 + T] for answer token ids [n, T] to prompts [n, P]. The labels
        are the answer's tokens up to its first ``</s>``; the prompt and anything after that
        ``</s>`` are epa_ext.IGNORE_INDEX."""
        prompt = self.prompt_ids(prompts)
        answer_tokens = answer_tokens.cpu()
        ids = torch.cat([prompt, answer_tokens], dim=1)
        after_end = (answer_tokens == EOS_ID).long().cumsum(dim=1) - (answer_tokens == EOS_ID).long() > 0
        labels = torch.cat([torch.full_like(prompt, epa_ext.IGNORE_INDEX), answer_tokens.masked_fill(after_end, epa_ext.IGNORE_INDEX)], dim=1)
        return ids, labels

    def reward_of_tokens(self, prompts: Tensor, answer_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(true reward [n], well-formed [n] bool) of sampled answer token ids [n, L + 1].
        Well-formed: L letters, then ``</s>``. A malformed answer (a non-letter among the first L
        tokens, or no ``</s>`` after them) scores as the worst well-formed answer to its prompt,
        L·min_c t(x, c): an answer that breaks the format or never ends is a failure, not a draw."""
        answer_tokens = answer_tokens.cpu()
        length = self.spec.answer_length
        letters = answer_tokens[:, :length] - FIRST_LETTER_ID
        is_letter = (letters >= 0) & (letters < self.spec.alphabet_size)
        well_formed = is_letter.all(dim=1) & (answer_tokens[:, length] == EOS_ID)
        per_letter = self.letter_rewards(prompts)
        reward = per_letter.gather(1, letters.clamp(0, self.spec.alphabet_size - 1)).sum(dim=1)
        worst = length * per_letter.min(dim=1).values
        return torch.where(well_formed, reward, worst), well_formed

    def weak_proposal(self):
        """The exact q of weak answers (``base_marginal_logps``) for epa-train's --weak-correction
        importance, on answer token ids as epa-train tokenizes them (the letters, then ``</s>``);
        an answer that is not L letters and ``</s>`` has q = 0."""
        length = self.spec.answer_length

        @functools.cache
        def log_q(answer_ids: tuple[int, ...]) -> float:
            letters = torch.tensor(list(answer_ids[:length])) - FIRST_LETTER_ID
            well_formed = (len(answer_ids) == length + 1 and answer_ids[length] == EOS_ID
                           and bool(((letters >= 0) & (letters < self.spec.alphabet_size)).all()))
            return float(self.base_marginal_logps(letters[None])[0]) if well_formed else -math.inf

        return KnownProposal(f"known-reward base marginal {self.spec}", lambda answer_ids: log_q(tuple(answer_ids)))

    def text(self, letters: Tensor) -> str:
        return " ".join(self.letters[i] for i in letters.tolist())

    def tokenizer(self):
        """A word-level transformers tokenizer over the special tokens and the letters."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *self.letters))}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>", unk_token="<unk>")


# --- models: the reference by SFT, sampling, answer log-probs -------------------------------------


@torch.no_grad()
def answer_logps(model, task: KnownRewardTask, prompts: Tensor, answer_tokens: Tensor, chunk: int = 4096) -> Tensor:
    """log π(y|x) [n] float32 of answer token ids [n, T] (up to and including their first
    ``</s>``) to prompts [n, P], computed with epa_ext's fused log-prob op."""
    device = next(model.parameters()).device
    ids, labels = task.sequence_ids(prompts, answer_tokens)
    out = []
    for start in range(0, ids.shape[0], chunk):
        logits = model(input_ids=ids[start:start + chunk].to(device)).logits.float()
        out.append(epa_ext.sequence_logps(logits[:, :-1], labels[start:start + chunk, 1:].to(device)))
    return torch.cat(out).cpu()


@torch.no_grad()
def sample_answers(model, task: KnownRewardTask, prompts: Tensor, num_samples: int, generator: torch.Generator, *,
                   letters_only: bool = True, chunk: int = 4096) -> Tensor:
    """Answers sampled from the model at temperature 1, prompt-major (row i * num_samples + s is
    sample s for prompt i).

    letters_only=True: [n * num_samples, L] letter indices, each position drawn over the letters
    alone (for candidates from the reference, whose own answers are malformed under 1 % of the
    time; the ``</s>`` after them is scored, not sampled). letters_only=False: [n * num_samples, L + 1] token
    ids drawn over the whole vocabulary, the policy's answer as it would really come out (the last
    position is where ``</s>`` belongs).
    """
    device = next(model.parameters()).device
    prompt_ids = task.prompt_ids(prompts).repeat_interleave(num_samples, dim=0)
    first = FIRST_LETTER_ID if letters_only else 0
    steps = task.spec.answer_length + (0 if letters_only else 1)
    out = []
    for start in range(0, prompt_ids.shape[0], chunk):
        ids = prompt_ids[start:start + chunk].to(device)
        for _ in range(steps):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1, first:task.vocab_size].float(), dim=-1)
            draw = torch.multinomial(probs.cpu(), 1, generator=generator)
            ids = torch.cat([ids, draw.to(device) + first], dim=1)
        out.append(ids[:, -steps:].cpu() - first)
    return torch.cat(out)


def train_reference(task: KnownRewardTask, spec: ReferenceSpec, seed: int, device: torch.device,
                    progress: bool = True):
    """A tiny Llama-architecture model trained by SFT (mean answer-token NLL, AdamW, cosine decay) on
    fresh prompts with answers from the base distribution, so that it approximates π_base."""
    from tqdm.auto import tqdm

    length = task.spec.prompt_length + task.spec.answer_length + 3
    model = build_tiny_model(task.vocab_size, spec.hidden_size, spec.layers, length, seed).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / spec.steps)))
    bar = tqdm(range(spec.steps), desc="reference SFT", disable=not progress, dynamic_ncols=True, leave=False)
    for _ in bar:
        prompts = task.sample_prompts(spec.batch_size, generator)
        ids, labels = task.sequence_ids(prompts, task.answer_tokens(task.sample_base_answers(prompts, generator)))
        logits = model(input_ids=ids.to(device)).logits
        loss = -epa_ext.sequence_logps(logits[:, :-1], labels[:, 1:].to(device)).mean() / (task.spec.answer_length + 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(nll_per_token=f"{loss.item():.3f}")
    return model.eval()


def base_nll_per_token(task: KnownRewardTask, prompts: Tensor, answers: Tensor) -> float:
    """Mean -log π_base per answer letter (the floor of the reference's SFT loss, ``</s>`` aside)."""
    probs = task.base_letter_probs(prompts).repeat_interleave(answers.shape[0] // prompts.shape[0], dim=0)
    return float(-probs.gather(1, answers).log().mean())


DATA_MODELS = ("pool", "ipm")


def write_preferences(path: Path, task: KnownRewardTask, reference, prompts: Tensor, num_candidates: int,
                      temperature: float, generator: torch.Generator, data_model: str = "pool") -> dict:
    """Preference rows for ``epa_ext.train``, one per prompt, each with a chosen answer and
    num_candidates - 1 rejected ones (strong negatives), drawn by one of two data models (what
    each predicts for weak negatives: docs/known_reward/sweeps/README.md, "ipm sweep").

    ``pool``: each prompt gets num_candidates answers sampled from the reference; the chosen one
    is drawn from them with probability softmax(r*/temperature) (a Plackett-Luce / Bradley-Terry
    choice), the others, in random order, are its rejected answers. DPO and EPA with one strong
    negative therefore see the chosen answer against a uniformly random other candidate; for any
    two candidates a and b, the chance that a is chosen over b given that the pair is shown is
    exp(r*_a/τ) / (exp(r*_a/τ) + exp(r*_b/τ)), the Bradley-Terry model DPO assumes.

    ``ipm``: the energy-based model's own assumption. The chosen answer is drawn exactly from
    π_base·exp(r*/τ) / Z over all answers (``sample_tilted_answers``, letter by letter), and the
    rejected ones from π_base independently of it. Both come from the base distribution (not the
    reference, whose tilted law cannot be sampled exactly; the reference is within 0.004 nats per
    letter of the base), so the rejected answers' marginal over prompts is exactly
    ``base_marginal_logps``: the exact q of weak negatives borrowed from rejected answers. The
    reference is not used.

    Rows: {"prompt", "chosen", "rejected": [...], "true_rewards": {"chosen", "rejected": [...]}}.
    Returns a summary: how often the chosen answer is the best candidate, the spread of r*.
    """
    if data_model not in DATA_MODELS:
        raise ValueError(f"data_model must be one of {DATA_MODELS}; got {data_model!r}")
    n = prompts.shape[0]
    if data_model == "pool":
        answers = sample_answers(reference, task, prompts, num_candidates, generator).view(n, num_candidates, -1)
    else:
        chosen_answers = task.sample_tilted_answers(prompts, temperature, generator)
        rejected = task.sample_base_answers(prompts.repeat_interleave(num_candidates - 1, 0), generator)
        answers = torch.cat([chosen_answers[:, None], rejected.view(n, num_candidates - 1, -1)], dim=1)
    rewards = task.reward(prompts.repeat_interleave(num_candidates, 0), answers.flatten(0, 1)).view(n, num_candidates)
    if data_model == "pool":
        chosen = torch.multinomial(torch.softmax(rewards / temperature, dim=1), 1, generator=generator).squeeze(1)
    else:
        chosen = torch.zeros(n, dtype=torch.long)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for i in range(n):
            if data_model == "pool":
                others = [k for k in torch.randperm(num_candidates, generator=generator).tolist() if k != chosen[i]]
            else:  # independent draws: their order carries nothing
                others = list(range(1, num_candidates))
            row = {"prompt": task.text(prompts[i]) + " =", "chosen": task.text(answers[i, chosen[i]]),
                   "rejected": [task.text(answers[i, k]) for k in others],
                   "true_rewards": {"chosen": float(rewards[i, chosen[i]]),
                                    "rejected": [float(rewards[i, k]) for k in others]}}
            handle.write(json.dumps(row) + "\n")
    tmp.replace(path)
    best = rewards.max(dim=1).values
    return {"prompts": n, "candidates": num_candidates,
            "chosen_is_best": float((rewards.gather(1, chosen[:, None]).squeeze(1) == best).double().mean()),
            "true_reward_std_within_prompt": float(rewards.std(dim=1).mean())}
