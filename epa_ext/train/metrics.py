"""What epa-train logs, under TRL's names: per optimizer step loss, learning_rate, grad_norm,
epoch, num_tokens (tokens fed to the policy so far), rewards/{chosen,rejected,margins,accuracies}
(and rewards/weak with weak negatives; aux_loss, an MoE model's router loss, when its config asks for it; weak/log_weight and weak/log_weight_std, the mean and
spread of their log importance weights, with --weak-correction importance), logps/{chosen,rejected}, logits/{chosen,rejected} (the
mean logit over the vocabulary and the completion tokens), tokens_per_second; evaluations the same
under eval/. Written to metrics.jsonl (one JSON object per line) and, with --report-to
tensorboard, as TensorBoard scalars (train/... and eval/..., as transformers' Trainer writes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from ..logps import IGNORE_INDEX
from ..losses import preference_metrics
from ..preference.candidates import Batch
from ..preference.prefix import Shared


def batch_metrics(loss: Tensor, seq: Tensor, ref: Tensor, logit_sums: Tensor, batch: Batch, *, beta: float,
                  dpo: bool, log_weights: Tensor | None = None, aux_loss: Tensor | None = None) -> dict[str, float]:
    """The metrics of one micro-batch (one host synchronization). seq, ref, logit_sums: [C*B]
    (see epa_ext.preference.loss.PreferenceLoss.forward); log_weights [B, C] or None; aux_loss: an MoE model's router
    loss (logged as aux_loss, TRL's name) or None."""
    shape = (batch.num_candidates, -1)
    policy_bc, ref_bc = seq.detach().view(shape).T, ref.view(shape).T
    num_strong = 1 if dpo else batch.num_strong
    values = {"loss": loss.detach().float(),
              **preference_metrics(policy_bc, ref_bc, beta=beta, num_strong=num_strong, mask=batch.candidate_mask)}
    tokens = (batch.labels != IGNORE_INDEX).sum(-1).view(shape).T.float()  # [B, C] completion tokens
    sums = logit_sums.view(shape).T
    strong = batch.candidate_mask[:, 1:1 + num_strong].float()
    values["logits/chosen"] = sums[:, 0].sum() / tokens[:, 0].sum().clamp(min=1)
    values["logits/rejected"] = ((sums[:, 1:1 + num_strong] * strong).sum()
                                 / (tokens[:, 1:1 + num_strong] * strong).sum().clamp(min=1))
    if aux_loss is not None:
        values["aux_loss"] = aux_loss.detach()
    if isinstance(batch.packed, Shared):  # --prefix-sharing: the decoder tokens it saved
        values["decoder_tokens_saved"] = torch.tensor(batch.packed.saved_share)
    if log_weights is not None:
        weak = log_weights[:, 1 + num_strong:]
        finite = torch.isfinite(weak)
        count = finite.sum().clamp(min=1)
        mean = torch.where(finite, weak, 0).sum() / count
        values["weak/log_weight"] = mean
        values["weak/log_weight_std"] = (torch.where(finite, weak - mean, 0).pow(2).sum() / count).sqrt()
    names = list(values)
    return dict(zip(names, torch.stack([values[k].float().reshape(()) for k in names]).tolist()))


class Mean:
    """Weighted means of metric dicts."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, values: dict[str, float], weight: float = 1.0) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * weight
        self.weight += weight

    def means(self) -> dict[str, float]:
        return {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}


class MetricsLog:
    """metrics.jsonl (and TensorBoard events under output_dir/runs), written by rank 0. On
    resume, lines past the checkpoint's step are dropped so no step appears twice (and
    TensorBoard is told to purge its later events)."""

    def __init__(self, output_dir: Path, resumed_step: int, enabled: bool, tensorboard: bool):
        self.path, self.enabled = output_dir / "metrics.jsonl", enabled
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut off by a kill
                    continue
                if record.get("step", 0) <= resumed_step:
                    kept.append(line)
            self.path.write_text("".join(k + "\n" for k in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "runs"),
                                        purge_step=resumed_step + 1 if resumed_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    tag = key if key.startswith("eval/") else f"train/{key}"
                    self.writer.add_scalar(tag, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []
