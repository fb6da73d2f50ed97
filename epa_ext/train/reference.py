"""pi_ref for epa-train: each batch's reference log-probs, scored by the reference model
(--ref model: a frozen copy of the initial policy, or with LoRA the policy with its adapters
disabled) or looked up in a table computed once before training (--ref precompute), cached in
output_dir under a fingerprint of everything the log-probs depend on; and, with --weak-correction
importance, the weak negatives' log importance weights (weak_correction.py), computed from the
same reference once before training and cached the same way."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from ..linear import linear_sequence_logps
from . import weak_correction
from .batching import Batch, Layout, Split, make_batch
from .config import TrainConfig
from ..causal_lm import LogitTransform, unwrap
from .modeling import through_batch
from .packing import Packed
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
            key = fingerprint(cfg, split, layout, extra=[cfg.weak_correction_prompts, cfg.seed,
                                                          proposal.name if proposal else "estimated"])
            path = output_dir / f"weak_log_weights-{name}-{key}.pt"
            if self.runtime.is_main and not path.is_file():
                started = time.perf_counter()
                weak_plan = weak_correction.plan(split, layout, cfg.weak_correction_prompts, cfg.seed, has_bos,
                                                 known=proposal is not None)
                logps = weak_correction.score_rows(weak_plan.rows, self._score_rows, layout.pad_id,
                                                   cfg.batch_size * layout.num_candidates, self.runtime.device)
                table = weak_correction.log_weight_table(split, layout, logps, weak_plan, proposal)
                _save_atomically(table, path)
                stats = weak_correction.summary(table, layout)
                q = f"known q ({proposal.name})" if proposal else f"q estimated from S = {cfg.weak_correction_prompts}"
                left_out = f", {stats['left_out']} left out (q = 0)" if stats["left_out"] else ""
                print(f"epa-train: weak-negative importance weights ({name}, {q}): {len(weak_plan.rows)} extra "
                      f"reference scorings in {time.perf_counter() - started:.1f} s; log-weight mean "
                      f"{stats['mean']:.3f}, std {stats['std']:.3f}{left_out}; cached in {path}", file=sys.stderr)
            barrier(self.runtime)
            tables[name] = torch.load(path, map_location="cpu")
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
            path = output_dir / f"reference_logps-{name}-{fingerprint(self.cfg, split, layout)}.pt"
            if self.runtime.is_main and not path.is_file():
                _save_atomically(self._score_all(split, layout), path)
            barrier(self.runtime)
            tables[name] = torch.load(path, map_location="cpu")
        self.tables, self.model = tables, None

    def logps(self, split_name: str, batch: Batch) -> Tensor:
        if self.tables is not None:
            return self.tables[split_name][batch.example_ids].T.reshape(-1).to(self.runtime.device)
        return self._score(batch)

    def _score(self, batch: Batch) -> Tensor:
        return self._score_rows(batch.input_ids, batch.attention_mask, batch.labels, batch.packed)

    @torch.no_grad()
    def _score_rows(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                    packed: Packed | None = None) -> Tensor:
        with self._scorer() as scorer, autocast(self.cfg, self.runtime):
            logps, _ = through_batch(
                scorer, self.transform,
                lambda head: linear_sequence_logps(head.hidden, head.weight, labels, **head.as_kwargs()),
                input_ids, attention_mask, packed)
            return logps.float()

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


def fingerprint(cfg: TrainConfig, split: Split, layout: Layout, extra: list | None = None) -> str:
    """What cached reference log-probs depend on: the reference model, the tokenized data (hence
    the data file, tokenizer and truncation) and the candidate layout (and extra: what else a
    cached table depends on)."""
    digest = hashlib.sha256()
    model_id = {"model": cfg.model, "lora": bool(cfg.lora_r)}
    if cfg.model == "tiny":
        model_id.update(seed=cfg.seed, hidden=cfg.tiny_hidden_size, layers=cfg.tiny_layers)
    elif Path(cfg.model, "config.json").is_file():
        model_id["config"] = Path(cfg.model, "config.json").read_text()
        model_id["weights"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                     for p in Path(cfg.model).glob("*.safetensors"))
    # "summed": the table holds summed log-probs (caches of length-averaged IPO tables are not reused)
    digest.update(json.dumps([model_id, layout.num_strong, layout.num_weak, "summed", split.weak_sources,
                              *(extra or [])], default=str).encode())
    for example in split.examples:
        digest.update(json.dumps([example.prompt_ids, example.answer_ids]).encode())
    return digest.hexdigest()[:16]


def _save_atomically(table: Tensor, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)
