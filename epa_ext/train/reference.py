"""pi_ref for epa-train: each batch's reference log-probs, scored by the reference model
(--ref model: a frozen copy of the initial policy, or with LoRA the policy with its adapters
disabled) or looked up in a table computed once before training (--ref precompute), cached in
output_dir under a fingerprint of everything the log-probs depend on; and, with --weak-correction
importance, the weak negatives' log importance weights (epa_ext.preference.weak_correction), computed from the
same reference once before training and cached the same way.

A cached table's file name carries the fingerprint of its inputs (``table_inputs``: the model and
its files, the token rows of the batches, every length, packing and precision option, the weak
negatives' seed, S and q), and a JSON file next to it records those inputs, so that a run whose
inputs differ computes the table again and says which of them changed (``stale_reason``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..causal_lm import LogitTransform, unwrap
from ..preference import weak_correction
from ..preference.candidates import Batch, Layout, Split, borrowed_answer, fit_borrowed_answer, make_batch
from ..preference.packing import Packed
from ..preference.prefix import Shared
from ..preference.scoring import reference_logps
from . import hub
from .config import TrainConfig
from .runtime import Runtime, autocast, barrier


class Reference:
    """logps(split_name, batch) -> [C*B] fp32 summed reference sequence log-probs of the batch's
    rows (the fused losses average them themselves where the loss needs it: IPO)."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, policy: nn.Module, model: nn.Module | None,
                 transform: LogitTransform):
        self.cfg, self.runtime, self.policy, self.model = cfg, runtime, policy, model
        self.transform = transform  # the reference is the initial policy: the same class and config
        self.tables: dict[str, Tensor] | None = None
        self.weak_tables: dict[str, Tensor] | None = None

    def prepare_weak_correction(self, splits: dict[str, Split], layout: Layout, output_dir: Path, has_bos: bool,
                                proposal: weak_correction.KnownProposal | None = None) -> None:
        """The [n, C] log-weight table of each split with weak negatives (rank 0 scores, every rank
        reads the cache); must run before precompute(), which drops the reference model. Says on
        stderr how many reference scorings it took and how long."""
        cfg, tables = self.cfg, {}
        for name, split in splits.items():
            if split.weak_sources is None:
                continue
            # what weak_correction.plan draws and cuts its rows from, besides the split's rows
            inputs = self.table_inputs(split, layout, "weak-negative log importance weights",
                                       {"--weak-correction-prompts": cfg.weak_correction_prompts, "--seed": cfg.seed,
                                        "q": proposal.name if proposal else "estimated", "BOS": has_bos})
            path = output_dir / f"weak_log_weights-{name}-{fingerprint(inputs)}.pt"
            if self.runtime.is_main and not _readable_table(path, f"weak-negative importance weights ({name})"):
                _say_why_computed_again(path, inputs, f"weak-negative importance weights ({name})")
                started = time.perf_counter()
                weak_plan = weak_correction.plan(split, layout, cfg.weak_correction_prompts, cfg.seed, has_bos,
                                                 known=proposal is not None)
                logps = weak_correction.score_rows(weak_plan.rows, self._score_rows, layout.pad_id,
                                                   cfg.batch_size * layout.num_candidates, self.runtime.device)
                table = weak_correction.log_weight_table(split, layout, logps, weak_plan, proposal)
                _save_atomically(table, path, inputs)
                stats = weak_correction.summary(table, layout)
                q = f"known q ({proposal.name})" if proposal else f"q estimated from S = {cfg.weak_correction_prompts}"
                left_out = f", {stats['left_out']} left out (q = 0)" if stats["left_out"] else ""
                print(f"epa-train: weak-negative importance weights ({name}, {q}): {len(weak_plan.rows)} extra "
                      f"reference scorings in {time.perf_counter() - started:.1f} s; log-weight mean "
                      f"{stats['mean']:.3f}, std {stats['std']:.3f}{left_out}; cached in {path}", file=sys.stderr)
            barrier(self.runtime)
            tables[name] = torch.load(path, map_location="cpu", weights_only=True)
        self.weak_tables = tables

    def log_weights(self, split_name: str, batch: Batch) -> Tensor | None:
        """[B, C] log-weights of the batch's candidates (--weak-correction importance), or None."""
        if not self.weak_tables or split_name not in self.weak_tables:
            return None
        return self.weak_tables[split_name][batch.example_ids].to(self.runtime.device)

    def precompute(self, splits: dict[str, Split], layout: Layout, output_dir: Path) -> None:
        """Scores every example of the splits once (rank 0, cached in output_dir; every rank reads
        the cache) and drops the reference model: from here on no reference model is in memory."""
        tables = {}
        for name, split in splits.items():
            inputs = self.table_inputs(split, layout, "summed reference log-probs")
            path = output_dir / f"reference_logps-{name}-{fingerprint(inputs)}.pt"
            if self.runtime.is_main and not _readable_table(path, f"--ref precompute ({name})"):
                _say_why_computed_again(path, inputs, f"--ref precompute ({name})")
                _save_atomically(self._score_all(split, layout), path, inputs)
            barrier(self.runtime)
            tables[name] = torch.load(path, map_location="cpu", weights_only=True)
        self.tables, self.model = tables, None

    def logps(self, split_name: str, batch: Batch) -> Tensor:
        if self.tables is not None:
            return self.tables[split_name][batch.example_ids].T.reshape(-1).to(self.runtime.device)
        return self._score(batch)

    def table_inputs(self, split: Split, layout: Layout, values: str,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a cached table of split's values depends on, by name (flag names where an
        option is the input): the reference model (``model_inputs``), how it scores (precision,
        device, packing), the lengths and candidates, and a digest of the token rows of the
        split's batches: the examples' own and their borrowed weak answers as --max-length cuts
        them (the data file, tokenizer and truncation enter through these token ids). extra: what
        else the table depends on."""
        cfg = self.cfg
        digest = hashlib.sha256()
        for i, example in enumerate(split.examples):
            # borrowed answers are cut to fit this example's prompt: --max-length changes them even
            # where it leaves every example's own tokens alone
            borrowed = ([fit_borrowed_answer(borrowed_answer(split.examples[j].answer_ids, k), example, i,
                                             layout.max_length)
                         for j, k in split.weak_sources[i][:layout.num_weak]] if split.weak_sources else [])
            digest.update(json.dumps([example.prompt_ids, example.answer_ids, borrowed]).encode())
        return {"values": values, **self.model_inputs, "--precision": cfg.precision,
                "device": self.runtime.device.type, "--padding-free": layout.padding_free,
                "packed row tokens": layout.max_row_tokens if layout.padding_free else None,
                **({"--prefix-sharing": cfg.prefix_sharing} if cfg.prefix_sharing != "off" else {}),
                "--max-length": layout.max_length, "--max-prompt-length": cfg.max_prompt_length,
                "--num-strong": layout.num_strong, "--num-weak": layout.num_weak, **(extra or {}),
                "scored token ids": digest.hexdigest()}

    @cached_property
    def model_inputs(self) -> dict[str, Any]:
        """The reference model's part of ``table_inputs`` (computed once per run)."""
        return model_inputs(self.cfg)

    def _score(self, batch: Batch) -> Tensor:
        return self._score_rows(batch.input_ids, batch.attention_mask, batch.labels, batch.packed)

    @torch.no_grad()
    def _score_rows(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                    packed: Packed | Shared | None = None) -> Tensor:
        with self._scorer() as scorer, autocast(self.cfg, self.runtime):
            return reference_logps(scorer, self.transform, input_ids, attention_mask, labels, packed)

    def _score_all(self, split: Split, layout: Layout) -> Tensor:
        """[n, C] reference log-probs of every example's candidates (0 for padding candidates)."""
        rows = []
        for start in range(0, len(split.examples), self.cfg.batch_size):
            ids = list(range(start, min(start + self.cfg.batch_size, len(split.examples))))
            batch = make_batch(split, ids, layout, self.runtime.device)
            rows.append(self._score(batch).view(batch.num_candidates, len(ids)).T.cpu())
        return torch.cat(rows) if rows else torch.zeros(0, layout.num_candidates)

    @contextlib.contextmanager
    def _scorer(self):
        """The model that scores: the reference model, or the policy with its adapters disabled."""
        if self.model is not None:
            yield self.model
            return
        was_training = self.policy.training
        self.policy.eval()
        try:
            with unwrap(self.policy, keep_adapters=True).disable_adapter():
                yield self.policy
        finally:
            self.policy.train(was_training)


# Inputs whose values are digests: a message says that they changed, not the two digests.
DIGESTS = ("model files", "scored token ids")
# Model files up to this size are hashed by content; larger ones (weight shards of GBs) by name,
# size and modification time, which every rewrite changes: reading them at every start would cost
# a pass over the whole model (tens of seconds for a 7B model on a fast disk).
HASHED_FILE_BYTES = 64 << 20
# What from_pretrained reads of a model directory: its config and weights.
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json")


def model_inputs(cfg: TrainConfig) -> dict[str, Any]:
    """What identifies the reference model: --model tiny's seed and sizes; a local directory's
    config and weight files (``HASHED_FILE_BYTES`` says how); a hub id's revision in the local
    cache (the snapshot from_pretrained loaded: a commit pins config and weights). With LoRA the
    reference is the model with its adapters disabled (the same model, kept apart)."""
    inputs: dict[str, Any] = {"--model": cfg.model, "LoRA": bool(cfg.lora_r)}
    if cfg.model == "tiny":
        inputs.update({"--seed": cfg.seed, "--tiny-hidden-size": cfg.tiny_hidden_size,
                       "--tiny-layers": cfg.tiny_layers, "--tiny-vocab-size": cfg.tiny_vocab_size})
    elif hub.looks_local(cfg.model):
        directory = Path(cfg.model).expanduser().resolve()
        inputs["--model"] = str(directory)
        files = sorted({path for pattern in MODEL_FILES for path in directory.glob(pattern) if path.is_file()})
        digest = hashlib.sha256()
        for path in files:
            size = path.stat().st_size
            digest.update(json.dumps([path.name, size]).encode())
            digest.update(path.read_bytes() if size <= HASHED_FILE_BYTES else str(path.stat().st_mtime_ns).encode())
        inputs["model files"] = digest.hexdigest()
    else:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(cfg.model, "config.json")  # .../snapshots/<commit>/config.json
        inputs["model revision"] = Path(config).parent.name if isinstance(config, str) else None
    return inputs


def fingerprint(inputs: dict[str, Any]) -> str:
    """The file-name key of a cached table of these inputs (``Reference.table_inputs``)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def stale_reason(path: Path, inputs: dict[str, Any]) -> str | None:
    """Why the newest other cached table of path's kind and split (same name up to the
    fingerprint) does not serve inputs: the inputs it was computed for that differ, or None when
    there is no such table."""
    prefix = path.name[:path.name.rindex("-") + 1]
    others = sorted((p for p in path.parent.glob(f"{prefix}*.pt") if p != path), key=lambda p: p.stat().st_mtime_ns)
    if not others:
        return None
    stale = others[-1]
    try:
        recorded = json.loads(stale.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError):
        return f"{stale.name} records no inputs (an earlier epa-train wrote it)"
    current = json.loads(json.dumps(inputs))  # as the record reads back (tuples as lists)
    changed = [f"{name} (changed)" if name in DIGESTS else f"{name} {recorded.get(name)!r} -> {value!r}"
               for name, value in current.items() if recorded.get(name) != value]
    changed += [f"{name} (no longer an input)" for name in recorded if name not in current]
    return f"{stale.name} was computed for other inputs: {', '.join(changed)}"


def _readable_table(path: Path, what: str) -> bool:
    """Whether path holds a cached table this run can use: a tensor, read as plain data. A damaged
    or foreign file in its place (a copy cut short, another program's) is said in one line and
    removed, so that it is computed again instead of stopping the run with a traceback."""
    if not path.is_file():
        return False
    try:
        table = torch.load(path, map_location="cpu", weights_only=True)
        reason = None if isinstance(table, Tensor) else f"it holds a {type(table).__name__}, not a tensor"
    except Exception as error:  # noqa: BLE001 (what fails differs with the damage; the user gets one line)
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"[:200]
    if reason is None:
        return True
    print(f"epa-train: {what}: the cached table {path} cannot be used ({reason}); computing it again",
          file=sys.stderr)
    path.unlink()
    return False


def _say_why_computed_again(path: Path, inputs: dict[str, Any], what: str) -> None:
    """One stderr line when a cached table of the kind of path is there but not for inputs."""
    reason = stale_reason(path, inputs)
    if reason:
        print(f"epa-train: {what}: not reusing the cached table: {reason}; computing it for this run",
              file=sys.stderr)


def _save_atomically(table: Tensor, path: Path, inputs: dict[str, Any]) -> None:
    """The table, and next to it the inputs it was computed for (read by ``stale_reason``)."""
    record = path.with_suffix(".json")
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(inputs, indent=1) + "\n")
    os.replace(tmp, record)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)
