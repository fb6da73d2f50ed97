"""epa-train survives being killed, interrupted (Ctrl-C, SIGTERM), corrupt input and non-finite
losses."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PREFS, epa_train_command, last_line, read_metrics, train_in_process, train_losses


def command(out: Path, *extra: str, dataset: Path = PREFS) -> list[str]:
    return epa_train_command(out, "--eval-fraction", "0", *extra, dataset=dataset)


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
    expected = [r["loss"] for r in read_metrics(reference_out)]

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

    logged = read_metrics(out)
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
    """A skipped step leaves the parameters and the optimizer state as they were: the checkpoints
    before and after it hold the same weights, moments and step counts."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = subprocess.run(command(out, "--max-steps", "5", "--batch-size", "4", "--lr", "1e30",
                                    "--skip-nonfinite-steps", "--save-steps", "1"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    logged = read_metrics(out)
    assert len(logged) == 5 and math.isfinite(logged[0]["loss"])
    skipped = [r["step"] for previous, r in zip(logged, logged[1:])
               if r["nonfinite_steps_skipped"] == previous["nonfinite_steps_skipped"] + 1]
    assert skipped and not math.isfinite(logged[skipped[0] - 1]["loss"])
    for step in skipped:
        if step == 5:  # the last step has final/, not a checkpoint
            before, after = out / f"checkpoint-{step - 1}", out / "final"
        else:
            before, after = out / f"checkpoint-{step - 1}", out / f"checkpoint-{step}"
        weights_before, weights_after = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
        for key, value in weights_before.items():
            torch.testing.assert_close(weights_after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        if after.name != "final":
            state = [torch.load(d / "trainer_state.pt", weights_only=False)["optimizer"] for d in (before, after)]
            assert state[0]["state"].keys() == state[1]["state"].keys() and state[0]["state"]
            for index, moments in state[0]["state"].items():
                for name, value in moments.items():
                    torch.testing.assert_close(state[1]["state"][index][name], value, rtol=0, atol=0,
                                               equal_nan=True, msg=f"{index}.{name}")


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    data = tmp_path / "prefs.jsonl.gz"
    payload = gzip.compress((PREFS).read_bytes())
    data.write_bytes(payload[: len(payload) // 2])
    result = subprocess.run(command(tmp_path / "out", "--max-steps", "1", dataset=data), cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("epa-train:") and "prefs.jsonl.gz" in last_line and "Traceback" not in result.stderr


def test_malformed_lines_stop_with_the_line_number_or_are_skipped_and_counted(tmp_path):
    lines = (PREFS).read_text().splitlines()
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


# --- SIGINT and SIGTERM ----------------------------------------------------------------------------

STOPPED = re.compile(r"^epa-train: stopped by (SIGINT|SIGTERM) after step (\d+) of (\d+); checkpoint: (.+)\. To "
                     r"continue, run the same command with --resume$")


def start_and_signal(out: Path, args: list[str], signals: list[int]) -> subprocess.CompletedProcess:
    """Starts epa-train, waits until it has logged a step, sends the signals, each once the run
    has acknowledged the one before (Python merges a signal that arrives while the same one is
    still pending)."""
    process = subprocess.Popen(command(out, *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be interrupted"
    stderr = ""
    for index, number in enumerate(signals):
        process.send_signal(number)
        while index + 1 < len(signals) and "stopping after this step" not in stderr:
            stderr += process.stderr.readline()
    stderr += process.communicate(timeout=120)[1]
    return subprocess.CompletedProcess(process.args, process.returncode, "", stderr)


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(number, tmp_path):
    """Then --resume ends where a run that was never interrupted ends."""
    args = ["--max-steps", "60", "--batch-size", "2", "--num-weak", "1"]
    out = tmp_path / "run"
    result = start_and_signal(out, args, [number])
    assert result.returncode == 128 + number and "Traceback" not in result.stderr, result.stderr[-3000:]
    match = STOPPED.match(last_line(result.stderr))
    assert match, result.stderr[-2000:]
    step, checkpoint = int(match.group(2)), Path(match.group(4))
    assert 2 <= step < 60 and checkpoint == out / f"checkpoint-{step}"
    assert {p.name for p in checkpoint.iterdir()} >= {"model.safetensors", "trainer_state.pt", "run.json"}
    assert not list(out.glob(".tmp-checkpoint-*")) and not (out / "final").exists()
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))  # the step it was in was finished
    if number == signal.SIGTERM:
        return
    resumed = subprocess.run(command(out, *args, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    uninterrupted = train_in_process(tmp_path / "uninterrupted", "--eval-fraction", "0", *args)
    assert train_losses(read_metrics(out)) == train_losses(uninterrupted)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    out = tmp_path / "run"
    result = start_and_signal(out, ["--max-steps", "500", "--batch-size", "2"], [signal.SIGINT, signal.SIGINT])
    assert result.returncode == 128 + signal.SIGINT and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert "SIGINT: stopping after this step to write a checkpoint (again: stop at once)" in result.stderr
    assert lines[-1].startswith("epa-train: stopped at once; the checkpoints already in --output-dir are complete")


def test_stale_temporary_checkpoints_are_removed_at_start(tmp_path):
    out = tmp_path / "run"
    stale = out / ".tmp-checkpoint-7-12345"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half written")
    train_in_process(out, "--max-steps", "1", "--eval-fraction", "0")
    assert not stale.exists()
