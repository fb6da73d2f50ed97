"""The output directory holds one run, and never two mixed:

- config.json records the configuration of the run in it (written when the run starts);
- a new run in a directory that holds a run's outputs (config.json, checkpoints, metrics.jsonl,
  final/) is refused unless --overwrite-output-dir, which deletes those outputs first (cached
  reference log-probs stay: their file names carry a fingerprint of what they depend on);
- --resume continues from the newest complete checkpoint, and is refused when that checkpoint
  (or, without one, the run config.json records) was trained with other options, naming them, or
  when its trainer state is not plain data (checkpoint.load_trainer_state);
- temporary checkpoint directories left by a run killed while writing one are deleted at start.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .config import DERIVED_DEFAULTS, ConfigError, TrainConfig
from .runtime import Runtime, barrier

CONFIG_FILE = "config.json"
OUTPUTS = (CONFIG_FILE, "metrics.jsonl", "training_curves.png", "final", "runs")


def prepare(cfg: TrainConfig, runtime: Runtime, run: dict) -> Path | None:
    """Checks output_dir against the run about to start (every rank, same answer), cleans it
    (rank 0), records cfg in config.json. Returns the checkpoint to resume from, or None.

    Raises ConfigError: output_dir holds another run (without --overwrite-output-dir), or the
    checkpoint --resume would continue was trained with other options or has a trainer state that
    is not plain data.
    """
    output_dir = Path(cfg.output_dir)
    resume_dir = None
    if cfg.resume:
        found = ckpt.checkpoints(output_dir)
        if found:
            resume_dir = found[-1][1]
            recorded = ckpt.read_run(resume_dir) or _recorded_run(output_dir)
            differing = differences(recorded, run) if recorded else ["(it records no configuration)"]
            if differing:
                raise ConfigError(f"--resume: {resume_dir} was trained with other options: {'; '.join(differing)}. "
                                  f"Resume with the options it was trained with, or start a new run in another "
                                  f"--output-dir")
            ckpt.load_trainer_state(resume_dir, mmap=True)  # refuses a state file that is not plain data
        else:
            _refuse_another_run(output_dir, run, allow_same=True)
    elif not cfg.overwrite_output_dir:
        _refuse_another_run(output_dir, run, allow_same=False)
    barrier(runtime)  # every rank has checked before rank 0 changes anything
    if runtime.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial_checkpoints(output_dir)
        if cfg.overwrite_output_dir:
            remove_outputs(output_dir)
        (output_dir / CONFIG_FILE).write_text(cfg.to_json() + "\n")
    barrier(runtime)
    return resume_dir


def differences(recorded: dict, current: dict) -> list[str]:
    """The options (and the number of processes) in which two run records differ, as
    "--flag (recorded -> current)"."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    old, new = recorded["training_options"], current["training_options"]
    differing = [f"--{name.replace('_', '-')} ({old.get(name, defaults.get(name))!r} -> {value!r}"
                 + (f": {DERIVED_DEFAULTS[name]})" if name in DERIVED_DEFAULTS else ")")
                 for name, value in new.items() if old.get(name, defaults.get(name)) != value]
    if recorded.get("world_size") is not None and recorded["world_size"] != current["world_size"]:
        differing.append(f"processes ({recorded['world_size']} -> {current['world_size']})")
    return differing


def remove_outputs(output_dir: Path) -> None:
    """What a run writes into output_dir, except the reference caches."""
    for path in [*(output_dir / name for name in OUTPUTS), *output_dir.glob("checkpoint-*")]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _outputs(output_dir: Path) -> list[str]:
    present = [name for name in OUTPUTS if (output_dir / name).exists()]
    return present + [path.name for _, path in ckpt.checkpoints(output_dir)]


def _refuse_another_run(output_dir: Path, run: dict, *, allow_same: bool) -> None:
    """Raises ConfigError when output_dir holds a run's outputs, unless allow_same and they are
    of a run with the same options."""
    present = _outputs(output_dir)
    if not present:
        return
    recorded = _recorded_run(output_dir)
    differing = differences(recorded, run) if recorded else None
    if differing == [] and allow_same:
        return
    found = ckpt.checkpoints(output_dir)
    if differing:
        what = f"another run (trained with other options: {'; '.join(differing)})"
        remedy = "use another --output-dir, or --overwrite-output-dir to delete that run and start over"
    elif differing is None:
        what = f"the outputs of a run of unknown configuration ({', '.join(present[:4])})"
        remedy = "use another --output-dir, or --overwrite-output-dir to delete them and start over"
    else:
        what = "this run" + (f" (newest checkpoint: {found[-1][1].name})" if found else f" ({', '.join(present[:4])})")
        remedy = ("--resume continues it" + ("" if found else " (from step 0: it has no checkpoint)")
                  + ", --overwrite-output-dir starts it over")
    raise ConfigError(f"--output-dir {output_dir} already holds {what}; {remedy}")


def _recorded_run(output_dir: Path) -> dict[str, Any] | None:
    """The run record of the configuration config.json holds (number of processes unknown)."""
    try:
        values = json.loads((output_dir / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        cfg = TrainConfig(**{k: v for k, v in values.items() if k in known})
    except TypeError:
        return None
    return ckpt.run_record(cfg.training_options(), world_size=None)
