"""The known-reward experiment (epa_ext.experiment): the task's definitions, the metrics, the
flags, a smoke run of the whole pipeline and of each sweep on a tiny budget. (The
two-disjoint-pairs toy that shows DPO's flat direction and EPA's unique minimum is in
test_losses.py.)"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from epa_ext import IGNORE_INDEX
from epa_ext.experiment.config import ExperimentConfig, ReferenceSpec, TaskSpec, parse_method
from epa_ext.experiment.metrics import slope1_metrics
from epa_ext.experiment.report import format_table
from epa_ext.experiment.run import build_parser, main, run_experiment
from epa_ext.experiment.task import (EOS_ID, FIRST_LETTER_ID, KnownRewardTask, answer_logps, sample_answers,
                                     train_reference, write_preferences)
from epa_ext.train.data import parse_rows
from epa_ext.train.modeling import build_tiny_model


def test_true_reward_by_hand():
    task = KnownRewardTask(TaskSpec(alphabet_size=5, prompt_length=2, answer_length=3))
    prompts = torch.tensor([[0, 3]])
    answers = torch.tensor([[0, 1, 3]])  # a (in prompt), b (not), d (in prompt)
    v = task.letter_values
    expected = (0.5 + v[0]) + (-0.5 + v[1]) + (0.5 + v[3])
    assert task.reward(prompts, answers).item() == pytest.approx(float(expected))


def test_tokenizer_matches_the_ids_the_experiment_scores():
    """epa-train tokenizes the rows' text; the metrics build ids directly: they must agree."""
    task = KnownRewardTask()
    tokenizer = task.tokenizer()
    prompts, answers = torch.tensor([[2, 5, 0, 11]]), torch.tensor([[1, 2, 2, 0, 5, 11]])
    prompt_text, answer_text = task.text(prompts[0]) + " =", task.text(answers[0])
    assert prompt_text == "c f a l ="
    prompt_ids = [tokenizer.bos_token_id] + tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert prompt_ids == task.prompt_ids(prompts)[0].tolist()
    assert answer_ids == task.answer_tokens(answers)[0].tolist()
    assert tokenizer.unk_token_id not in prompt_ids + answer_ids


def test_labels_stop_at_the_first_end_token():
    task = KnownRewardTask(TaskSpec(alphabet_size=4, prompt_length=2, answer_length=3))
    tokens = torch.tensor([[FIRST_LETTER_ID, EOS_ID, FIRST_LETTER_ID + 1, EOS_ID]])
    ids, labels = task.sequence_ids(torch.tensor([[0, 1]]), tokens)
    assert ids.shape == labels.shape == (1, 8)
    assert labels[0].tolist() == [IGNORE_INDEX] * 4 + [FIRST_LETTER_ID, EOS_ID, IGNORE_INDEX, IGNORE_INDEX]


def test_malformed_answers_score_as_the_worst_answer():
    task = KnownRewardTask(TaskSpec(alphabet_size=6, prompt_length=2, answer_length=3))
    prompts = torch.tensor([[0, 1]] * 3)
    good = task.answer_tokens(torch.tensor([[0, 4, 1]]))[0]
    no_end = good.clone()
    no_end[-1] = FIRST_LETTER_ID + 2  # a fourth letter where </s> belongs
    bad_letter = good.clone()
    bad_letter[1] = 0  # <pad> inside the answer
    reward, well_formed = task.reward_of_tokens(prompts, torch.stack([good, no_end, bad_letter]))
    assert well_formed.tolist() == [True, False, False]
    assert reward[0] == pytest.approx(float(task.reward(prompts[:1], torch.tensor([[0, 4, 1]]))))
    worst = 3 * task.letter_rewards(prompts[:1]).min()
    assert reward[1] == reward[2] == pytest.approx(float(worst))


@pytest.mark.parametrize("beta", [0.5, 2.0, math.inf])
def test_optimum_matches_enumeration(beta):
    """The closed form of π* ∝ π_base·exp(r*/β) against summing over every answer."""
    task = KnownRewardTask(TaskSpec(alphabet_size=4, prompt_length=2, answer_length=3, copy_prob=0.6))
    prompts = torch.tensor([[0, 2], [1, 3]])
    rewards, kls = [], []
    for i in range(2):
        answers = torch.tensor(list(itertools.product(range(4), repeat=3)))
        prompt = prompts[i:i + 1].expand(len(answers), -1)
        base = task.base_letter_probs(prompts[i:i + 1])[0][answers].prod(dim=1)
        r = task.reward(prompt, answers)
        tilted = base * torch.exp(r / beta) if math.isfinite(beta) else base
        tilted = tilted / tilted.sum()
        rewards.append(float((tilted * r).sum()))
        kls.append(float((tilted * (tilted / base).log()).sum()))
    reward, kl = task.optimum(prompts, beta)
    assert reward == pytest.approx(sum(rewards) / 2, rel=1e-9)
    assert kl == pytest.approx(sum(kls) / 2, abs=1e-12)


def test_slope1_metrics_on_known_cases():
    true = torch.tensor([[0.0, 1.0, 3.0], [2.0, -1.0, 0.5]])
    shifted = true + torch.tensor([[5.0], [-2.0]])  # r* + C(x): the slope-1 relation
    m = slope1_metrics(shifted, true)
    assert m["rho"] == pytest.approx(1.0) and m["slope1_error"] == pytest.approx(0.0, abs=1e-12)
    assert m["accuracy"] == 1.0 and m["rho_prompts"] == 2
    doubled = slope1_metrics(2 * true, true)  # right order and correlation, wrong slope
    assert doubled["rho"] == pytest.approx(1.0) and doubled["accuracy"] == 1.0
    assert doubled["slope1_error"] == pytest.approx(float(true.var(dim=1, unbiased=False).mean()))
    reversed_ = slope1_metrics(-true, true)
    assert reversed_["rho"] == pytest.approx(-1.0) and reversed_["accuracy"] == 0.0
    flat = slope1_metrics(torch.zeros_like(true), true)
    assert flat["rho_prompts"] == 0 and math.isnan(flat["rho"]) and flat["accuracy"] == 0.5


def test_preferences_follow_the_true_reward(tmp_path):
    """Rows parse as epa-train data; the chosen answer is drawn with probability softmax(r*/τ)."""
    task = KnownRewardTask()
    model = build_tiny_model(task.vocab_size, 32, 1, 16, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    prompts = task.sample_prompts(1500, generator)
    summary = write_preferences(tmp_path / "prefs.jsonl", task, model, prompts, 4, 0.5, generator)
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    examples, report = parse_rows(rows, source="prefs.jsonl")
    assert len(examples) == 1500 and report.total() == 0 and len(examples[0].rejected) == 3
    rewards = torch.tensor([[r["true_rewards"]["chosen"], *r["true_rewards"]["rejected"]] for r in rows])
    expected_best = torch.softmax(rewards / 0.5, dim=1).gather(1, rewards.argmax(1, keepdim=True)).mean()
    assert summary["chosen_is_best"] == pytest.approx(float(expected_best), abs=0.04)
    assert (rewards[:, 0] == rewards.max(1).values).double().mean() == pytest.approx(summary["chosen_is_best"])


def test_reference_sft_learns_the_base_distribution():
    task = KnownRewardTask()
    model = train_reference(task, ReferenceSpec(steps=400), seed=0, device=torch.device("cpu"), progress=False)
    generator = torch.Generator().manual_seed(1)
    prompts = task.sample_prompts(256, generator)
    answers = sample_answers(model, task, prompts, 4, generator)
    in_prompt = (answers.view(256, 4, -1)[..., None] == prompts[:, None, None, :]).any(-1).double().mean()
    expected = task.spec.copy_prob + (1 - task.spec.copy_prob) * task.spec.prompt_length / task.spec.alphabet_size
    assert float(in_prompt) == pytest.approx(expected, abs=0.05)
    logps = answer_logps(model, task, prompts, task.answer_tokens(answers[::4]))
    base = task.base_letter_probs(prompts)[torch.arange(256)[:, None], answers[::4]].log().sum(1)
    assert float((logps.double() - base).abs().mean()) < 0.6  # nats per 6-letter answer


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    cfg = ExperimentConfig(output_dir=str(out), seeds=[0, 1], methods=["dpo", "epa_k3_m4"], steps=40,
                           train_prompts=320, eval_prompts=64, reference=ReferenceSpec(steps=150), lr=5e-4,
                           device="cpu", workers=2, progress=False)
    return cfg, run_experiment(cfg)


def test_smoke_run_results(smoke_results):
    cfg, results = smoke_results
    assert set(results["summary"]) == {"dpo", "epa_k3_m4"}
    for name, runs in results["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        for run in runs:
            for key in ("reward", "reward_well_formed", "malformed", "kl", "accuracy", "rho", "slope1_error"):
                assert math.isfinite(run[key]), (name, key)
            assert 0 <= run["malformed"] <= 1 and 0 <= run["accuracy"] <= 1 and -1 <= run["rho"] <= 1
            assert len(run["implicit_rewards"]) == 64 and len(run["implicit_rewards"][0]) == cfg.eval_candidates
        for mean_std in results["summary"][name].values():
            assert len(mean_std) == 2 and math.isfinite(mean_std[0]) and mean_std[1] >= 0
    # Training toward r* raises the true reward of what the policy writes above the reference's.
    reference_reward = results["reference"]["reward_well_formed"]
    for name in results["summary"]:
        assert results["summary"][name]["reward_well_formed"][0] > reference_reward + 0.1, name
        assert results["summary"][name]["accuracy"][0] > 0.6, name
    assert results["optimum"]["reward"] > results["reference"]["reward"]
    saved = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    table = format_table(results)
    assert "DPO" in table and "EPA K=3 M=4" in table and "optimum" in table


def test_rerun_reuses_finished_work(smoke_results, capsys):
    """Everything finished is cached: a second call trains nothing and reports the same numbers;
    main() prints the table, the comparison with DPO and the plots' paths."""
    cfg, results = smoke_results
    argv = ["--output-dir", cfg.output_dir, "--seeds", "0", "1", "--methods", "dpo", "epa_k3_m4", "--steps", "40",
            "--train-prompts", "320", "--eval-prompts", "64", "--reference-steps", "150", "--lr", "5e-4",
            "--device", "cpu"]
    evals = sorted(Path(cfg.output_dir).glob("runs/*/eval.json"))
    written = [p.stat().st_mtime_ns for p in evals]
    main(argv)
    out = capsys.readouterr().out
    assert len(evals) == 4 and [p.stat().st_mtime_ns for p in evals] == written  # nothing retrained
    assert not list(Path(cfg.output_dir).glob("runs/*/checkpoint-*"))  # the final policy is in final/
    assert "EPA K=3 M=4 vs DPO: reward" in out and "slope1_error" in out
    for name in ("reward_vs_kl.png", "slope1.png", "implicit_vs_true.png"):
        assert f"wrote {cfg.output_dir}/{name}" in out and (Path(cfg.output_dir) / name).stat().st_size > 10_000
    rerun = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    assert rerun["runs"] == json.loads(json.dumps(results["runs"]))


def test_worker_processes_give_the_numbers_of_one_process(smoke_results, tmp_path):
    """The smoke run trained in 2 processes with one thread each; one run repeated in this process
    (the reference copied over, so both start from the same weights) gives the same numbers."""
    cfg, results = smoke_results
    (reference,) = Path(cfg.output_dir).glob("reference-*")
    shutil.copytree(reference, tmp_path / reference.name)
    single = run_experiment(dataclasses.replace(cfg, output_dir=str(tmp_path), seeds=[1], methods=["epa_k3_m4"],
                                                workers=1))
    parallel = results["runs"]["epa_k3_m4"][1]
    for key in ("reward", "kl", "accuracy", "rho", "slope1_error", "implicit_rewards"):
        assert single["runs"]["epa_k3_m4"][0][key] == parallel[key], key


@pytest.mark.parametrize("argv,message", [
    (["--methods", "ppo"], "unknown method 'ppo'"),
    (["--methods", "epa_k0_m2"], "unknown method 'epa_k0_m2'"),
    (["--scheduler", "step"], "invalid choice"),
    (["--eval-candidates", "1"], "--eval-candidates must be >= 2"),
    (["--task-prompt-length", "13"], "--task-prompt-length"),
    (["--sweep", "negatives", "--negatives-num-weak", "-1"], "--negatives-num-weak"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--beta", "0"], "--beta and --temperature must be > 0"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_bad_flags_are_reported(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main([*argv, "--output-dir", str(tmp_path)])
    assert message in str(error.value) + capsys.readouterr().err


def test_too_few_candidates_for_the_negatives(tmp_path):
    with pytest.raises(SystemExit, match="--candidates 3 is too few for 3 strong negatives"):
        main(["--candidates", "3", "--methods", "epa_k3", "--output-dir", str(tmp_path)])


def test_method_names():
    assert parse_method("dpo") == parse_method("dpo") and parse_method("dpo").loss == "dpo"
    k3 = parse_method("epa_k3")
    assert (k3.loss, k3.num_strong, k3.num_weak, k3.label) == ("epa", 3, 0, "EPA K=3 M=0")
    k2m16 = parse_method("epa_k2_m16")
    assert (k2m16.num_strong, k2m16.num_weak, k2m16.label) == (2, 16, "EPA K=2 M=16")
    for bad in ("epa", "epa_k0", "epa_k1_m", "ipo", "epa_k1_m-1"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)


def _leaves(cfg, prefix=""):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}-")
        else:
            yield (prefix + f.name).replace("_", "-"), value


def test_every_setting_is_a_documented_flag(capsys):
    """Each ExperimentConfig field, nested specs included, is a flag with help and its default in
    --help; a non-default value given on the command line reaches the config."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    from epa_ext.experiment.config import config_from_flags

    leaves = dict(_leaves(ExperimentConfig()))
    assert len(leaves) > 35
    for flag in leaves:
        assert f"--{flag} " in help_text or f"--{flag}\n" in help_text or f"--{flag}," in help_text, flag
    argv = ["--eval-candidates", "5", "--policy-samples", "3", "--task-alphabet-size", "10", "--reference-lr", "1e-3",
            "--negatives-num-weak", "0", "32", "--practical-weak-weights", "0.1", "--no-progress", "--threads", "1",
            "--methods", "epa_k2_m16", "--scheduler", "constant"]
    given = vars(build_parser().parse_args(argv))
    assert given.pop("sweep") is None
    cfg = config_from_flags(given)
    assert (cfg.eval_candidates, cfg.policy_samples, cfg.task.alphabet_size, cfg.reference.lr) == (5, 3, 10, 1e-3)
    assert cfg.negatives.num_weak == [0, 32] and cfg.practical.weak_weights == [0.1]
    assert (cfg.progress, cfg.threads, cfg.methods, cfg.scheduler) == (False, 1, ["epa_k2_m16"], "constant")
    # Untouched settings keep their defaults, nested ones included.
    assert cfg.task.prompt_length == TaskSpec().prompt_length and cfg.negatives.num_strong == 3
    assert ExperimentConfig().negatives.num_weak == [0, 1, 2, 4, 8, 16]  # defaults are not shared lists


TINY = ["--seeds", "0", "--steps", "8", "--train-prompts", "96", "--eval-prompts", "16", "--eval-candidates", "4",
        "--policy-samples", "2", "--reference-steps", "20", "--batch-size", "8", "--device", "cpu", "--no-progress"]


def _trained(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in out.glob("runs/*/eval.json")}


@pytest.fixture(scope="module")
def negatives_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("negatives")
    argv = ["--sweep", "negatives", "--output-dir", str(out), "--negatives-num-weak", "0", "2",
            "--negatives-strong-values", "1", "3", "--negatives-strong-at-weak", "2", *TINY]
    main(argv)
    return out, argv


def test_negatives_sweep_writes_results_and_plots(negatives_sweep, capsys):
    out, _ = negatives_sweep
    results = json.loads((out / "results.json").read_text())
    assert results["sweep"] == "negatives"
    # DPO, the M sweep at K = 3 (M = 0, 2), the K sweep at M = 2 (K = 1; K = 3 is shared).
    assert list(results["settings"]) == ["dpo", "epa_k3_m0", "epa_k3_m2", "epa_k1_m2"]
    for name, setting in results["settings"].items():
        assert set(results["summary"][name]) >= {"slope1_error", "rho", "slope", "reward", "kl"}
        (run,) = results["runs"][name]
        # The settings are the ones the runs were trained with, as epa_ext.train recorded them.
        trained = run["train_config"]
        assert (trained["loss"], trained["num_weak"], trained["max_steps"], trained["seed"]) == \
            (setting["method"]["loss"], setting["method"]["num_weak"], 8, 0)
        if trained["loss"] == "epa":
            assert trained["num_strong"] == setting["method"]["num_strong"]
        assert len(run["train_loss"]) == 8 and math.isfinite(run["slope1_error"])
    assert results["config"]["steps"] == 8 and results["config"]["workers"] == 1  # the sweep's default
    for name in ("table.md", "negatives_vs_m.png", "negatives_vs_k.png", "reward_vs_kl.png", "slope1.png"):
        assert (out / name).stat().st_size > 500, name
    table = (out / "table.md").read_text()
    assert "| EPA K=3 M=2 | 3 | 2 |" in table and "| DPO | – | – |" in table


def test_sweep_rerun_trains_nothing(negatives_sweep, capsys):
    out, argv = negatives_sweep
    before = _trained(out)
    assert len(before) == 4
    main(argv)
    assert _trained(out) == before
    assert "EPA K=3 M=2 vs DPO" in capsys.readouterr().out
    # A setting added to the grid trains that setting alone.
    main([*argv[:5], "0", "2", "4", *argv[7:]])
    after = _trained(out)
    assert len(after) == 5 and {k: after[k] for k in before} == before


def test_practical_sweep_settings(tmp_path):
    """The grid: DPO and EPA at each α, each also with the SFT term, then again on the longer
    reference; read back from the results of a tiny run without the SFT term (weight 0)."""
    from epa_ext.experiment.sweep import practical_settings

    cfg = ExperimentConfig()
    settings = {s.name: s for s in practical_settings(cfg)}
    assert list(settings) == ["dpo", "epa_k3_m4_a0.25", "epa_k3_m4_a0.5", "epa_k3_m4_a1", "dpo_sft",
                              "epa_k3_m4_a0.25_sft", "epa_k3_m4_a0.5_sft", "epa_k3_m4_a1_sft", "dpo_longref",
                              "epa_k3_m4_a1_longref", "dpo_sft_longref", "epa_k3_m4_a1_sft_longref"]
    assert settings["dpo_sft"].label == "DPO + SFT 1 (RPO)" and settings["dpo_sft"].cfg.sft_weight == 1.0
    assert settings["epa_k3_m4_a0.25"].cfg.weak_weight == 0.25 and settings["epa_k3_m4_a0.25"].cfg.sft_weight == 0
    assert settings["epa_k3_m4_a1_longref"].cfg.reference.steps == 3200
    assert settings["dpo"].cfg.reference.steps == 800

    main(["--sweep", "practical", "--output-dir", str(tmp_path), "--practical-weak-weights", "0.5",
          "--practical-sft-weight", "0", "--practical-long-reference-steps", "30",
          "--practical-long-reference-weak-weights", "0.5", *TINY])
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["settings"]) == ["dpo", "epa_k3_m4_a0.5", "dpo_longref", "epa_k3_m4_a0.5_longref"]
    for name, setting in results["settings"].items():
        (run,) = results["runs"][name]
        reference = results["references"][setting["reference"]]
        assert reference["steps"] == setting["reference_steps"] == (30 if name.endswith("longref") else 20)
        assert run["train_config"]["model"].endswith(f"reference-{setting['reference'][:8]}")
        if setting["method"]["loss"] == "epa":
            assert run["train_config"]["weak_weight"] == setting["weak_weight"] == 0.5
    assert len(results["references"]) == 2


def test_convergence_sweep_curves(tmp_path):
    main(["--sweep", "convergence", "--output-dir", str(tmp_path), "--methods", "dpo", "epa_k1_m2", "--eval-every",
          "4", *TINY])
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("dpo", "epa_k1_m2"):
        (run,) = results["runs"][name]
        assert [p["step"] for p in run["curve"]] == [4, 8]
        assert run["curve"][-1]["slope1_error"] == run["slope1_error"]  # the final point is the final policy
        assert run["train_config"]["scheduler"] == "constant" and run["train_config"]["save_steps"] == 4
    assert not list(tmp_path.glob("runs/*/checkpoint-*"))  # evaluated, then removed
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "| step | ε̂ ↓ |" in (tmp_path / "table.md").read_text()


# --- the ipm data model and where weak negatives come from --------------------------------------------


def _letter_counts(task: KnownRewardTask, texts: list[str], num_prompts: int) -> torch.Tensor:
    """[num_prompts, A] letter counts of answers written as text, the rows prompt-major."""
    index = {letter: i for i, letter in enumerate(task.letters)}
    per_prompt = len(texts) // num_prompts
    counts = torch.zeros(num_prompts, task.spec.alphabet_size, dtype=torch.float64)
    for row, text in enumerate(texts):
        for letter in text.split():
            counts[row // per_prompt, index[letter]] += 1
    return counts


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum(dim=1, keepdim=True) * probs
    return float(((counts - expected) ** 2 / expected).sum())


def _chi_square_bound(df: int) -> float:
    """The chi-square distribution's 1 - 1e-4 quantile (Wilson-Hilferty): a correct sampler
    exceeds it once in 10,000 seeds."""
    return df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3


def test_ipm_answers_follow_the_tilted_law(tmp_path):
    """--data-model ipm: per prompt, the chosen answers' letters follow base·exp(r*/τ)/Z normalised
    per letter (its closed form), the rejected answers' letters the base distribution: a chi-square
    test of the letter counts (3 prompts x 4000 rows x 6 letters, seeded) against each law. The
    bound has power: the chosen answers of pool data (a softmax choice among 4 base samples, pool
    data from a perfect reference) and the same sampler with another τ fail it."""
    task, tau, num_prompts, per_prompt = KnownRewardTask(), 0.7, 3, 4000
    generator = torch.Generator().manual_seed(0)
    prompts = task.sample_prompts(num_prompts, generator)
    repeated = prompts.repeat_interleave(per_prompt, dim=0)
    summary = write_preferences(tmp_path / "ipm.jsonl", task, None, repeated, 4, tau, generator, data_model="ipm")
    rows = [json.loads(line) for line in (tmp_path / "ipm.jsonl").read_text().splitlines()]
    assert len(rows) == num_prompts * per_prompt and all(len(r["rejected"]) == 3 for r in rows)
    # epa-train data; a base sample can repeat the chosen answer (then its row is dropped, as with pool data)
    examples, _ = parse_rows(rows, source="ipm.jsonl", skip_bad_rows=True)
    assert len(examples) > 0.99 * len(rows)
    assert summary["candidates"] == 4 and 0 < summary["chosen_is_best"] < 1
    first = rows[0]
    letters = torch.tensor([[task.letters.index(c) for c in first["chosen"].split()]])
    assert first["true_rewards"]["chosen"] == pytest.approx(float(task.reward(prompts[:1], letters)))

    bound = _chi_square_bound(num_prompts * (task.spec.alphabet_size - 1))
    chosen = _letter_counts(task, [r["chosen"] for r in rows], num_prompts)
    assert _chi_square(chosen, task.tilted_letter_probs(prompts, tau)) < bound
    for k in range(3):
        rejected = _letter_counts(task, [r["rejected"][k] for r in rows], num_prompts)
        assert _chi_square(rejected, task.base_letter_probs(prompts)) < bound
    # The bound fails the wrong laws: another tilt, and pool data's chosen answers.
    assert _chi_square(chosen, task.tilted_letter_probs(prompts, 1.0)) > 10 * bound
    assert _chi_square(chosen, task.base_letter_probs(prompts)) > 10 * bound
    candidates = task.sample_base_answers(repeated.repeat_interleave(4, dim=0), generator).view(-1, 4, 6)
    rewards = task.reward(repeated.repeat_interleave(4, dim=0), candidates.flatten(0, 1)).view(-1, 4)
    pick = torch.multinomial(torch.softmax(rewards / tau, dim=1), 1, generator=generator).squeeze(1)
    pool = _letter_counts(task, [task.text(a) for a in candidates[torch.arange(len(pick)), pick]], num_prompts)
    assert _chi_square(pool, task.tilted_letter_probs(prompts, tau)) > 10 * bound
    with pytest.raises(ValueError, match="data_model must be one of"):
        write_preferences(tmp_path / "x.jsonl", task, None, prompts, 4, tau, generator, data_model="tilted")


def test_tilted_law_is_the_enumerated_one():
    """tilted_letter_probs over a whole answer is π_base·exp(r*/β)/Z enumerated over all answers."""
    task = KnownRewardTask(TaskSpec(alphabet_size=4, prompt_length=2, answer_length=2))
    prompts = task.sample_prompts(2, torch.Generator().manual_seed(0))
    answers = torch.tensor(list(itertools.product(range(4), repeat=2)))
    for i in range(2):
        prompt = prompts[i:i + 1].expand(len(answers), -1)
        base = task.base_letter_probs(prompt).gather(1, answers).prod(dim=1)
        joint = base * torch.exp(task.reward(prompt, answers) / 0.5)
        per_letter = task.tilted_letter_probs(prompts[i:i + 1], 0.5)[0]
        torch.testing.assert_close(per_letter[answers].prod(dim=1), joint / joint.sum())


def test_pool_data_and_todays_runs_keep_their_keys():
    """The defaults (--data-model pool, --weak-source any) leave every cache key as it was, so
    finished runs are reused; ipm data and the rejected source get keys of their own."""
    from epa_ext.experiment.pipeline import Setting, _data_key, _key, reference_key, run_key

    cpu = torch.device("cpu")
    cfg = ExperimentConfig()
    assert _data_key(cfg, 0, cpu) == _key(reference_key(cfg, cpu), 0, cfg.train_prompts, cfg.candidates,
                                          cfg.temperature)
    ipm = dataclasses.replace(cfg, data_model="ipm")
    assert _data_key(ipm, 0, cpu) != _data_key(cfg, 0, cpu)
    method = parse_method("epa_k3_m4")
    todays = _key(_data_key(cfg, 0, cpu), "epa", 3, 4, cfg.steps, cfg.batch_size, cfg.lr, cfg.scheduler, cfg.beta,
                  cfg.weak_weight, cfg.sft_weight, cfg.eval_prompts, cfg.eval_candidates, cfg.policy_samples,
                  cfg.eval_every)
    assert run_key(Setting("s", "s", method, cfg), 0, cpu) == todays
    rejected = dataclasses.replace(cfg, weak_source="rejected")
    assert run_key(Setting("s", "s", method, rejected), 0, cpu) != todays
    m0 = parse_method("epa_k3")  # no weak negatives: the source changes nothing
    assert run_key(Setting("s", "s", m0, rejected), 0, cpu) == run_key(Setting("s", "s", m0, cfg), 0, cpu)


def test_ipm_run_with_weak_negatives_from_rejected_answers(tmp_path):
    """epa-demo --data-model ipm --weak-source rejected: the data are ipm rows and epa-train
    trains with the source asked for (and the exact q of --weak-correction exact)."""
    main(["--output-dir", str(tmp_path), "--methods", "epa_k3_m2", "--data-model", "ipm", "--weak-source",
          "rejected", "--weak-correction", "exact", *TINY])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["data_model"] == "ipm"
    (run,) = results["runs"]["epa_k3_m2"]
    trained = run["train_config"]
    assert (trained["weak_source"], trained["weak_correction"], trained["num_weak"]) == ("rejected", "importance", 2)
    assert math.isfinite(run["slope1_error"])
    (data,) = tmp_path.glob("data/seed0-*/preferences.jsonl")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 96 and all(len(r["rejected"]) == 3 for r in rows)


def test_ipm_sweep_has_the_settings_its_plan_fixes():
    """--sweep ipm lists what docs/known_reward/sweeps/README.md ("ipm sweep") fixed before any run:
    ipm data, weak negatives from rejected answers, 512 prompts, batch 4, 1000 steps (as amended after
    the convergence check), lr 3e-4, 3 seeds; DPO, then EPA K = 1 and 3 at M = 0 and at M in {1, 4, 16, 64, 256} under each variant
    (EPA K = 1 M = 0, DPO's loss, once as DPO). Its table has K, M and the correction. Nothing is
    trained."""
    from epa_ext.experiment.sweep import SWEEPS, sweep_defaults, sweep_markdown

    cfg = sweep_defaults("ipm")
    cfg.validate()
    assert (cfg.data_model, cfg.weak_source, cfg.train_prompts, cfg.batch_size, cfg.steps, cfg.lr, cfg.seeds) == \
        ("ipm", "rejected", 512, 4, 1000, 3e-4, [0, 1, 2])
    settings = SWEEPS["ipm"].settings(cfg)
    variants = ("none", "exact", "estimated")
    expected = ["dpo"] + [name for k in (1, 3) for m in (0, 1, 4, 16, 64, 256) if (k, m) != (1, 0)
                          for name in ([f"epa_k{k}_m0"] if m == 0 else [f"epa_k{k}_m{m}_{v}" for v in variants])]
    assert [s.name for s in settings] == expected and len(settings) == 32
    for setting in settings:
        variant = setting.name.rsplit("_", 1)[1] if setting.method.num_weak else "none"
        assert setting.cfg.weak_correction == variant and setting.cfg.data_model == "ipm"
    assert settings[-1].label == "EPA K=3 M=256, estimated q"

    results = {"sweep": "ipm", "config": dataclasses.asdict(cfg), "seconds": 1.0, "device": "cpu",
               "settings": {s.name: {"label": s.label, "method": dataclasses.asdict(s.method),
                                     "weak_correction": s.cfg.weak_correction} for s in settings[:3]},
               "summary": {s.name: {metric: [0.5, 0.1] for metric in ("reward", "reward_well_formed", "malformed",
                                                                        "kl", "accuracy", "rho", "slope1_error",
                                                                        "slope")} for s in settings[:3]}}
    table = sweep_markdown(results)
    assert "| setting | K | M | correction |" in table
    assert "| DPO | – | – | – |" in table and "| EPA K=1 M=1, exact q | 1 | 1 | exact q |" in table


# --- ε̂'s split into slope part and residual (issue 36), the sweeps' tables and the ipm plot --------------------


def test_slope1_error_splits_into_slope_part_and_residual():
    """ε̂ = (slope − 1)²·V + R exactly, V = mean_x Var_k r* (1/C), R >= 0; R = 0 when r_θ = b·r* +
    C(x); per-prompt slopes that differ leave R > 0; a flat r* puts all of ε̂ in R. slope1_split
    gives the same parts from the stored ε̂ and slope."""
    generator = torch.Generator().manual_seed(0)
    true = torch.randn(50, 8, generator=generator, dtype=torch.float64)
    variance = float(true.var(dim=1, unbiased=False).mean())
    per_prompt_slope = 0.3 + 0.6 * torch.rand(50, 1, generator=generator, dtype=torch.float64)  # pooled about 0.6
    noisy = per_prompt_slope * true + 0.3 * torch.randn(50, 8, generator=generator, dtype=torch.float64) + \
        torch.randn(50, 1, generator=generator, dtype=torch.float64)
    m = slope1_metrics(noisy, true)
    assert m["true_variance"] == pytest.approx(variance, rel=1e-12)
    assert m["slope_part"] == pytest.approx((m["slope"] - 1) ** 2 * variance, rel=1e-12)
    assert m["slope_part"] + m["residual"] == pytest.approx(m["slope1_error"], abs=1e-12)
    assert m["residual"] > 0.05 and m["slope_part"] > 0.01  # both parts present here
    # A common slope b and per-prompt shifts: nothing but the slope part.
    scaled = slope1_metrics(1.3 * true + torch.randn(50, 1, generator=generator, dtype=torch.float64), true)
    assert scaled["slope"] == pytest.approx(1.3) and scaled["residual"] >= 0
    assert scaled["residual"] == pytest.approx(0.0, abs=1e-12)
    assert scaled["slope_part"] == pytest.approx(0.09 * variance, rel=1e-9) == scaled["slope1_error"]
    from epa_ext.experiment.metrics import slope1_split

    assert slope1_split(m["slope1_error"], m["slope"], m["true_variance"]) == pytest.approx(
        (m["slope_part"], m["residual"]), abs=1e-12)
    flat = slope1_metrics(torch.randn(4, 3, generator=generator), torch.ones(4, 3))
    assert math.isnan(flat["slope"]) and flat["slope_part"] == 0 and flat["residual"] == flat["slope1_error"] > 0
    assert slope1_split(0.4, float("nan"), 0.0) == (0.0, 0.4)
    with pytest.raises(ValueError, match="true_variance"):
        slope1_split(0.4, 1.0, -1.0)


def _synthetic_sweep_results(sweep: str, cfg: ExperimentConfig) -> dict:
    """What run_settings returns for the sweep's settings on seeds 0 and 1, with made-up numbers
    and, like runs evaluated before the split existed, no slope_part or residual: per setting
    slope 0.8 and 1.2, ε̂ 0.2 and 0.3, V = 1.5 (the reference's ε̂). So the split is 0.06 and 0.06
    (slope part), 0.14 and 0.24 (residual)."""
    from epa_ext.experiment.config import METRICS
    from epa_ext.experiment.pipeline import mean_std
    from epa_ext.experiment.sweep import SWEEPS

    settings = SWEEPS[sweep].settings(cfg)
    shared = {"reward": 1.0, "reward_well_formed": 2.0, "malformed": 0.1, "kl": 1.0, "accuracy": 0.9, "rho": 0.95}
    per_seed = ({"slope": 0.8, "slope1_error": 0.2}, {"slope": 1.2, "slope1_error": 0.3})
    runs = {s.name: [{"seed": seed, **shared, **numbers, "curve": [{"step": cfg.steps, **shared, **numbers}]}
                     for seed, numbers in zip((0, 1), per_seed)] for s in settings}
    reference = {"slope1_error": 1.5, "slope": 0.0, "reward": 0.5, "reward_well_formed": 1.0, "malformed": 0.05}
    results = {"sweep": sweep, "config": {**dataclasses.asdict(cfg), "seeds": [0, 1]}, "device": "cpu",
               "seconds": 1.0, "references": {"ref": reference}, "reference": reference,
               "optimum": {"beta": 1.0, "reward": 3.0, "kl": 2.0}, "frontier": [{"reward": 3.0, "kl": 2.0}],
               "settings": {s.name: {"label": s.label, "method": dataclasses.asdict(s.method), "reference": "ref",
                                     "steps": s.cfg.steps, "weak_weight": s.cfg.weak_weight,
                                     "sft_weight": s.cfg.sft_weight, "weak_correction": s.cfg.weak_correction,
                                     "reference_steps": s.cfg.reference.steps} for s in settings},
               "runs": runs, "summary": {name: {metric: mean_std([r[metric] for r in per_name]) for metric in METRICS}
                                        for name, per_name in runs.items()}}
    if sweep == "weak-correction":
        results["weak_correction"] = {"predicted_slope_uncorrected": {str(m): 1.1 for m in
                                                                      cfg.weak_correction_grid.num_weak}}
    return results


@pytest.mark.parametrize("sweep", ["convergence", "negatives", "practical", "weak-correction", "ipm"])
def test_every_sweep_table_has_the_split_filled_in_for_old_runs(sweep, tmp_path):
    """render_sweep_table on a results.json without the split (as the committed sweeps' are):
    every setting's row has ε̂, its slope part and residual (mean ± std over seeds) and the slope;
    results.json itself is left as it was."""
    from epa_ext.experiment.sweep import render_sweep_table, sweep_defaults

    results = _synthetic_sweep_results(sweep, sweep_defaults(sweep))
    (tmp_path / "results.json").write_text(json.dumps(results))
    written = (tmp_path / "results.json").read_text()
    table = render_sweep_table(tmp_path).read_text()
    assert "| ε̂ ↓ | ε̂ slope part | ε̂ residual | slope |" in table
    (main_table,) = [block for block in table.split("\n\n") if "| ε̂ slope part |" in block]
    assert len(main_table.splitlines()) == 2 + len(results["settings"])
    for setting in results["settings"].values():
        (row,) = [line for line in main_table.splitlines() if line.startswith(f"| {setting['label']} |")]
        assert row.endswith("| 0.250 ± 0.071 | 0.060 ± 0.000 | 0.190 ± 0.071 | 1.00 ± 0.28 |"), row
    assert (tmp_path / "results.json").read_text() == written


def test_a_run_that_carries_its_split_keeps_it():
    from epa_ext.experiment.sweep import add_slope1_split, sweep_defaults

    results = _synthetic_sweep_results("negatives", sweep_defaults("negatives"))
    results["runs"]["dpo"][0].update(slope_part=0.01, residual=0.19)
    add_slope1_split(results)
    assert results["runs"]["dpo"][0]["slope_part"] == 0.01 and results["runs"]["dpo"][1]["slope_part"] == \
        pytest.approx(0.06)
    assert results["summary"]["dpo"]["residual"][0] == pytest.approx((0.19 + 0.24) / 2)


def test_ipm_sweep_writes_eps_vs_m_and_predicted_against_measured(tmp_path, monkeypatch):
    """run_sweep('ipm') over finished runs (run_settings replaced by the synthetic results, so
    nothing trains): results.json gets the split, table.md the predictions next to the measured
    numbers (the design note's population ε scaled to ε̂ on 8 candidates by 7/8), and
    eps_vs_m.png is drawn; a setting the results lack is "not run" in the table and left out of
    the plot."""
    from epa_ext.experiment import sweep as sweep_module
    from epa_ext.experiment.plots import plot_ipm
    from epa_ext.experiment.report import ipm_predictions_markdown

    cfg = dataclasses.replace(sweep_module.sweep_defaults("ipm"), output_dir=str(tmp_path), seeds=[0, 1])
    monkeypatch.setattr(sweep_module, "run_settings", lambda base, settings: _synthetic_sweep_results("ipm", base))
    results, paths = sweep_module.run_sweep("ipm", cfg)
    assert tmp_path / "eps_vs_m.png" in paths and (tmp_path / "eps_vs_m.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "eps_vs_m.png").stat().st_size > 20_000
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["runs"]["epa_k3_m64_exact"][1]["residual"] == pytest.approx(0.24)
    assert stored["summary"]["dpo"]["slope_part"] == pytest.approx([0.06, 0.0])
    table = (tmp_path / "table.md").read_text()
    assert "| ε̂ slope part | ε̂ residual |" in table
    assert "| K = 3, exact q | EPA K=3 M=1, exact q | 1.04, 0.005 | 0.004375 | 0.073 | 1.00 ± 0.28 | 0.250 ± 0.071 " \
           "| 0.190 ± 0.071 | a hump" in table
    assert "|  | EPA K=3 M=256, exact q | 1.01, 0.0003 | 0.0002625 | 0.045 |" in table
    assert "| EPA K = 3 M = 0 | EPA K=3 M=0 | 1.00, 0 | 0 | 0.070 |" in table

    del results["summary"]["epa_k1_m256_exact"], results["settings"]["epa_k1_m256_exact"]
    assert "| K = 1, exact q, M = 256 | epa_k1_m256_exact | – | – | 0.045 | not run | not run | not run |" in \
        ipm_predictions_markdown(results)
    partial = tmp_path / "partial"
    partial.mkdir()
    assert plot_ipm(results, partial)[0].stat().st_size > 20_000
