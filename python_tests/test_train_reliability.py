"""epa-train survives being killed, corrupt input and non-finite losses."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"
TINY = ["--model", "tiny", "--tiny-hidden-size", "32", "--tiny-layers", "1", "--tiny-vocab-size", "300",
        "--max-length", "96", "--max-prompt-length", "48", "--lr", "1e-3", "--eval-fraction", "0"]


def command(out: Path, *extra: str, dataset: Path = DATA / "prefs.jsonl") -> list[str]:
    return [sys.executable, "-m", "epa_ext.train", "--dataset", str(dataset), "--output-dir", str(out), *TINY, *extra]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL the process as soon as ready() holds; False if it ended first."""
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.wait()
    return False


def test_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path):
    """Kills: while a checkpoint is being written, then at a random moment of training, then again;
    each time --resume continues from the newest complete checkpoint. The end result (every step
    logged once, the losses, the final weights) equals a run that was never interrupted."""
    args = ["--max-steps", "30", "--save-steps", "2", "--batch-size", "2", "--num-weak", "1"]
    # bitwise only with MKL's conditional bitwise reproducibility (see conftest.py)
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE"}
    reference_out = tmp_path / "reference"
    subprocess.run(command(reference_out, *args), cwd=tmp_path, check=True, capture_output=True, env=env)
    expected = [r["loss"] for r in records(reference_out)]

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = [lambda: any(out.glob(".tmp-checkpoint-*"))]  # mid-write
    for _ in range(2):
        delay = rng.uniform(0.1, 1.5)
        kills.append(lambda delay=delay: (out / "checkpoint-2").exists() and time.time() - started > delay)
    killed = 0
    for ready in kills:
        started = time.time()
        process = subprocess.Popen(command(out, *args, "--resume"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=env)
        killed += kill_when(process, ready)
        for path in out.glob("checkpoint-*"):  # whatever is visible is complete
            assert (path / "trainer_state.pt").is_file() and (path / "model.safetensors").is_file()
    assert killed >= 2, "the runs ended before they could be killed"
    subprocess.run(command(out, *args, "--resume"), cwd=tmp_path, check=True, capture_output=True, env=env)

    logged = records(out)
    assert [r["step"] for r in logged] == list(range(1, 31))
    assert [r["loss"] for r in logged] == expected  # bitwise
    from safetensors.torch import load_file

    final, reference_final = load_file(out / "final/model.safetensors"), load_file(reference_out / "final/model.safetensors")
    for key, value in reference_final.items():
        assert torch.equal(final[key], value), key
    assert not any(out.glob(".tmp-checkpoint-*"))


def test_nonfinite_loss_stops_cleanly_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(command(out, "--max-steps", "6", "--save-steps", "1", "--batch-size", "4", "--lr", "1e30"),
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("epa-train: loss is not finite at step") and "last good checkpoint" in last_line
    checkpoint = Path(last_line.split("last good checkpoint: ")[1].split(". ")[0])
    assert checkpoint.is_dir()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(checkpoint)  # intact
    torch.load(checkpoint / "trainer_state.pt", weights_only=False)


def test_nonfinite_steps_are_skipped_when_asked(tmp_path):
    out = tmp_path / "run"
    subprocess.run(command(out, "--max-steps", "5", "--batch-size", "4", "--lr", "1e30", "--skip-nonfinite-steps"),
                   cwd=tmp_path, check=True, capture_output=True)
    logged = records(out)
    assert len(logged) == 5 and logged[-1]["nonfinite_steps_skipped"] >= 1
    assert math.isfinite(logged[0]["loss"])


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    data = tmp_path / "prefs.jsonl.gz"
    payload = gzip.compress((DATA / "prefs.jsonl").read_bytes())
    data.write_bytes(payload[: len(payload) // 2])
    result = subprocess.run(command(tmp_path / "out", "--max-steps", "1", dataset=data), cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("epa-train:") and "prefs.jsonl.gz" in last_line and "Traceback" not in result.stderr


def test_malformed_lines_stop_with_the_line_number_or_are_skipped_and_counted(tmp_path):
    lines = (DATA / "prefs.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-9]  # cut off: not JSON any more
    lines[7] = json.dumps({"prompt": "p", "chosen": 5, "rejected": "r"})  # wrong type
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n")
    result = subprocess.run(command(tmp_path / "stop", "--max-steps", "1", dataset=data), cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "line 5" in result.stderr.strip().splitlines()[-1]

    data.write_text("\n".join(lines[:4] + lines[5:]) + "\n")  # the JSON error removed; the wrong type stays
    result = subprocess.run(command(tmp_path / "skip", "--max-steps", "1", "--skip-bad-rows", dataset=data),
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dropped 1 of" in result.stdout + result.stderr
