"""epa-train --weak-correction importance (epa_ext/preference/weak_correction.py): which sequences it
scores, the estimator against its definition, the table against a hand computation, and the
trainer around it (options, cache, resume, metrics). DDP with the correction: test_ddp_over_two_
processes_trains_as_one in test_train_distributed.py."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess

import pytest
import torch
from conftest import epa_train_command, read_metrics, train_in_process, train_losses

from epa_ext.preference.candidates import Layout, TokenizedExample, collate, keep_prompt_end, make_split, pad_rows
from epa_ext.preference.weak_correction import (KnownProposal, estimated_log_q, log_weight_table, other_prompts, plan,
                                           score_rows)
from epa_ext.train.config import ConfigError, parse_config

CORRECTED = ["--num-weak", "2", "--weak-correction", "importance", "--weak-correction-prompts", "3"]


def examples(count: int = 6) -> list[TokenizedExample]:
    """Prompts of different lengths (BOS = 1 in front), a chosen and a rejected answer each."""
    return [TokenizedExample([1] + [10 + i] * (1 + i % 3), [[20 + i, 30 + i, 2], [40 + i, 2]]) for i in range(count)]


def fake_scorer(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A made-up 'log-prob' that depends on the prompt and the answer of each row."""
    scored = labels != -100
    prompt = torch.where(attention_mask.bool() & ~scored.roll(1, 1), input_ids, 0).sum(-1)
    answer = torch.where(scored, labels, 0).sum(-1)
    return -(0.01 * prompt * answer % 7.0).float() - 0.1 * scored.sum(-1)


def test_other_prompts_are_distinct_and_never_the_own_one():
    rng = random.Random(0)
    for own in range(5):
        picks = other_prompts(5, own, 4, rng)
        assert sorted(picks) == sorted(set(range(5)) - {own})
    assert len(other_prompts(3, 1, 7, rng)) == 7 and 1 not in other_prompts(3, 1, 7, rng)  # with repetition


def test_plan_scores_each_weak_answer_under_its_prompts():
    """Rows per weak negative of example i: the answer as collate puts it under x_i, then under its
    own prompt x_j, then under S - 1 others; the same plan for the same seed."""
    split = make_split(examples(), num_weak=2, seed=3)
    layout = Layout(num_strong=1, num_weak=2, pad_id=0, max_length=6)
    weak_plan = plan(split, layout, prompts_per_answer=3, seed=3, has_bos=True, known=False)
    assert len(weak_plan.rows) == 6 * 2 * 4 and weak_plan.prompts_per_answer == 4
    batch = collate(split.examples, list(range(6)), num_strong=1, num_weak=2, weak_sources=split.weak_sources,
                    all_examples=split.examples, pad_id=0, max_length=6)
    for i in range(6):
        for m, (j, _) in enumerate(split.weak_sources[i]):
            rows = weak_plan.rows[(i * 2 + m) * 4:(i * 2 + m + 1) * 4]
            answer = weak_plan.answers[i][m]
            row = batch.input_ids[(2 + m) * 6 + i]  # candidate 2 + m of prompt i, candidate-major
            assert row[batch.attention_mask[(2 + m) * 6 + i].bool()].tolist() == split.examples[i].prompt_ids + answer
            assert rows[0] == (split.examples[i].prompt_ids, answer)
            for prompt, rest in rows:
                assert rest == answer and len(prompt) + len(answer) <= 6 and prompt[0] == 1  # BOS kept
            assert rows[1][0] == keep_prompt_end(split.examples[j].prompt_ids, 6 - len(answer), True)
    again = plan(split, layout, prompts_per_answer=3, seed=3, has_bos=True, known=False)
    assert again.rows == weak_plan.rows


def test_estimate_is_exact_when_every_other_prompt_is_drawn():
    """With S - 1 = N - 1 others drawn without repetition, q^ is the mixture itself."""
    logps = torch.randn(5, dtype=torch.float64) * 3  # log mu(y | x_k) for k = 0..4, x_0 the answer's own
    exact = torch.logsumexp(logps, 0) - math.log(5)
    torch.testing.assert_close(estimated_log_q(logps[0], logps[1:], 5), exact)
    # and unbiased (in q, not log q) when fewer are drawn: the mean over every draw of 2 others
    draws = [estimated_log_q(logps[0], logps[[a, b]], 5).exp() for a in range(1, 5) for b in range(1, 5) if a < b]
    torch.testing.assert_close(torch.stack(draws).mean(), exact.exp())


def test_table_is_the_definition():
    split = make_split(examples(), num_weak=2, seed=1)
    layout = Layout(num_strong=1, num_weak=2, pad_id=0, max_length=7)
    weak_plan = plan(split, layout, prompts_per_answer=3, seed=1, has_bos=True, known=False)
    logps = score_rows(weak_plan.rows, fake_scorer, 0, rows_per_batch=5, device=torch.device("cpu"))
    one_by_one = torch.cat([fake_scorer(*pad(row)) for row in weak_plan.rows])
    assert torch.equal(logps, one_by_one)  # batching and length-sorting do not change a row's value
    table = log_weight_table(split, layout, logps, weak_plan, None)
    assert table.shape == (6, 4) and torch.equal(table[:, :2], torch.zeros(6, 2))
    for i in range(6):
        for m in range(2):
            under_x_i, own, *others = logps[(i * 2 + m) * 4:(i * 2 + m + 1) * 4].double().tolist()
            q = math.exp(own) / 6 + 5 / 6 * sum(math.exp(v) for v in others) / len(others)
            assert table[i, 2 + m].item() == pytest.approx(under_x_i - math.log(q), rel=1e-6, abs=1e-6)
    known = plan(split, layout, prompts_per_answer=3, seed=1, has_bos=True, known=True)
    assert len(known.rows) == 6 * 2
    proposal = KnownProposal("test", lambda answer: -math.inf if answer[0] == 20 else -float(len(answer)))
    known_logps = score_rows(known.rows, fake_scorer, 0, rows_per_batch=4, device=torch.device("cpu"))
    table = log_weight_table(split, layout, known_logps, known, proposal)
    for i in range(6):
        for m in range(2):
            answer = known.answers[i][m]
            expected = -math.inf if answer[0] == 20 else known_logps[i * 2 + m].item() + len(answer)
            assert table[i, 2 + m].item() == pytest.approx(expected)


def test_weak_sources_draw_what_they_claim():
    """--weak-source rejected: every weak negative, in the batches and in the correction's plan, is
    another example's rejected answer, borrowed from the same examples as with any; any borrows
    chosen and rejected answers. (The correction's q^ scores whichever answer is borrowed under its
    own prompt and S - 1 others, so it needs nothing else from the source.)"""
    tokenized = examples(40)
    chosen = {tuple(e.answer_ids[0]) for e in tokenized}
    rejected = {tuple(e.answer_ids[1]) for e in tokenized}
    layout = Layout(num_strong=1, num_weak=3, pad_id=0, max_length=8)
    borrowed = {}
    for source in ("any", "rejected"):
        split = make_split(tokenized, num_weak=3, seed=5, weak_source=source)
        batch = collate(split.examples, list(range(40)), num_strong=1, num_weak=3, weak_sources=split.weak_sources,
                        all_examples=split.examples, pad_id=0, max_length=8)
        answers = []
        for i, example in enumerate(tokenized):
            for m, (j, _) in enumerate(split.weak_sources[i]):
                row = (2 + m) * 40 + i
                answer = tuple(batch.input_ids[row][batch.attention_mask[row].bool()].tolist()[len(example.prompt_ids):])
                assert answer in (tuple(tokenized[j].answer_ids[0]), tuple(tokenized[j].answer_ids[1])) and j != i
                answers.append(answer)
        planned = plan(split, layout, prompts_per_answer=3, seed=5, has_bos=True, known=False).answers
        assert [tuple(a) for per_example in planned for a in per_example] == answers
        borrowed[source] = (answers, [[j for j, _ in pairs] for pairs in split.weak_sources])
    assert set(borrowed["rejected"][0]) <= rejected
    assert set(borrowed["any"][0]) & chosen and set(borrowed["any"][0]) & rejected
    assert borrowed["rejected"][1] == borrowed["any"][1]  # the same examples, only the answer differs
    with pytest.raises(ValueError, match="weak_source must be one of"):
        make_split(tokenized, num_weak=3, seed=5, weak_source="chosen")


def test_training_with_weak_negatives_from_rejected_answers(tmp_path):
    """--weak-source rejected reaches the batches (other losses than any's), is recorded in the
    run's config, and works with the correction."""
    args = ["--max-steps", "3", "--batch-size", "3", "--num-weak", "2"]
    any_source = train_losses(train_in_process(tmp_path / "any", *args))
    rejected = train_losses(train_in_process(tmp_path / "rejected", *args, "--weak-source", "rejected"))
    assert rejected != any_source and all(map(math.isfinite, rejected))
    assert json.loads((tmp_path / "rejected" / "config.json").read_text())["weak_source"] == "rejected"
    corrected = train_in_process(tmp_path / "corrected", *args, "--weak-source", "rejected", *CORRECTED[2:])
    assert all(math.isfinite(r["weak/log_weight"]) for r in corrected if "loss" in r)


def pad(row):
    return pad_rows([row], 0)


BAD = [  # (flags, message)
    (["--weak-correction", "importance"], "--weak-correction corrects weak negatives: it needs --num-weak > 0"),
    (["--loss", "dpo", "--weak-correction", "importance"], "--weak-correction applies to --loss epa only"),
    (["--num-weak", "1", "--weak-correction", "importance", "--weak-correction-prompts", "1"],
     "--weak-correction-prompts must be >= 2; got 1"),
    (["--num-weak", "1", "--weak-correction-prompts", "4"],
     "--weak-correction-prompts applies to --weak-correction importance only"),
    (["--weak-correction", "exact"], "--weak-correction: invalid value 'exact'; allowed: none, importance"),
    (["--weak-source", "rejected"], "--weak-source says where weak negatives come from: it needs --num-weak > 0"),
    (["--loss", "dpo", "--weak-source", "rejected"], "--weak-source applies to --loss epa only"),
    (["--num-weak", "1", "--weak-source", "chosen"], "--weak-source: invalid value 'chosen'; allowed: any, rejected"),
]


@pytest.mark.parametrize("flags,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_options(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(["--dataset", "x.jsonl", "--output-dir", str(tmp_path), *flags])


def test_training_with_the_correction(tmp_path):
    """The correction changes the losses (the weights are not all 0), is logged, and is cached:
    a resumed run reads the table instead of scoring again, and ends bitwise where an
    uninterrupted one does. With LoRA (the reference: the model with its adapters disabled) the
    table is the same."""
    args = ["--max-steps", "4", "--save-steps", "2", "--batch-size", "3", "--ref", "precompute", *CORRECTED]
    plain = train_in_process(tmp_path / "plain", *args[:-4])
    corrected = train_in_process(tmp_path / "corrected", *args)
    assert train_losses(corrected) != train_losses(plain)
    logged = [r for r in corrected if "loss" in r]
    assert all(math.isfinite(r["weak/log_weight"]) and r["weak/log_weight_std"] > 0 for r in logged)
    assert "weak/log_weight" not in plain[0]
    (table,) = (tmp_path / "corrected").glob("weak_log_weights-train-*.pt")
    train_in_process(tmp_path / "lora", "--max-steps", "1", "--batch-size", "3", "--lora-r", "2", *CORRECTED)
    (lora_table,) = (tmp_path / "lora").glob("weak_log_weights-train-*.pt")
    torch.testing.assert_close(torch.load(lora_table), torch.load(table))

    out = tmp_path / "resumed"
    first = subprocess.run(epa_train_command(out, *args), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "extra reference scorings" in first.stderr
    uninterrupted = train_losses(read_metrics(out))
    shutil.rmtree(out / "final")  # as if it had died after checkpoint-2
    second = subprocess.run(epa_train_command(out, *args, "--resume"), capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert "extra reference scorings" not in second.stderr  # read from the cache
    assert train_losses(read_metrics(out)) == uninterrupted  # bitwise
