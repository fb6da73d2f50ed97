"""Checkpoints that are never seen half-written: each is written to a temporary directory and
renamed into place only when complete (a rename is atomic on one file system)."""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.pt"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, model, tokenizer, trainer_state: dict[str, Any],
                    total_limit: int | None = None, model_state: dict | None = None) -> Path:
    """Writes output_dir/checkpoint-STEP (model as safetensors, tokenizer, trainer_state.pt with
    optimizer, scheduler, RNG and data position) through a temporary directory. model_state: the
    full weights when the model's own parameters are shards (FSDP)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(tmp)
    torch.save(trainer_state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    if final.exists():  # a checkpoint of the same step from a run that was interrupted after it
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit:
        for _, old in checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    """Temporary directories left by a run killed while writing a checkpoint."""
    for path in Path(output_dir).glob(".tmp-checkpoint-*"):
        shutil.rmtree(path, ignore_errors=True)


def load_trainer_state(checkpoint_dir: Path) -> dict[str, Any]:
    return torch.load(checkpoint_dir / STATE_FILE, map_location="cpu", weights_only=False)


def _fsync_tree(root: Path) -> None:
    """Flush the files before the rename makes the checkpoint visible."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
