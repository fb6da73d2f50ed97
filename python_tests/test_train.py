"""epa-train end to end on a tiny Llama-architecture model and our own fixture data: what a run
writes, resume, the reference (model, precomputed, LoRA), gradient checkpointing, an evaluation
set, TRL's metric names and TensorBoard. Several processes (DDP, FSDP2): test_train_distributed.py."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (HH_RLHF, NEEDS_HH_RLHF, PREFS, TINY, epa_train_command, final_weights, initial_tiny_model,
                      last_line, read_metrics, train_in_process, train_losses)
from numerics import TOLERANCES, assert_paths_agree

RTOL, ATOL = TOLERANCES[torch.float32]  # two runs whose reductions are ordered differently
TRL_METRICS = {"step", "epoch", "loss", "learning_rate", "grad_norm", "num_tokens", "tokens_per_second",
               "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "logits/chosen", "logits/rejected"}


def assert_same_weights(a: Path, b: Path, **tolerance) -> None:
    first, second = final_weights(a), final_weights(b)
    assert first.keys() == second.keys()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, **(tolerance or {"rtol": 0, "atol": 0}), msg=key)


def mean_chosen_logps(model, out: Path, dataset: Path, *extra: str) -> float:
    """The mean summed log-prob of the chosen answers of the examples epa-train evaluates on
    (the held-out split of its options), under model: computed here from the package's data
    functions and a plain forward pass with full logits."""
    from epa_ext import sequence_logps
    from epa_ext.train.config import parse_config
    from epa_ext.train.runtime import Runtime
    from epa_ext.train.trainer import prepare_data

    cfg = parse_config(["--dataset", str(dataset), "--output-dir", str(out.parent / "scratch"), *TINY, *extra])
    data = prepare_data(cfg, Runtime(0, 1, torch.device("cpu")), None)
    from epa_ext.preference.candidates import make_batch

    batch = make_batch(data.held_out, list(range(len(data.held_out.examples))), data.layout, torch.device("cpu"))
    rows = len(data.held_out.examples)  # candidate 0 (chosen) of every example comes first
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids[:rows], attention_mask=batch.attention_mask[:rows]).logits
    return sequence_logps(logits, batch.labels[:rows]).mean().item()


@pytest.mark.parametrize("loss", ["epa", "dpo"])
def test_a_few_steps_train_and_write_everything(loss, tmp_path):
    extra = ["--num-weak", "2"] if loss == "epa" else ["--dpo-loss-type", "ipo"]
    out = tmp_path / "run"
    records = train_in_process(out, "--loss", loss, "--max-steps", "4", "--batch-size", "4", "--eval-fraction",
                               "0.1", *extra)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for record in train_records:
        assert TRL_METRICS <= record.keys() and "lr" not in record
        assert all(math.isfinite(v) for v in record.values())
    assert ("rewards/weak" in train_records[0]) == (loss == "epa")
    tokens = [r["num_tokens"] for r in train_records]  # cumulative, as TRL's
    assert tokens[0] > 0 and all(b > a for a, b in zip(tokens, tokens[1:]))
    evaluation = [r for r in records if "eval/loss" in r]
    assert len(evaluation) == 1 and {f"eval/{k}" for k in TRL_METRICS - {"step", "epoch", "learning_rate", "grad_norm",
                                                                         "num_tokens", "tokens_per_second"}} <= evaluation[0].keys()
    for name in ("metrics.jsonl", "config.json", "training_curves.png", "final/model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["loss"] == loss

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    initial = initial_tiny_model(out)
    changed = [not torch.equal(p, initial.state_dict()[k]) for k, p in model.state_dict().items()]
    assert any(changed), "no parameter changed"
    assert torch.isfinite(model(**tokenizer("hello", return_tensors="pt")).logits).all()


def test_the_saved_tokenizer_encodes_a_prompt_as_training_did(tmp_path):
    """Training puts BOS in front of every prompt; tokenizer(prompt) of final/ must do the same."""
    from transformers import AutoTokenizer

    from epa_ext.train.batching import tokenize
    from epa_ext.train.data import DropReport, PreferenceExample

    out = tmp_path / "run"
    train_in_process(out, "--max-steps", "1", "--eval-fraction", "0")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    prompt = "How do I boil an egg?"
    [trained] = tokenize([PreferenceExample(prompt, " Boil it.", (" No.",))], tokenizer, max_length=64,
                         max_prompt_length=32, report=DropReport())
    assert trained.prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer(prompt)["input_ids"] == trained.prompt_ids


def test_a_gpt2_style_tokenizer_is_saved_to_add_the_bos_training_added(tmp_path):
    """A tokenizer whose default encoding adds no BOS (GPT-2's) is switched to add it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from epa_ext.train.modeling import match_training_encoding

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["hello world"], trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>"],
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                                 show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    plain = tokenizer("hello", add_special_tokens=False)["input_ids"]
    assert tokenizer("hello")["input_ids"] == plain  # no BOS by default
    assert match_training_encoding(tokenizer)
    tokenizer.save_pretrained(tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok")("hello")["input_ids"] == [tokenizer.bos_token_id, *plain]


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path):
    from epa_ext.train.checkpoint import checkpoints

    args = ["--max-steps", "24", "--save-steps", "3", "--batch-size", "2", "--num-weak", "1", "--eval-fraction", "0.1"]
    full = tmp_path / "full"
    full_records = train_in_process(full, *args)

    out = tmp_path / "killed"
    command = epa_train_command(out, *args)
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint-3" / "trainer_state.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (out / "checkpoint-3" / "trainer_state.pt").is_file(), "killed before the first checkpoint"
    assert not (out / "final").exists()
    written_before = {r["step"]: r for r in read_metrics(out)}
    resumed_from = checkpoints(out)[-1][0]

    result = subprocess.run(command + ["--resume"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 25))  # no step missing or twice
    # the lines up to the checkpoint it resumed from are the killed run's, kept (timings included):
    # a resume that started over would have rewritten them
    assert resumed_from >= 3
    assert min(s for s in range(1, 25) if resumed[s - 1] != written_before.get(s)) == resumed_from + 1
    assert train_losses(resumed) == train_losses(full_records)  # bitwise: the same batches, RNG and state
    assert_same_weights(full, out)


def test_precomputed_reference_equals_reference_model(tmp_path):
    args = ["--max-steps", "3", "--batch-size", "4", "--num-weak", "1", "--eval-fraction", "0.1"]
    with_model = train_in_process(tmp_path / "model", *args, "--ref", "model")
    precomputed = train_in_process(tmp_path / "precompute", *args, "--ref", "precompute")
    assert len(list((tmp_path / "precompute").glob("reference_logps-train-*.pt"))) == 1
    assert train_losses(precomputed) == pytest.approx(train_losses(with_model), rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("table,flags", [("reference_logps", ["--ref", "precompute"]),
                                         ("weak_log_weights", ["--weak-correction", "importance"])])
def test_a_cached_table_is_not_reused_for_another_max_length(table, flags, tmp_path, capsys):
    """Issue 37: --max-length cuts the weak answers borrowed under another prompt, also where it
    leaves every example's own tokens alone (the fixture's longest example has 96 tokens, a prompt
    and another example's answer up to 104). A second run in the same directory with another
    --max-length (--overwrite-output-dir keeps the cached tables) computes its table again, says
    why in one line, and trains as a run in a fresh directory does."""
    args = ["--max-steps", "3", "--batch-size", "4", "--num-weak", "4", "--eval-fraction", "0", *flags]
    out = tmp_path / "run"
    train_in_process(out, *args, "--max-length", "96")
    (first_table,) = out.glob(f"{table}-train-*.pt")
    capsys.readouterr()
    second = train_in_process(out, *args, "--max-length", "120", "--overwrite-output-dir")
    said = [line for line in capsys.readouterr().err.splitlines() if "not reusing the cached table" in line]
    fresh = train_in_process(tmp_path / "fresh", *args, "--max-length", "120")
    assert not [line for line in capsys.readouterr().err.splitlines() if "not reusing" in line]
    assert train_losses(second) == train_losses(fresh)
    (fresh_table,) = (tmp_path / "fresh").glob(f"{table}-train-*.pt")
    assert not torch.equal(torch.load(first_table), torch.load(fresh_table))  # the borrowed answers were cut
    (line,) = [line for line in said if "(train)" in line]
    assert line.endswith(f"not reusing the cached table: {first_table.name} was computed for other inputs: "
                         f"--max-length 96 -> 120, scored token ids (changed); computing it for this run"), line


@pytest.mark.parametrize("table,flags", [("reference_logps", ["--ref", "precompute"]),
                                         ("weak_log_weights", ["--weak-correction", "importance"])])
def test_a_damaged_cached_table_is_computed_again(table, flags, tmp_path, capsys):
    """A cached table cut short (a copy interrupted, a full disk) is not loaded with a traceback:
    the run says so in one line, computes it again and trains as the first run did."""
    args = ["--max-steps", "2", "--batch-size", "4", "--num-weak", "2", "--eval-fraction", "0", *flags]
    out = tmp_path / "run"
    first = train_in_process(out, *args)
    (cached,) = out.glob(f"{table}-train-*.pt")
    cached.write_bytes(cached.read_bytes()[:100])
    capsys.readouterr()
    again = train_in_process(out, *args, "--overwrite-output-dir")
    said = [line for line in capsys.readouterr().err.splitlines() if "cannot be used" in line]
    assert len(said) == 1 and str(cached) in said[0] and said[0].endswith("computing it again"), said
    assert train_losses(again) == train_losses(first)
    assert torch.load(cached, weights_only=True).dim() == 2


def test_a_cached_tables_fingerprint_covers_what_determines_it(tmp_path):
    """Issue 37: besides --max-length (above), the precision, packing and seed change a cached
    table's fingerprint, and so do a model directory's weights rewritten with the same size and
    modification time (small files are hashed by content)."""
    import os

    from epa_ext.train.config import parse_config
    from epa_ext.train.modeling import build_tiny_model
    from epa_ext.train.reference import Reference, fingerprint, model_inputs
    from epa_ext.train.runtime import Runtime
    from epa_ext.train.trainer import prepare_data

    runtime = Runtime(0, 1, torch.device("cpu"))

    def key(*flags: str) -> str:
        cfg = parse_config(["--dataset", str(PREFS), "--output-dir", str(tmp_path / "out"), *TINY, "--num-weak", "4",
                            "--eval-fraction", "0", *flags])
        data = prepare_data(cfg, runtime, None)
        return fingerprint(Reference(cfg, runtime, None, None, None).table_inputs(data.train, data.layout, "values"))

    keys = [key(), *(key(*flags) for flags in (["--precision", "bf16"], ["--padding-free"], ["--seed", "1"]))]
    assert len(set(keys)) == len(keys), keys

    model_dir = tmp_path / "model"
    build_tiny_model(300, 32, 1, 104, seed=0).save_pretrained(model_dir)
    weights = model_dir / "model.safetensors"
    cfg = parse_config(["--dataset", str(PREFS), "--output-dir", str(tmp_path / "out"), "--model", str(model_dir)])
    before, written = model_inputs(cfg), weights.stat()
    build_tiny_model(300, 32, 1, 104, seed=1).save_pretrained(model_dir)
    os.utime(weights, ns=(written.st_atime_ns, written.st_mtime_ns))  # as a copy keeping times (cp -p) leaves it
    assert weights.stat().st_size == written.st_size
    assert model_inputs(cfg)["model files"] != before["model files"]


def test_lora_trains_adapters_and_final_loads(tmp_path):
    """The adapters change, the base weights do not, and pi_ref is the policy with its adapters
    disabled: the logged eval rewards are beta * (policy - initial model) log-probs."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    args = ["--batch-size", "4", "--eval-fraction", "0.2", "--lr", "1e-2"]
    records = train_in_process(out, "--max-steps", "3", "--save-steps", "2", "--lora-r", "4", *args)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)

    adapters = load_file(out / "checkpoint-2" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapters.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b), "LoRA B starts at 0; training must change it"
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in name for name in final.state_dict())
    initial = initial_tiny_model(out)
    untouched = [k for k in initial.state_dict() if "embed_tokens" in k or "norm" in k or "lm_head" in k]
    assert untouched
    for key in untouched:  # LoRA wraps the linear layers only; merging changes nothing else
        assert torch.equal(final.state_dict()[key], initial.state_dict()[key]), key
    merged_linear = [k for k in initial.state_dict() if k.endswith("q_proj.weight")]
    assert all(not torch.equal(final.state_dict()[k], initial.state_dict()[k]) for k in merged_linear)

    [evaluation] = [r for r in records if "eval/loss" in r]
    policy = mean_chosen_logps(final, out, PREFS, *args)
    reference = mean_chosen_logps(initial, out, PREFS, *args)
    assert_paths_agree(evaluation["eval/logps/chosen"], policy, what="eval/logps/chosen")
    assert abs(policy - reference) > 1e-2  # the check below can tell the two apart
    assert_paths_agree(evaluation["eval/rewards/chosen"], 0.1 * (policy - reference), what="eval/rewards/chosen",
                       inputs_scale=0.1 * max(abs(policy), abs(reference)))


@pytest.mark.parametrize("loss", ["dpo", "epa"])
def test_sft_weight_adds_the_chosen_answers_nll(loss, tmp_path):
    """--sft-weight lambda (RPO): at step 1 the policy is the reference, so the loss with lambda
    exceeds the loss without by lambda * the chosen answers' NLL averaged over their tokens."""
    from epa_ext import IGNORE_INDEX
    from epa_ext.preference.candidates import make_batch
    from epa_ext.train.batching import micro_batch_ids
    from epa_ext.train.config import parse_config
    from epa_ext.train.runtime import Runtime
    from epa_ext.train.trainer import prepare_data

    args = ["--loss", loss, "--max-steps", "1", "--batch-size", "4", "--eval-fraction", "0"]
    [plain] = [r for r in train_in_process(tmp_path / "plain", *args) if "loss" in r]
    [rpo] = [r for r in train_in_process(tmp_path / "rpo", *args, "--sft-weight", "0.5") if "loss" in r]
    cfg = parse_config(["--dataset", str(PREFS), "--output-dir", str(tmp_path / "scratch"), *TINY, *args])
    data = prepare_data(cfg, Runtime(0, 1, torch.device("cpu")), None)
    batch = make_batch(data.train, micro_batch_ids(len(data.train.examples), 4, 0, 0), data.layout,
                       torch.device("cpu"))
    chosen_tokens = (batch.labels[:4] != IGNORE_INDEX).sum().item()
    nll = -rpo["logps/chosen"] * 4 / chosen_tokens
    assert_paths_agree(rpo["loss"] - plain["loss"], 0.5 * nll, what="the SFT term", inputs_scale=abs(rpo["loss"]))
    assert rpo["rewards/margins"] == plain["rewards/margins"]


def test_eval_dataset_is_what_is_evaluated(tmp_path):
    """--eval-dataset: the training data is not split, and the eval/ metrics are those of the
    given file (checked against the logps computed here), under TRL's names."""
    from transformers import AutoModelForCausalLM

    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(PREFS.read_text().splitlines(keepends=True)[:12]))
    out = tmp_path / "run"
    records = train_in_process(out, "--max-steps", "2", "--batch-size", "4", "--eval-dataset", str(eval_file),
                               "--eval-steps", "1")
    evaluations = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evaluations] == [1, 2]
    assert "eval/rewards/accuracies" in evaluations[-1] and "eval/logits/chosen" in evaluations[-1]
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    computed = mean_chosen_logps(final, out, PREFS, "--eval-dataset", str(eval_file))
    assert_paths_agree(evaluations[-1]["eval/logps/chosen"], computed, what="eval/logps/chosen")
    # nothing of --dataset is held out: one epoch of 40 examples in batches of 4 is 10 steps
    assert train_in_process(tmp_path / "epoch", "--batch-size", "4", "--eval-dataset", str(eval_file))[-2]["step"] == 10


def test_gradient_checkpointing_gives_the_same_losses_and_weights(tmp_path):
    args = ["--max-steps", "3", "--batch-size", "4", "--num-weak", "1", "--eval-fraction", "0"]
    plain = train_in_process(tmp_path / "plain", *args)
    checkpointed = train_in_process(tmp_path / "checkpointed", *args, "--gradient-checkpointing")
    assert train_losses(checkpointed) == pytest.approx(train_losses(plain), rel=RTOL, abs=ATOL)
    assert_same_weights(tmp_path / "plain", tmp_path / "checkpointed", rtol=RTOL, atol=ATOL)


def test_gradient_checkpointing_recomputes_the_decoder_layers(tmp_path, monkeypatch):
    """Not a no-op: a decoder layer's attention runs twice in a training step."""
    from epa_ext.train import modeling, trainer

    calls = []

    def enable_and_count(policy):
        modeling.enable_gradient_checkpointing(policy)
        modeling.unwrap(policy).base_model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))

    monkeypatch.setattr(trainer, "enable_gradient_checkpointing", enable_and_count)
    train_in_process(tmp_path / "run", "--max-steps", "1", "--batch-size", "4", "--eval-fraction", "0",
                     "--gradient-checkpointing")
    assert len(calls) == 2  # the forward, and its recomputation in backward


def test_tensorboard_has_the_metrics_under_trainers_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    records = train_in_process(out, "--max-steps", "3", "--batch-size", "4", "--eval-fraction", "0.1",
                               "--report-to", "tensorboard")
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/rewards/accuracies", "eval/loss", "eval/logits/chosen"} <= tags
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_logits_metrics_are_the_mean_logits_of_the_completion_tokens(softcap):
    """logit_sums / tokens = TRL's mean over the vocabulary and the completion tokens of the full
    logits (no logits formed without a softcap; the softcapped ones in chunks)."""
    from epa_ext import IGNORE_INDEX
    from epa_ext.causal_lm import HeadInputs
    from epa_ext.preference.loss import logit_sums

    hidden, weight, bias = torch.randn(3, 5, 8), torch.randn(11, 8), torch.randn(11)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = labels[2] = IGNORE_INDEX
    kept = labels != IGNORE_INDEX
    logits = hidden @ weight.T + bias
    logits = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    expected = torch.stack([logits[r][kept[r]].sum() / 11 for r in range(3)])
    torch.testing.assert_close(logit_sums(HeadInputs(hidden, weight, bias, softcap), labels), expected, rtol=RTOL,
                               atol=ATOL)


def test_yaml_config_mirrors_the_flags(tmp_path):
    config = tmp_path / "run.yaml"
    # '2' and 1e-2 are strings to YAML; the flags' conversion makes them numbers
    config.write_text("loss: dpo\nmax-steps: '2'\nbatch_size: 4\nbeta: 0.2\nweight-decay: 1e-2\n")
    out = tmp_path / "run"
    records = train_in_process(out, "--config", str(config), "--beta", "0.3")
    resolved = json.loads((out / "config.json").read_text())
    assert (resolved["loss"], resolved["max_steps"], resolved["batch_size"], resolved["beta"],
            resolved["weight_decay"]) == ("dpo", 2, 4, 0.3, 1e-2)
    assert len(train_losses(records)) == 2


@NEEDS_HH_RLHF
def test_hh_rlhf_trains_20_steps_with_weak_negatives(tmp_path):
    records = train_in_process(tmp_path / "run", "--max-steps", "20", "--batch-size", "4", "--num-weak", "2",
                               "--skip-bad-rows", "--max-length", "128", "--max-prompt-length", "64",
                               "--eval-fraction", "0.01", dataset=HH_RLHF)
    assert len(train_losses(records)) == 20 and all(math.isfinite(x) for x in train_losses(records))


@NEEDS_HH_RLHF
def test_hh_rlhf_without_skip_bad_rows_stops_at_row_87_saying_how_to_go_on(tmp_path):
    result = subprocess.run(epa_train_command(tmp_path / "run", "--max-steps", "1", dataset=HH_RLHF), cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = last_line(result.stderr)
    assert line.startswith(f"epa-train: {HH_RLHF}: row 87, field 'chosen': empty answer") and "--skip-bad-rows" in line


BAD_ROWS = [
    ('{"question": "a", "answer": "b"}', "row 1"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "chosen"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', "rejected"),
]


@pytest.mark.parametrize("line,pattern", BAD_ROWS)
def test_bad_rows_stop_with_a_message_naming_row_and_field(line, pattern, tmp_path):
    data = tmp_path / "bad.jsonl"
    good = PREFS.read_text().splitlines()[:8]
    data.write_text(line + "\n" + "\n".join(good) + "\n")
    result = subprocess.run(epa_train_command(tmp_path / "out", "--max-steps", "1", dataset=data), cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last_line(result.stderr).startswith("epa-train:") and pattern in last_line(result.stderr), result.stderr


def test_fewer_rows_than_one_batch(tmp_path):
    from epa_ext.train.data import DataError

    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(PREFS.read_text().splitlines()[:3]) + "\n")
    with pytest.raises(DataError, match="fewer than one batch"):
        train_in_process(tmp_path / "run", "--max-steps", "1", "--batch-size", "8", dataset=data)
