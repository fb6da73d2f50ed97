"""Checkpoints that are never seen half-written: each is written to a temporary directory and
renamed into place only when complete (a rename is atomic on one file system). Each records the
run that wrote it (run.json: the training options and the number of processes), so that rotation
deletes only the current run's checkpoints and --resume can refuse another run's.

A checkpoint is data, never code: the model is safetensors, and trainer_state.pt holds only
tensors, dicts, lists, tuples, numbers, strings and None, which --resume reads with torch's
restricted unpickler (weights_only=True); a state file that asks for anything else is refused."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..causal_lm import unwrap
from .config import ConfigError
from .runtime import Runtime, barrier, full_weights, optimizer_state

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
TMP_PREFIX = ".tmp-checkpoint-"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what every trainer state holds besides the position and the options (Training.save)
_STATE_PARTS = ("optimizer", "scheduler", "rng")


def checkpoints(output_dir: str | Path, run: dict | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first; with run, only those of that run (see
    ``run_record``)."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and (path / STATE_FILE).is_file() and (run is None or read_run(path) == run):
            found.append((int(match.group(1)), path))
    return sorted(found)


def run_record(training_options: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What identifies a run: the options that change the training, and the number of processes
    (the global batch is --batch-size times it). JSON round-tripped, so it compares equal to a
    record read back."""
    return json.loads(json.dumps({"training_options": training_options, "world_size": world_size}))


def read_run(checkpoint_dir: Path) -> dict | None:
    """The run record of a checkpoint (None for a checkpoint that has none)."""
    try:
        return json.loads((checkpoint_dir / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rng_state() -> dict[str, Any]:
    """The random number generators' states as plain data: Python's a tuple of ints (and None or a
    float), torch's and each CUDA device's a uint8 tensor; restore_rng sets them exactly."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(output_dir: str | Path, step: int, model, tokenizer, trainer_state: dict[str, Any], run: dict,
                     total_limit: int | None = None, model_state: dict | None = None) -> Path:
    """Writes output_dir/checkpoint-STEP (model as safetensors, tokenizer, trainer_state.pt with
    optimizer, scheduler, RNG and data position, run.json) through a temporary directory, then
    deletes this run's oldest checkpoints beyond total_limit. model_state: the full weights when
    the model's own parameters are shards (FSDP)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True) + "\n")
    _fsync_tree(tmp)
    if final.exists():  # a checkpoint of the same step from an attempt interrupted after it
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit:
        for _, old in checkpoints(output_dir, run)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save(output_dir: Path, step: int, cfg, runtime: Runtime, loss_module: nn.Module, tokenizer, optimizer,
         scheduler, position: dict[str, Any], run: dict) -> Path:
    """A checkpoint of everything a resumed run needs (position: step, micro_index and counters):
    the collectives first (full weights and optimizer state under FSDP), then rank 0 writes."""
    weights = full_weights(cfg, loss_module)
    state = {"optimizer": optimizer_state(cfg, loss_module, optimizer), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), **position}
    path = output_dir / f"checkpoint-{step}"
    if runtime.is_main:
        write_checkpoint(output_dir, step, unwrap(loss_module.policy, keep_adapters=True), tokenizer, state, run,
                         cfg.save_total_limit, model_state=weights)
    barrier(runtime)
    return path


def save_final(policy: nn.Module, tokenizer, directory: Path, weights: dict | None = None) -> None:
    """A directory that AutoModelForCausalLM.from_pretrained loads (LoRA adapters merged in)."""
    model = unwrap(policy, keep_adapters=True)
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory)


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    """Temporary directories left by a run killed while writing a checkpoint."""
    for path in Path(output_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(checkpoint_dir: Path, *, mmap: bool = False) -> dict[str, Any]:
    """The trainer state of a checkpoint, read by torch's restricted unpickler, which builds
    tensors, containers, numbers and strings and imports or calls nothing else: a file that asks
    for more (a pickled object, code) is refused, never run. mmap: the tensors are mapped, not
    read (a cheap check of the file before anything changes).

    Raises ConfigError: the file is not a trainer state of plain data (a payload, a damaged or
    foreign file, one holding NumPy objects); the message names it and says how to go on."""
    path = checkpoint_dir / STATE_FILE
    try:
        with warnings.catch_warnings():
            # a pickle protocol newer than torch.save's: read or refused all the same, no warning
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # noqa: BLE001 (what fails differs with the damage; the user gets one line)
        raise ConfigError(_unreadable(checkpoint_dir, path, _refusal_reason(error))) from None
    missing = [part for part in _STATE_PARTS if not isinstance(state, dict) or part not in state]
    if missing:
        raise ConfigError(_unreadable(checkpoint_dir, path, f"it is not epa-train's: no {', '.join(missing)} in it"))
    return state


def _refusal_reason(error: Exception) -> str:
    """Why the restricted unpickler refused a file, in a few words."""
    if isinstance(error, OSError):
        return f"it cannot be read: {error.strerror or error}"
    wanted = re.search(r"GLOBAL ([\w.]+)", str(error))
    if wanted:
        return f"it asks to import {wanted.group(1)}, which plain data never does"
    return "it is damaged, truncated or not a file torch.save wrote"


def _unreadable(checkpoint_dir: Path, path: Path, reason: str) -> str:
    return (f"--resume: {path} is not a trainer state of plain data ({reason}), so it was not loaded (nothing "
            f"in it ran). Start a fresh run (without --resume: another --output-dir, or --overwrite-output-dir), or "
            f"remove {checkpoint_dir.name} to --resume from the checkpoint before it")


def _fsync_tree(root: Path) -> None:
    """Flush the files before the rename makes the checkpoint visible."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
