"""epa-train survives being killed, interrupted (Ctrl-C, SIGTERM), corrupt input and non-finite
losses, and a checkpoint runs no code when resumed from."""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
import random
import re
import shlex
import shutil
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
    torch.load(checkpoint / "trainer_state.pt", weights_only=True)


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
            state = [torch.load(d / "trainer_state.pt", weights_only=True)["optimizer"] for d in (before, after)]
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


# --- a checkpoint is data, never code --------------------------------------------------------------

REPOSITORY = Path(__file__).resolve().parents[1]
NOT_PLAIN_DATA = "is not a trainer state of plain data"


class RunsOnUnpickling:
    """A pickled object whose unpickling runs a shell command: what a hostile trainer_state.pt holds."""

    def __init__(self, shell_command: str):
        self.shell_command = shell_command

    def __reduce__(self):
        return os.system, (self.shell_command,)


def files_of(directory: Path) -> dict[str, tuple[int, int]]:
    """Each path under directory with its size and modification time: what a refused run leaves as it was."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def test_a_trainer_state_that_would_run_code_is_refused_in_one_line_and_runs_nothing(tmp_path):
    """The issue's case: a payload added to the newest checkpoint's trainer_state.pt. --resume stops
    before any step with one line naming the file (no traceback, exit status 1); the payload's
    marker file does not appear and the output directory is as it was. Removing that checkpoint,
    as the line says, resumes from the one before it, bitwise."""
    args = ["--max-steps", "3", "--save-steps", "1", "--batch-size", "2", "--eval-fraction", "0"]
    out, marker = tmp_path / "out", tmp_path / "PWNED"
    uninterrupted = train_in_process(out, *args)
    state_file = out / "checkpoint-3" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "note": RunsOnUnpickling(f"touch {shlex.quote(str(marker))}")}, state_file)
    before = files_of(out)

    result = subprocess.run(command(out, *args, "--resume"), capture_output=True, text=True)
    assert not marker.exists()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(f"epa-train: --resume: {state_file} {NOT_PLAIN_DATA} (it asks to "
                                                f"import {os.system.__module__}.system"), line
    assert line.endswith("or remove checkpoint-3 to --resume from the checkpoint before it"), line
    assert files_of(out) == before

    shutil.rmtree(out / "checkpoint-3")
    assert train_losses(train_in_process(out, *args, "--resume")) == train_losses(uninterrupted)
    assert not marker.exists()


def test_the_rng_states_come_back_exactly_from_a_checkpoint(tmp_path):
    """Python's state (its 625 ints, and the float random.gauss keeps for its next call) and torch's
    are plain data that the restricted unpickler reads back exactly: the draws after restoring them
    are the draws after saving them."""
    from epa_ext.train import checkpoint

    class Saves:
        def save_pretrained(self, directory, **_):
            Path(directory, "model.safetensors").write_text("weights")

    random.seed(1)
    random.gauss(0, 1)  # leaves the second value of its pair in the state
    state = {"optimizer": {}, "scheduler": {}, "rng": checkpoint.rng_state()}
    path = checkpoint.write_checkpoint(tmp_path, 1, Saves(), Saves(), state, run={})
    expected = [random.gauss(0, 1), random.random()], torch.rand(4)
    random.seed(2)
    torch.manual_seed(2)
    checkpoint.restore_rng(checkpoint.load_trainer_state(path)["rng"])
    assert [random.gauss(0, 1), random.random()] == expected[0] and torch.equal(torch.rand(4), expected[1])


def write_damaged(state_file: Path, damage: str) -> None:
    from safetensors.torch import save_file

    state = torch.load(state_file, weights_only=True)
    if damage == "truncated":
        state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    elif damage == "json":
        state_file.write_text(json.dumps({"step": state["step"]}))
    elif damage == "safetensors":
        save_file({"step": torch.tensor(state["step"])}, state_file)
    elif damage == "another torch file":
        torch.save({"weights": torch.ones(2)}, state_file)
    elif damage == "numpy objects":  # as a trainer that saved NumPy's generator would have written it
        import numpy

        torch.save({**state, "rng": {**state["rng"], "numpy": numpy.random.get_state()}}, state_file)


@pytest.mark.parametrize("damage,reason", [
    ("truncated", "it is damaged, truncated or not a file torch.save wrote"),
    ("json", "it is damaged, truncated or not a file torch.save wrote"),
    ("safetensors", "it is damaged, truncated or not a file torch.save wrote"),
    ("another torch file", "it is not epa-train's: no optimizer, scheduler, rng in it"),
    ("numpy objects", "it asks to import numpy."),
])
def test_a_damaged_or_foreign_trainer_state_is_refused_before_anything_changes(damage, reason, tmp_path):
    from epa_ext.train.config import ConfigError

    args = ["--max-steps", "1", "--batch-size", "2", "--eval-fraction", "0"]
    out = tmp_path / "out"
    train_in_process(out, *args)
    state_file = out / "checkpoint-1" / "trainer_state.pt"
    write_damaged(state_file, damage)
    before = files_of(out)
    with pytest.raises(ConfigError, match=f"^--resume: {re.escape(f'{state_file} {NOT_PLAIN_DATA} ({reason}')}"):
        train_in_process(out, *args, "--resume")
    assert files_of(out) == before


def torch_load_calls_without_weights_only(path: Path) -> tuple[int, list[str]]:
    """(how many torch.load calls path makes, those that do not pass weights_only=True); importing
    load from torch counts as one that does not (its calls could not be told from json.load)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    torch_names = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names if alias.name == "torch"}
    calls, unsafe = 0, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization") and any(
                alias.name == "load" for alias in node.names):
            unsafe.append(f"{path}:{node.lineno}: from {node.module} import load")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
              and ast.unparse(node.func.value) in {*torch_names, *(f"{name}.serialization" for name in torch_names)}):
            calls += 1
            if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords):
                unsafe.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return calls, unsafe


def test_every_torch_load_of_the_package_reads_plain_data_only():
    """Every torch.load in epa_ext/ and bench/ passes weights_only=True explicitly: torch's
    restricted unpickler, which runs nothing from the file it reads."""
    sources = sorted([*(REPOSITORY / "epa_ext").rglob("*.py"), *(REPOSITORY / "bench").rglob("*.py")])
    found = [torch_load_calls_without_weights_only(path) for path in sources]
    assert sum(calls for calls, _ in found) >= 3  # the trainer state, the reference and weak-correction caches
    assert [call for _, unsafe in found for call in unsafe] == []
