"""epa-train end to end on a tiny Llama-architecture model and our own fixture data."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"
HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"
TINY = ["--model", "tiny", "--tiny-hidden-size", "32", "--tiny-layers", "1", "--tiny-vocab-size", "300",
        "--max-length", "96", "--max-prompt-length", "48", "--lr", "1e-3", "--eval-fraction", "0.1"]
METRIC_KEYS = {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_second", "rewards/chosen", "rewards/rejected",
               "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"}


def train(tmp_path: Path, *extra: str, name: str = "run", dataset: Path = DATA / "prefs.jsonl") -> tuple[Path, list]:
    from epa_ext.train.config import parse_config
    from epa_ext.train.trainer import run

    out = tmp_path / name
    records = run(parse_config(["--dataset", str(dataset), "--output-dir", str(out), *TINY, *extra]))
    return out, records


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r and "eval/loss" not in r]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


@pytest.mark.parametrize("loss", ["epa", "dpo"])
def test_a_few_steps_train_and_write_everything(loss, tmp_path):
    extra = ["--num-weak", "2"] if loss == "epa" else ["--dpo-loss-type", "ipo"]
    out, records = train(tmp_path, "--loss", loss, "--max-steps", "4", "--batch-size", "4", *extra)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for record in train_records:
        assert METRIC_KEYS <= record.keys()
        assert all(math.isfinite(v) for v in record.values())
    assert any("eval/loss" in r for r in records)
    for name in ("metrics.jsonl", "config.json", "training_curves.png", "final/model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["loss"] == loss

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from epa_ext.train.modeling import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    initial = build_tiny_model(len(tokenizer), 32, 1, 96 + 8, seed=0)
    changed = [not torch.equal(p, initial.state_dict()[k]) for k, p in model.state_dict().items()]
    assert any(changed), "no parameter changed"
    assert torch.isfinite(model(**tokenizer("hello", return_tensors="pt")).logits).all()


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path):
    args = ["--max-steps", "24", "--save-steps", "3", "--batch-size", "2", "--num-weak", "1"]
    full_out, full_records = train(tmp_path, *args, name="full")

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "epa_ext.train", "--dataset", str(DATA / "prefs.jsonl"), "--output-dir",
               str(out), *TINY, *args]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint-3").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"

    subprocess.run(command + ["--resume"], cwd=tmp_path, check=True, capture_output=True)
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed if "loss" in r] == list(range(1, 25))  # no step missing or twice
    assert losses(resumed) == pytest.approx(losses(full_records), rel=1e-6, abs=1e-7)
    for key, value in final_weights(full_out).items():
        torch.testing.assert_close(final_weights(out)[key], value, rtol=1e-6, atol=1e-7)


def test_precomputed_reference_equals_reference_model(tmp_path):
    args = ["--max-steps", "3", "--batch-size", "4", "--num-weak", "1"]
    _, with_model = train(tmp_path, *args, "--ref", "model", name="model")
    out, precomputed = train(tmp_path, *args, "--ref", "precompute", name="precompute")
    assert len(list(out.glob("reference_logps-train-*.pt"))) == 1
    assert losses(precomputed) == pytest.approx(losses(with_model), rel=1e-5, abs=1e-6)


def test_lora_trains_adapters_and_final_loads(tmp_path):
    out, records = train(tmp_path, "--max-steps", "3", "--batch-size", "4", "--lora-r", "4")
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in name for name in model.state_dict())


def test_yaml_config_mirrors_the_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("loss: dpo\nmax-steps: 2\nbatch_size: 4\nbeta: 0.2\n")
    out, records = train(tmp_path, "--config", str(config), "--beta", "0.3")
    resolved = json.loads((out / "config.json").read_text())
    assert (resolved["loss"], resolved["max_steps"], resolved["batch_size"], resolved["beta"]) == ("dpo", 2, 4, 0.3)
    assert len(losses(records)) == 2


def test_torchrun_two_processes_equal_one(tmp_path):
    common = ["--dataset", str(DATA / "prefs.jsonl"), *TINY, "--max-steps", "3", "--num-weak", "1",
              "--eval-fraction", "0"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "epa_ext.train", *common, "--output-dir", str(single), "--batch-size", "4"],
                   cwd=tmp_path, check=True, capture_output=True)
    double = tmp_path / "double"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
                             "-m", "epa_ext.train", *common, "--output-dir", str(double), "--batch-size", "2"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    read = lambda d: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(read(double)) == pytest.approx(losses(read(single)), rel=1e-5, abs=1e-6)


@pytest.mark.skipif(not HH_RLHF.exists(), reason="../shared/data (HH-RLHF) is not present")
def test_hh_rlhf_trains_20_steps_with_weak_negatives(tmp_path):
    out, records = train(tmp_path, "--max-steps", "20", "--batch-size", "4", "--num-weak", "2", "--skip-bad-rows",
                         "--max-length", "128", "--max-prompt-length", "64", "--eval-fraction", "0.01",
                         dataset=HH_RLHF)
    assert len(losses(records)) == 20 and all(math.isfinite(x) for x in losses(records))


BAD_ROWS = [
    ('{"question": "a", "answer": "b"}', "row 1"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "chosen"),
    ('{"prompt": "a", "chosen": "b", "rejected": 3}', "rejected"),
]


@pytest.mark.parametrize("line,pattern", BAD_ROWS)
def test_bad_rows_stop_with_a_message_naming_row_and_field(line, pattern, tmp_path):
    data = tmp_path / "bad.jsonl"
    good = (DATA / "prefs.jsonl").read_text().splitlines()[:8]
    data.write_text(line + "\n" + "\n".join(good) + "\n")
    result = subprocess.run([sys.executable, "-m", "epa_ext.train", "--dataset", str(data), "--output-dir",
                             str(tmp_path / "out"), *TINY, "--max-steps", "1"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("epa-train:") and pattern in last, result.stderr[-2000:]


def test_fewer_rows_than_one_batch(tmp_path):
    from epa_ext.train.data import DataError

    data = tmp_path / "small.jsonl"
    data.write_text("\n".join((DATA / "prefs.jsonl").read_text().splitlines()[:3]) + "\n")
    with pytest.raises(DataError, match="fewer than one batch"):
        train(tmp_path, "--max-steps", "1", "--batch-size", "8", dataset=data)


def test_fsdp_in_one_process_matches_plain_training(tmp_path):
    """FSDP2 (fully_shard) through its whole path (sharded step, gathered checkpoint and final
    weights, resume) in one process; on CPU, sharding across processes is refused clearly."""
    common = ["--dataset", str(DATA / "prefs.jsonl"), *TINY, "--max-steps", "4", "--save-steps", "2",
              "--batch-size", "2", "--eval-fraction", "0"]
    _, plain = train(tmp_path, *common[2:], name="plain")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    out = tmp_path / "fsdp"
    command = [torchrun, "--nproc-per-node", "1", "--master-port", str(30500 + os.getpid() % 1000), "-m",
               "epa_ext.train", *common, "--output-dir", str(out), "--fsdp"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses(records) == pytest.approx(losses(plain), rel=1e-5, abs=1e-6)
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")

    refused = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(31500 + os.getpid() % 1000),
                              "-m", "epa_ext.train", *common, "--output-dir", str(tmp_path / "refused"), "--fsdp"],
                             cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode != 0 and "--fsdp across processes needs CUDA devices" in refused.stderr
