"""epa-train's command line and run directory: flags and YAML held to the same types and choices,
options that cannot be meant refused in one line before anything is loaded, the environment
checked up front (devices, torchrun, model and data sources), and an output directory that never
mixes two runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PREFS, SHORT, TINY, epa_train_command, last_line, read_metrics, train_in_process, train_losses

from epa_ext.train.config import ConfigError, TrainConfig, parse_config
from epa_ext.train.trainer import main


def refusal(argv: list[str], capsys) -> str:
    """The one line epa-train's main() ends with for argv (it must end with one)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    message = stopped.value.code if isinstance(stopped.value.code, str) else capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and message.startswith("epa-train:"), message
    return message


def base(tmp_path: Path, *extra: str) -> list[str]:
    return ["--dataset", str(PREFS), "--output-dir", str(tmp_path / "out"), *TINY, *extra]


# --- flags and YAML --------------------------------------------------------------------------------


def test_help_shows_defaults_once_and_no_empty_ones():
    result = subprocess.run([sys.executable, "-P", "-m", "epa_ext.train", "--help"], capture_output=True, text=True,
                            check=True)
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "(default: )" not in text and "(default: None)" not in text
    options = text.split(" --")
    for option in options:
        assert option.count("default") <= 1, option
    assert "--dataset DATASET local .jsonl" in text and "hub dataset id (required)" in text
    assert "(default: 0.1)" in text and "Unlike TRL 1.16, which ignores it for sigmoid" in text


YAML_REFUSALS = [
    ("loss: ppo\n", "loss: invalid value 'ppo'; allowed: epa, dpo"),
    ("precision: fp64\n", "precision: invalid value 'fp64'; allowed: fp32, bf16, fp16"),
    ("scheduler: cosin\n", "scheduler: invalid value 'cosin'; allowed: cosine, linear, constant"),
    ("max-steps: 1.5\n", "max-steps: expected an integer; got 1.5"),
    ("batch_size: four\n", "batch_size: expected an integer; got 'four'"),
    ("skip-bad-rows: sometimes\n", "skip-bad-rows: expected true or false"),
    ("lr: [1, 2]\n", "lr: expected a number; got [1, 2]"),
    ("scheduler: cosine\nschedular: linear\n", "unknown option 'schedular' (did you mean scheduler?)"),
    ("loss: [dpo\n", "not valid YAML at line"),
    ("- loss: dpo\n", "expected a mapping of option names to values; got a list"),
]


@pytest.mark.parametrize("text, message", YAML_REFUSALS)
def test_yaml_values_are_held_to_the_flags_types_and_choices(text, message, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    assert message in refusal(base(tmp_path, "--config", str(config)), capsys)


def test_yaml_numbers_as_pyyaml_reads_them(tmp_path):
    """PyYAML reads 5e-6 and "3" as strings, 1e3 too: they mean numbers here, as on the command line."""
    config = tmp_path / "run.yaml"
    config.write_text("lr: 5e-6\nmax-steps: '3'\nsave_steps: 1e3\nweak-weight: 2\nskip_bad_rows: true\n")
    cfg = parse_config(["--config", str(config), "--dataset", str(PREFS), "--output-dir", str(tmp_path / "out")])
    assert (cfg.lr, cfg.max_steps, cfg.save_steps, cfg.weak_weight, cfg.skip_bad_rows) == (5e-6, 3, 1000, 2.0, True)
    assert isinstance(cfg.max_steps, int) and isinstance(cfg.weak_weight, float)


def test_missing_yaml_is_one_line(tmp_path, capsys):
    assert "--config nope.yaml: cannot read it" in refusal(base(tmp_path, "--config", "nope.yaml"), capsys)


def test_yaml_with_a_bad_value_is_one_line_from_a_real_process(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("loss: ppo\n")
    result = subprocess.run(epa_train_command(tmp_path / "out", "--config", str(config)), capture_output=True,
                            text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"epa-train: {config}: loss: invalid value 'ppo'; allowed: epa, dpo"
    assert not (tmp_path / "out").exists()  # refused before anything was written or loaded


FLAG_REFUSALS = [
    (["--warmup-ratio", "2"], "--warmup-ratio must be in [0, 1]"),
    (["--label-smoothing", "0.1"], "--label-smoothing applies to --loss dpo only"),
    (["--loss", "dpo", "--dpo-loss-type", "hinge", "--label-smoothing", "0.1"],
     "--label-smoothing applies to --dpo-loss-type sigmoid or robust only"),
    (["--dpo-loss-type", "ipo"], "--dpo-loss-type applies to --loss dpo only"),
    (["--loss", "dpo", "--num-weak", "2"], "--num-weak applies to --loss epa only"),
    (["--loss", "dpo", "--weak-weight", "0.5"], "--weak-weight applies to --loss epa only"),
    (["--beta", "inf"], "--beta must be a finite number > 0; got inf"),
    (["--beta", "0"], "--beta must be a finite number > 0; got 0.0"),
    (["--weak-weight", "inf"], "--weak-weight must be a finite number >= 0; got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0; got nan"),
    (["--sft-weight", "-1"], "--sft-weight must be a finite number >= 0; got -1.0"),
    (["--save-total-limit", "0"], "--save-total-limit must be >= 1; got 0 (leave it out to keep every checkpoint)"),
    (["--max-steps", "1.5"], "--max-steps: expected an integer; got '1.5'"),
    (["--loss", "ppo"], "--loss: invalid value 'ppo'; allowed: epa, dpo"),
    (["--lora-alpha", "8"], "--lora-alpha needs --lora-r"),
    (["--eval-fraction", "0", "--eval-steps", "2"], "--eval-steps needs evaluation data"),
    (["--eval-dataset", str(PREFS), "--eval-fraction", "0.1"], "give one of them"),
    (["--resume", "--overwrite-output-dir"], "--resume continues the run in --output-dir and --overwrite-output-dir"),
    (["--max-prompt-length", "96"], "--max-prompt-length (96) must be smaller than --max-length (96)"),
    (["--tiny-hidden-size", "40"], "--tiny-hidden-size must be a multiple of 16"),
    (["--model", str(PREFS.parent)], "not a transformers model directory (it has no config.json)"),
]


@pytest.mark.parametrize("flags, message", FLAG_REFUSALS)
def test_options_that_cannot_be_meant_are_refused_naming_them(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = base(tmp_path, *flags)
    if "--model" in flags:  # the tiny-model flags apply to --model tiny only
        argv = ["--dataset", str(PREFS), "--output-dir", str(tmp_path / "out"), *SHORT, *flags]
    assert message in refusal(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_the_refusals_are_value_errors_of_trainconfig(tmp_path):
    cfg = TrainConfig(dataset=str(PREFS), output_dir=str(tmp_path), warmup_ratio=2)
    with pytest.raises(ConfigError, match="--warmup-ratio"):
        cfg.validate()
    assert issubclass(ConfigError, ValueError)
    cfg = TrainConfig(dataset=str(PREFS), output_dir=str(tmp_path), lr="5e-6", max_steps="3")  # as YAML gives them
    cfg.validate()
    assert (cfg.lr, cfg.max_steps) == (5e-6, 3)


ENVIRONMENT_REFUSALS = [
    # issue 16's flags that cannot be meant, from a real process too (the rest of FLAG_REFUSALS go through main())
    (["--warmup-ratio", "2"], {}, "--warmup-ratio must be in [0, 1]"),
    (["--label-smoothing", "0.1"], {}, "--label-smoothing applies to --loss dpo only"),
    (["--beta", "inf"], {}, "--beta must be a finite number > 0; got inf"),
    (["--weak-weight", "inf"], {}, "--weak-weight must be a finite number >= 0; got inf"),
    (["--save-total-limit", "0"], {}, "--save-total-limit must be >= 1; got 0 (leave it out to keep every checkpoint)"),
    (["--device", "cuda"], {}, "--device cuda, but no CUDA device is available here"),
    (["--model", "/nonexistent"], {}, "--model /nonexistent: no such directory"),
    (["--model", "someone/no-such-model"], {"HF_HUB_OFFLINE": "1"},
     "--model someone/no-such-model: a hub id, but HF_HUB_OFFLINE is set and it is not in the local cache"),
    (["--fsdp"], {}, "--fsdp needs torchrun: torchrun --nproc-per-node N -m epa_ext.train ... --fsdp"),
    (["--dataset", "{empty}"], {}, "an empty directory; give a data file"),
]


@pytest.mark.parametrize("flags, env, message", ENVIRONMENT_REFUSALS)
def test_refusals_are_one_line_from_a_real_process(flags, env, message, tmp_path):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    (tmp_path / "empty").mkdir()
    flags = [f.replace("{empty}", str(tmp_path / "empty")) for f in flags]
    command = epa_train_command(tmp_path / "out", *flags, model=[] if "--model" in flags else TINY[:8])
    environment = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "HF_HUB_OFFLINE")}
    result = subprocess.run(command, capture_output=True, text=True, env={**environment, **env})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_hub_id_without_network_fails_fast(tmp_path):
    """Without HF_HUB_OFFLINE, transformers retries for ~50 s before it gives up; epa-train asks
    the hub once. (With network, the made-up id fails as not found, also in one line.)"""
    command = epa_train_command(tmp_path / "out", model=["--model", "someone/no-such-model-for-epa-ext"])
    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)
    assert time.perf_counter() - started < 20
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = last_line(result.stderr)
    assert line.startswith("epa-train: --model someone/no-such-model-for-epa-ext: ") and (
        "cannot be reached" in line or "cannot be loaded" in line), result.stderr


# --- the run directory -----------------------------------------------------------------------------


def test_a_directory_holding_another_run_is_refused_unless_overwritten(tmp_path):
    """The issue's case: a DPO run of hidden size 64 with checkpoints, then an EPA run of hidden
    size 32 (--save-total-limit 1) in the same directory: refused, as a new run and on --resume,
    naming what differs; --overwrite-output-dir deletes the DPO run and trains the EPA one."""
    out = tmp_path / "out"
    dpo = ["--loss", "dpo", "--tiny-hidden-size", "64", "--max-steps", "9", "--save-steps", "4", "--batch-size", "2",
           "--eval-fraction", "0"]
    command = lambda *flags: epa_train_command(out, *flags)  # noqa: E731
    subprocess.run(command(*dpo), check=True, capture_output=True)
    dpo_checkpoints = {"checkpoint-4", "checkpoint-8", "checkpoint-9"}  # and the last step's
    assert {p.name for p in out.glob("checkpoint-*")} == dpo_checkpoints
    epa = ["--tiny-hidden-size", "32", "--max-steps", "4", "--save-steps", "2", "--save-total-limit", "1",
           "--batch-size", "2", "--eval-fraction", "0"]
    for extra in ([], ["--resume"]):
        result = subprocess.run(command(*epa, *extra), capture_output=True, text=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        line = last_line(result.stderr)
        assert "--loss ('dpo' -> 'epa')" in line and "--tiny-hidden-size (64 -> 32)" in line, line
        assert "--max-steps" not in line and "--save-steps" not in line  # bookkeeping may differ
        assert ("was trained with other options" in line) == bool(extra)
    assert {p.name for p in out.glob("checkpoint-*")} == dpo_checkpoints  # nothing deleted

    subprocess.run(command(*epa, "--overwrite-output-dir"), check=True, capture_output=True)
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-4"}  # the new run's last (limit 1)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["loss"] == "epa"


def test_the_same_run_again_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "out"
    args = ["--max-steps", "4", "--save-steps", "2", "--batch-size", "2", "--eval-fraction", "0"]
    first = train_in_process(out, *args)
    with pytest.raises(ConfigError, match=r"already holds this run \(newest checkpoint: checkpoint-4\); --resume "
                                          r"continues it, --overwrite-output-dir starts it over"):
        train_in_process(out, *args)
    assert train_losses(train_in_process(out, *args, "--resume")) == train_losses(first)  # nothing left to train
    # bookkeeping options may change on resume
    train_in_process(out, *args, "--resume", "--logging-steps", "2", "--save-total-limit", "3")
    with pytest.raises(ConfigError, match=r"was trained with other options: --lr \(0.001 -> 0.002\)"):
        train_in_process(out, *args, "--resume", "--lr", "2e-3")


def test_a_finished_run_resumes_to_train_longer(tmp_path, capsys):
    """The issue's case: a finished run of --max-steps 4 --save-steps 2 keeps a checkpoint of step
    4, and --resume --max-steps 6 trains steps 5 and 6 from it, saying what changed. With a
    constant learning rate (no schedule to stretch), the result is bitwise a 6-step run's."""
    args = ["--save-steps", "2", "--batch-size", "2", "--eval-fraction", "0.1", "--scheduler", "constant",
            "--warmup-ratio", "0"]
    out = tmp_path / "out"
    four = train_in_process(out, *args, "--max-steps", "4")
    assert (out / "checkpoint-4" / "trainer_state.pt").is_file()
    capsys.readouterr()
    resumed = train_in_process(out, *args, "--max-steps", "6", "--resume", "--logging-steps", "2")
    note = [line for line in capsys.readouterr().err.splitlines() if "--resume from" in line]
    assert note == ["epa-train: --resume from checkpoint-4: changed options: --max-steps (4 -> 6), --logging-steps "
                    "(1 -> 2); the run now trains 6 steps instead of 4, and the learning-rate schedule (warm-up and "
                    "decay) from step 5 on is the one over 6 steps"], note
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4, 6]  # steps 5 and 6, logged every 2
    assert [r["step"] for r in resumed if "eval/loss" in r] == [4, 6]
    assert resumed[:len(four)] == four  # the finished run's lines are kept
    uninterrupted = train_in_process(tmp_path / "six", *args, "--max-steps", "6", "--logging-steps", "2")
    losses = {r["step"]: r["loss"] for r in resumed if "loss" in r}
    assert {r["step"]: r["loss"] for r in uninterrupted if "loss" in r} == {s: losses[s] for s in (2, 4, 6)}
    from safetensors.torch import load_file

    for key, value in load_file(tmp_path / "six" / "final" / "model.safetensors").items():
        assert torch.equal(load_file(out / "final" / "model.safetensors")[key], value), key
    assert (out / "checkpoint-6").is_dir()

    # an option that changes what a step computes stays refused; a length the checkpoint is past too
    with pytest.raises(ConfigError, match=r"trained with other options: --lr \(0.001 -> 0.002\)"):
        train_in_process(out, *args, "--max-steps", "8", "--resume", "--lr", "2e-3")
    with pytest.raises(ConfigError, match=r"checkpoint-6 is at step 6, past the 5 steps of --max-steps / --epochs"):
        train_in_process(out, *args, "--max-steps", "5", "--resume")


def test_the_learning_rate_after_a_resume_follows_the_new_schedule(tmp_path):
    """Cosine decay over 4 steps ends at learning rate 0; resumed with --max-steps 8 it continues
    with the cosine over 8 steps at step 5 (the optimizer's rate is not the one the old schedule
    left), which the log shows."""
    args = ["--batch-size", "2", "--eval-fraction", "0", "--warmup-ratio", "0"]
    out = tmp_path / "out"
    train_in_process(out, *args, "--max-steps", "4")
    resumed = train_in_process(out, *args, "--max-steps", "8", "--resume")
    rates = [r["learning_rate"] for r in resumed if "loss" in r]
    assert rates[4:] == pytest.approx([0.5e-3 * (1 + math.cos(math.pi * s / 8)) for s in range(4, 8)], rel=1e-12)


def test_resume_refuses_another_number_of_processes(tmp_path, monkeypatch):
    from epa_ext.train import checkpoint, run_dir
    from epa_ext.train.runtime import Runtime

    out = tmp_path / "out"
    args = ["--max-steps", "2", "--save-steps", "1", "--batch-size", "2", "--eval-fraction", "0"]
    train_in_process(out, *args)
    cfg = parse_config(["--dataset", str(PREFS), "--output-dir", str(out), *TINY, *args, "--resume"])
    record = checkpoint.run_record(cfg.training_options(), world_size=2)
    with pytest.raises(ConfigError, match=r"processes \(1 -> 2\)"):
        run_dir.prepare(cfg, Runtime(0, 1, torch.device("cpu")), record)


def test_resume_refuses_a_bookkeeping_option_that_changes_what_training_reads(tmp_path):
    """Issue 37: --eval-dataset is bookkeeping, but added on --resume to a run that held out the
    default 5 % of --dataset it moves --eval-fraction's default to 0: the held-out examples would
    join training and every epoch's order change. Refused in one line naming the resolved value,
    and nothing in the directory changes; a bookkeeping change (more steps) is still accepted, and
    options that resolve to the same values compare equal however they were written."""
    out, eval_file = tmp_path / "out", tmp_path / "eval.jsonl"
    eval_file.write_text("".join(PREFS.read_text().splitlines(keepends=True)[:4]))
    args = ["--max-steps", "2", "--save-steps", "1", "--batch-size", "2"]
    train_in_process(out, *args)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    result = subprocess.run(epa_train_command(out, *args, "--max-steps", "3", "--resume", "--eval-dataset",
                                              str(eval_file)), capture_output=True, text=True)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("was trained with other options: --eval-fraction (0.05 -> 0.0: its default is 0.05, or 0 with "
            "--eval-dataset)") in result.stderr, result.stderr
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    resumed = train_in_process(out, *args, "--max-steps", "3", "--resume")
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3]

    def options(*flags: str) -> dict:
        return parse_config(["--dataset", str(PREFS), "--output-dir", str(out), *flags]).training_options()

    assert options("--eval-fraction", "0") == options("--eval-dataset", str(eval_file))
    assert options("--lora-r", "4") == options("--lora-r", "4", "--lora-alpha", "8")
    assert options("--lora-r", "4") != options("--lora-r", "4", "--lora-alpha", "4")


def test_rotation_deletes_only_this_runs_checkpoints(tmp_path):
    from epa_ext.train.checkpoint import RUN_FILE, checkpoints, write_checkpoint

    class Saves:
        def save_pretrained(self, directory, **_):
            Path(directory, "model.safetensors").write_text("weights")

    ours, theirs = {"training_options": {"loss": "epa"}, "world_size": 1}, {"training_options": {"loss": "dpo"},
                                                                            "world_size": 1}
    for step in (1, 2):  # another run's checkpoints, older than ours
        write_checkpoint(tmp_path, step, Saves(), Saves(), {}, theirs)
    for step in (3, 4, 5):
        write_checkpoint(tmp_path, step, Saves(), Saves(), {}, ours, total_limit=2)
    assert [s for s, _ in checkpoints(tmp_path)] == [1, 2, 4, 5]
    assert [s for s, _ in checkpoints(tmp_path, ours)] == [4, 5]
    assert json.loads((tmp_path / "checkpoint-1" / RUN_FILE).read_text()) == theirs
