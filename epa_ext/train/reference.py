"""pi_ref for epa-train: each batch's reference log-probs, scored by the reference model
(--ref model: a frozen copy of the initial policy, or with LoRA the policy with its adapters
disabled) or looked up in a table computed once before training (--ref precompute), cached in
output_dir under a fingerprint of everything the log-probs depend on."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ..linear import linear_sequence_logps
from .batching import Batch, Layout, Split, make_batch
from .config import TrainConfig
from .modeling import score_hidden, unwrap
from .runtime import Runtime, autocast, barrier


class Reference:
    """logps(split_name, batch) -> [C*B] fp32 summed reference sequence log-probs of the batch's
    rows (the fused losses average them themselves where the loss needs it: IPO)."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, policy: nn.Module, model: nn.Module | None):
        self.cfg, self.runtime, self.policy, self.model = cfg, runtime, policy, model
        self.tables: dict[str, Tensor] | None = None

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

    @torch.no_grad()
    def _score(self, batch: Batch) -> Tensor:
        with self._scorer() as scorer, autocast(self.cfg, self.runtime):
            hidden, weight, bias = score_hidden(scorer, batch.input_ids, batch.attention_mask, batch.packed)
            return linear_sequence_logps(hidden, weight, batch.labels, bias=bias).float()

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


def fingerprint(cfg: TrainConfig, split: Split, layout: Layout) -> str:
    """What cached reference log-probs depend on: the reference model, the tokenized data (hence
    the data file, tokenizer and truncation) and the candidate layout."""
    digest = hashlib.sha256()
    model_id = {"model": cfg.model, "lora": bool(cfg.lora_r)}
    if cfg.model == "tiny":
        model_id.update(seed=cfg.seed, hidden=cfg.tiny_hidden_size, layers=cfg.tiny_layers)
    elif Path(cfg.model, "config.json").is_file():
        model_id["config"] = Path(cfg.model, "config.json").read_text()
        model_id["weights"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                     for p in Path(cfg.model).glob("*.safetensors"))
    # "summed": the table holds summed log-probs (caches of length-averaged IPO tables are not reused)
    digest.update(json.dumps([model_id, layout.num_strong, layout.num_weak, "summed", split.weak_sources],
                             default=str).encode())
    for example in split.examples:
        digest.update(json.dumps([example.prompt_ids, example.answer_ids]).encode())
    return digest.hexdigest()[:16]


def _save_atomically(table: Tensor, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(table, tmp)
    os.replace(tmp, path)
