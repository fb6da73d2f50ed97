"""epa-train: align a causal LM with EPA or DPO on epa_ext's fused kernels.

``run(cfg)`` is the recipe, top to bottom:

    training = set_up(cfg, runtime)   # output dir, data, models, reference, optimizer, resumed state
    while steps remain:
        training.train_step()         # grad_accum micro-batches, one optimizer step, one log line
        training.evaluate_and_save()  # when --eval-steps / --save-steps say so
        Ctrl-C or SIGTERM: training.stop() writes a checkpoint and stops
    training.finish()                 # final evaluation, final/, training_curves.png

Each micro-batch's final hidden states go with the lm_head's weight straight into
fused_linear_epa_loss / fused_linear_dpo_loss, so the batch's logits are never formed; with
--padding-free the decoder runs on the batch's sequences packed into rows without padding
(epa_ext.preference.packing), with --prefix-sharing on each prompt once for all its candidates
(epa_ext.preference.prefix). Checkpoints are atomic and --resume continues bit-for-bit; a finished
run keeps a checkpoint of its last step, so --resume with a higher --max-steps (or --epochs)
trains it further.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .. import causal_lm
from . import checkpoint as ckpt
from . import run_dir
from ..preference.candidates import Layout, Split, longest_rows, make_batch, make_split
from ..preference.loss import LossSpec, PreferenceLoss
from ..preference.packing import attn_implementation, check_packed_attention, row_bound
from ..preference.weak_correction import KnownProposal
from .batching import BatchOrder, hold_out, render, tokenize
from .config import ConfigError, TrainConfig, parse_config
from .data import DataError, DropReport, PreferenceExample, load_rows, parse_rows
from .metrics import Mean, MetricsLog, batch_metrics
from .modeling import enable_gradient_checkpointing, load_policy, load_tokenizer, router_aux_coef, shared_layout
from .plots import plot_training_curves
from .reference import Reference
from .runtime import (Runtime, all_finite, all_mean, any_rank, autocast, barrier, distribute, full_weights,
                      load_optimizer_state, no_sync, setup_runtime, teardown)
from .signals import RunInterrupted, StopRequests


def run(cfg: TrainConfig, *, weak_proposal: KnownProposal | None = None) -> list[dict]:
    """Trains as cfg says; returns the records written to metrics.jsonl (on rank 0; [] on the
    others). Raises RunInterrupted after writing a checkpoint when SIGINT or SIGTERM arrives.
    weak_proposal: with --weak-correction importance, a q of weak answers known in closed form
    instead of the estimate (the known-reward experiment's; see epa_ext.preference.weak_correction)."""
    cfg.validate()
    if weak_proposal is not None and cfg.weak_correction != "importance":
        raise ConfigError("a known weak proposal q is used by --weak-correction importance only")
    runtime = setup_runtime(cfg)
    try:
        return train(cfg, runtime, weak_proposal)
    finally:
        teardown(runtime)  # the run's objects are unreachable here: train() has returned


def train(cfg: TrainConfig, runtime: Runtime, weak_proposal: KnownProposal | None) -> list[dict]:
    """run()'s loop, in a frame of its own so that the run's objects are garbage once it returns."""
    with set_up(cfg, runtime, weak_proposal) as training:
        with StopRequests() as stop:
            while training.position.step < training.total_steps:
                training.train_step()
                training.evaluate_and_save()
                if any_rank(stop.signum is not None, runtime):
                    training.stop(stop.signum or signal.SIGTERM)
        return training.finish()


# --- set-up --------------------------------------------------------------------------------------


@dataclass
class Position:
    """Where the run is; saved in every checkpoint."""

    step: int = 0
    micro_index: int = 0  # global micro-batches consumed (the data order is a function of it)
    skipped_steps: int = 0  # non-finite steps skipped (--skip-nonfinite-steps)
    num_tokens: int = 0  # tokens fed to the policy in training, over all ranks


@dataclass
class Data:
    tokenizer: object
    train: Split
    held_out: Split
    layout: Layout
    report: DropReport


def set_up(cfg: TrainConfig, runtime: Runtime, weak_proposal: KnownProposal | None = None) -> Training:
    """The run's pieces, each from the ones before it."""
    torch.manual_seed(cfg.seed)
    run = ckpt.run_record(cfg.training_options(), runtime.world_size)
    resume_dir = run_dir.prepare(cfg, runtime, run)
    data = prepare_data(cfg, runtime, resume_dir)
    policy, loss_module, reference = build_models(cfg, runtime, data, resume_dir, weak_proposal)
    model = distribute(loss_module, cfg, runtime)
    trainable = [p for p in loss_module.parameters() if p.requires_grad]
    # fused: one kernel for all parameters per step (CPU and CUDA), as transformers' default
    # optimizer (adamw_torch_fused) is for TRL users
    fused = all(p.device.type in ("cpu", "cuda") for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    total_steps = cfg.max_steps or max(math.ceil(cfg.epochs * batches_per_epoch(cfg, runtime, data) / cfg.grad_accum),
                                       1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    position = Position()
    if resume_dir is not None:
        position = restore(resume_dir, cfg, loss_module, optimizer, scheduler, total_steps, runtime)
    if runtime.is_main and data.report.total():
        print(f"epa-train: {data.report.summary()}", file=sys.stderr)
    return Training(cfg, runtime, run, data, policy, loss_module, model, reference, trainable, optimizer, scheduler,
                    total_steps, position)


def build_models(cfg: TrainConfig, runtime: Runtime, data: Data, resume_dir: Path | None,
                 weak_proposal: KnownProposal | None = None) -> tuple[nn.Module, PreferenceLoss, Reference]:
    """(the policy, the policy with its loss, pi_ref and the weak negatives' importance weights),
    on the run's device."""
    policy, reference_model = load_policy(cfg, data.tokenizer, resume_dir)
    policy.to(runtime.device)
    if reference_model is not None:
        reference_model.to(runtime.device)
    try:  # the fused path gives this model's own log-probs, or the run stops here
        transform = causal_lm.check(policy)
    except ValueError as error:
        raise ConfigError(f"--model {cfg.model}: {error}") from None
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if cfg.padding_free:
        try:
            check_packed_attention(policy, transform, max_length=data.layout.max_length,
                                   max_row_tokens=data.layout.max_row_tokens, router_logits=router_aux_coef(policy) > 0)
        except ValueError as error:
            raise ConfigError(f"--padding-free: {error}") from None
        data.layout = replace(data.layout, max_row_tokens=row_bound(attn_implementation(policy),
                                                                    data.layout.max_row_tokens))
    if cfg.prefix_sharing != "off":
        data.layout = replace(data.layout, **shared_layout(cfg, policy, transform, is_main=runtime.is_main))
    spec = LossSpec(cfg.loss, cfg.beta, dpo_loss_type=cfg.dpo_loss_type, label_smoothing=cfg.label_smoothing,
                    num_strong=data.layout.num_strong, weak_weight=cfg.weak_weight, sft_weight=cfg.sft_weight)
    loss_module = PreferenceLoss(policy, spec, transform=transform, router_aux_coef=router_aux_coef(policy))
    reference = Reference(cfg, runtime, policy, reference_model, transform)
    splits = {"train": data.train, "eval": data.held_out}
    if cfg.weak_correction == "importance":  # before precompute, which drops the reference model
        reference.prepare_weak_correction(splits, data.layout, Path(cfg.output_dir),
                                          has_bos=data.tokenizer.bos_token_id is not None, proposal=weak_proposal)
    if cfg.ref == "precompute":
        reference.precompute(splits, data.layout, Path(cfg.output_dir))
    return policy, loss_module, reference


def restore(resume_dir: Path, cfg: TrainConfig, loss_module: PreferenceLoss, optimizer, scheduler, total_steps: int,
            runtime: Runtime) -> Position:
    """The optimizer, scheduler and RNG states of a checkpoint (the weights were loaded with the
    policy), and where it was. The learning rate of the next step is the one the schedule over
    total_steps gives (a run resumed to train longer); rank 0 says which options changed.

    Raises ConfigError: the checkpoint is past total_steps, or its trainer state is not plain data
    (read by torch's restricted unpickler: nothing in it runs)."""
    state = ckpt.load_trainer_state(resume_dir)
    position = Position(**{k: state.get(k, 0) for k in asdict(Position())})
    if position.step > total_steps:
        raise ConfigError(f"--resume: {resume_dir} is at step {position.step}, past the {total_steps} steps of "
                          f"--max-steps / --epochs; raise them to train further")
    load_optimizer_state(cfg, loss_module, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # the optimizer's learning rate was set by the schedule the checkpoint was trained with
    learning_rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs,
                                                                                   scheduler.lr_lambdas)]
    for group, learning_rate in zip(optimizer.param_groups, learning_rates):
        group["lr"] = learning_rate
    scheduler._last_lr = learning_rates
    ckpt.restore_rng(state["rng"])
    if runtime.is_main:
        note = resume_note(resume_dir, state, cfg, position.step, total_steps)
        if note:
            print(f"epa-train: {note}", file=sys.stderr)
    return position


def resume_note(resume_dir: Path, state: dict, cfg: TrainConfig, step: int, total_steps: int) -> str | None:
    """What changed since the checkpoint was written (its options, its run's length), or None."""
    recorded = state.get("options")
    if recorded is None:
        return None
    current = asdict(cfg)
    changed = [f"--{name.replace('_', '-')} ({recorded[name]!r} -> {value!r})" for name, value in current.items()
               if name in recorded and name not in ("resume", "output_dir") and recorded[name] != value]
    old_total = state.get("total_steps", total_steps)
    parts = [f"changed options: {', '.join(changed)}"] if changed else []
    if old_total != total_steps:
        parts.append(f"the run now trains {total_steps} steps instead of {old_total}, and the learning-rate schedule "
                     f"(warm-up and decay) from step {step + 1} on is the one over {total_steps} steps")
    if step >= total_steps:
        parts.append(f"nothing left to train: the checkpoint is step {step} of {total_steps} (raise --max-steps or "
                     f"--epochs to train further)")
    return f"--resume from {resume_dir.name}: " + "; ".join(parts) if parts else None


def prepare_data(cfg: TrainConfig, runtime: Runtime, resume_dir: Path | None) -> Data:
    """The tokenizer (trained on the data for --model tiny), the training split and the held-out
    one (--eval-fraction of --dataset, or --eval-dataset), and the candidate layout."""
    examples, report = read_examples(cfg.dataset, cfg)
    texts = (render(part, None, is_prompt=i == 0) for ex in examples
             for i, part in enumerate((ex.prompt, ex.chosen, *ex.rejected)))
    tokenizer = load_tokenizer(cfg, texts, resume_dir)
    tokenized = tokenize_all(examples, tokenizer, cfg, report, cfg.dataset)
    if cfg.loss == "dpo":
        num_strong, num_weak = 1, 0
    else:
        num_strong, num_weak = cfg.num_strong or max(len(t.answer_ids) - 1 for t in tokenized), cfg.num_weak
    train, held_out = hold_out(tokenized, cfg.held_out_fraction, cfg.seed)
    if cfg.eval_dataset:
        eval_examples, eval_report = read_examples(cfg.eval_dataset, cfg)
        held_out = tokenize_all(eval_examples, tokenizer, cfg, eval_report, cfg.eval_dataset)
        if runtime.is_main and eval_report.total():
            print(f"epa-train: --eval-dataset: {eval_report.summary()}", file=sys.stderr)
    global_batch = cfg.batch_size * runtime.world_size
    if len(train) < global_batch:
        raise DataError(f"{cfg.dataset}: {len(train)} training examples, fewer than one batch of {global_batch} "
                        f"(--batch-size x processes); lower --batch-size or add data")
    layout = Layout(num_strong, num_weak, tokenizer.pad_token_id, cfg.max_length, padding_free=cfg.padding_free,
                    max_row_tokens=cfg.packed_row_tokens if cfg.padding_free or cfg.prefix_sharing != "off" else None)
    return Data(tokenizer, make_split(train, num_weak, cfg.seed, cfg.weak_source),
                make_split(held_out, num_weak, cfg.seed, cfg.weak_source), layout, report)


def read_examples(source: str, cfg: TrainConfig) -> tuple[list[PreferenceExample], DropReport]:
    """Rows -> normalized examples, with every dropped row counted."""
    examples, report = parse_rows(load_rows(source), source=source, skip_bad_rows=cfg.skip_bad_rows)
    if not examples:
        raise DataError(f"{source}: no usable example ({report.summary()})")
    return examples, report


def tokenize_all(examples, tokenizer, cfg: TrainConfig, report: DropReport, source: str):
    tokenized = tokenize(examples, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         report=report, source=source)
    if not tokenized:
        raise DataError(f"{source}: no example left after truncation ({report.summary()}); raise --max-length")
    return tokenized


def batches_per_epoch(cfg: TrainConfig, runtime: Runtime, data: Data) -> int:
    return len(data.train.examples) // (cfg.batch_size * runtime.world_size)


def lr_lambda(cfg: TrainConfig, total_steps: int):
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.scheduler == "linear":
            return max(1.0 - progress, 0.0)
        return 1.0

    return factor


# --- the run -------------------------------------------------------------------------------------


class Training:
    """Everything a run holds, and its four actions: train_step, evaluate_and_save, stop, finish.
    A context manager: leaving it closes the progress bar and the metrics writers."""

    def __init__(self, cfg: TrainConfig, runtime: Runtime, run: dict, data: Data, policy: nn.Module,
                 loss_module: PreferenceLoss, model: nn.Module, reference: Reference, trainable: list,
                 optimizer: torch.optim.Optimizer, scheduler, total_steps: int, position: Position):
        from tqdm.auto import tqdm

        self.cfg, self.runtime, self.run, self.data = cfg, runtime, run, data
        self.policy, self.loss_module, self.model, self.reference = policy, loss_module, model, reference
        self.trainable, self.optimizer, self.scheduler = trainable, optimizer, scheduler
        self.scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and runtime.device.type == "cuda")
        self.total_steps, self.position = total_steps, position
        self.started_at = position.step
        self.output_dir = Path(cfg.output_dir)
        self.per_epoch = batches_per_epoch(cfg, runtime, data)
        lengths = longest_rows(data.train, data.layout) if cfg.group_by_length else None
        self.order = BatchOrder(len(data.train.examples), cfg.batch_size * runtime.world_size, cfg.seed, lengths)
        self.log = MetricsLog(self.output_dir, position.step, runtime.is_main, cfg.report_to == "tensorboard")
        self.last_checkpoint: Path | None = None
        self.progress = tqdm(total=total_steps, initial=position.step, disable=not runtime.is_main,
                             desc=f"epa-train {cfg.loss}", dynamic_ncols=True)
        policy.train()

    def __enter__(self) -> Training:
        return self

    def __exit__(self, *exc) -> None:
        self.progress.close()
        self.log.close()

    def train_step(self) -> None:
        """grad_accum micro-batches, then one optimizer step (skipped, with parameters and
        optimizer state unchanged, when a loss was not finite and --skip-nonfinite-steps)."""
        cfg, runtime = self.cfg, self.runtime
        started, metrics, tokens, nonfinite = time.perf_counter(), Mean(), 0, False
        for accum in range(cfg.grad_accum):
            ids = self.order(self.position.micro_index)
            ids = ids[runtime.rank * cfg.batch_size:(runtime.rank + 1) * cfg.batch_size]
            batch = make_batch(self.data.train, ids, self.data.layout, runtime.device)
            ref = self.reference.logps("train", batch)
            log_weights = self.reference.log_weights("train", batch)
            with no_sync(self.model, sync=accum == cfg.grad_accum - 1), autocast(cfg, runtime):
                loss, seq, logit_sums, aux_loss = self.model(batch.input_ids, batch.attention_mask, batch.labels,
                                                             ref, batch.candidate_mask, log_weights, batch.packed)
            if not all_finite(loss, runtime):  # the same decision on every rank
                if not cfg.skip_nonfinite_steps:
                    raise self._nonfinite_error()
                nonfinite = True
            # backward even for a step that will be skipped: DDP expects one after every forward
            self.scaler.scale(loss / cfg.grad_accum).backward()
            metrics.add(self._metrics(loss, seq, ref, logit_sums, batch, log_weights, aux_loss))
            tokens += int(batch.attention_mask.sum())
            self.position.micro_index += 1
        grad_norm, learning_rate = self._optimizer_step(skip=nonfinite)
        self.position.step += 1
        self._log_step({**metrics.means(), "grad_norm": grad_norm}, learning_rate, tokens,
                       time.perf_counter() - started)

    def evaluate_and_save(self) -> None:
        step, cfg = self.position.step, self.cfg
        if step >= self.total_steps:  # the end of the run evaluates and saves final/ instead
            return
        if cfg.eval_steps and step % cfg.eval_steps == 0:
            self.log.write({"step": step, **self.evaluate()})
        if cfg.save_steps and step % cfg.save_steps == 0:
            self.save()

    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out split, under eval/. Every rank runs the same number of batches
        (FSDP's collectives need it); a rank out of examples scores one with weight 0."""
        held_out, cfg, runtime = self.data.held_out, self.cfg, self.runtime
        if not held_out.examples:
            return {}
        mine = list(range(runtime.rank, len(held_out.examples), runtime.world_size))
        num_batches = math.ceil(math.ceil(len(held_out.examples) / runtime.world_size) / cfg.batch_size)
        metrics = Mean()
        self.policy.eval()
        with torch.no_grad():
            for index in range(num_batches):
                ids = mine[index * cfg.batch_size:(index + 1) * cfg.batch_size]
                batch = make_batch(held_out, ids or [0], self.data.layout, runtime.device)
                ref = self.reference.logps("eval", batch)
                log_weights = self.reference.log_weights("eval", batch)
                with autocast(cfg, runtime):
                    loss, seq, logit_sums, aux_loss = self.loss_module(batch.input_ids, batch.attention_mask,
                                                                       batch.labels, ref, batch.candidate_mask,
                                                                       log_weights, batch.packed)
                metrics.add(self._metrics(loss, seq, ref, logit_sums, batch, log_weights, aux_loss),
                            weight=len(ids))
        self.policy.train()
        totals = all_mean({**metrics.sums, "weight": metrics.weight}, runtime)
        return {f"eval/{k}": v / totals["weight"] for k, v in totals.items() if k != "weight"}

    def save(self) -> Path:
        """A checkpoint of this step; it also records the run's options and length, for the note a
        resume with other bookkeeping options prints."""
        extras = {"options": asdict(self.cfg), "total_steps": self.total_steps}
        self.last_checkpoint = ckpt.save(self.output_dir, self.position.step, self.cfg, self.runtime,
                                         self.loss_module, self.data.tokenizer, self.optimizer, self.scheduler,
                                         {**asdict(self.position), **extras}, self.run)
        return self.last_checkpoint

    def stop(self, signum: int) -> None:
        """After a SIGINT / SIGTERM: a checkpoint of this step (unless one was just written), then
        RunInterrupted saying where it is and how to go on."""
        path = self.output_dir / f"checkpoint-{self.position.step}"
        if self.last_checkpoint != path:
            path = self.save()
        raise RunInterrupted(f"stopped by {signal.Signals(signum).name} after step {self.position.step} of "
                             f"{self.total_steps}; checkpoint: {path}. To continue, run the same command with "
                             f"--resume", signum)

    def finish(self) -> list[dict]:
        """The final evaluation, final/ (full weights gathered under FSDP), the curves, then a
        checkpoint of the last step (written last: once it exists, final/ is complete), which
        --resume with a higher --max-steps continues. A run resumed from its last step trains
        nothing and evaluates nothing again (its log has that evaluation)."""
        self.progress.close()  # before the lines the end of the run may print
        trained = self.position.step > self.started_at
        final_eval = self.evaluate() if trained else {}
        if final_eval:
            self.log.write({"step": self.position.step, **final_eval})
        weights = full_weights(self.cfg, self.loss_module)
        if self.runtime.is_main:
            ckpt.save_final(self.policy, self.data.tokenizer, self.output_dir / "final", weights)
            plot_training_curves(self.log.records(), self.output_dir / "training_curves.png")
        barrier(self.runtime)
        if trained and self.last_checkpoint != self.output_dir / f"checkpoint-{self.position.step}":
            self.save()
        return self.log.records() if self.runtime.is_main else []

    # --- the parts of a step

    def _metrics(self, loss, seq, ref, logit_sums, batch, log_weights, aux_loss) -> dict[str, float]:
        return batch_metrics(loss, seq, ref, logit_sums, batch, beta=self.cfg.beta, dpo=self.cfg.loss == "dpo",
                             log_weights=log_weights, aux_loss=aux_loss)

    def _optimizer_step(self, *, skip: bool) -> tuple[float, float]:
        """(gradient norm before clipping, the learning rate the step used)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        if skip:  # the parameters and the optimizer state stay as they were
            self.position.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        learning_rate = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, learning_rate

    def _log_step(self, metrics: dict[str, float], learning_rate: float, tokens: int, seconds: float) -> None:
        runtime, step = self.runtime, self.position.step
        record = all_mean({**metrics, "tokens": tokens}, runtime)
        batch_tokens = round(record.pop("tokens") * runtime.world_size)  # a sum over ranks, not a mean
        self.position.num_tokens += batch_tokens
        record.update(num_tokens=self.position.num_tokens, tokens_per_second=batch_tokens / seconds)
        if self.cfg.skip_nonfinite_steps:
            record["nonfinite_steps_skipped"] = self.position.skipped_steps
        if step % self.cfg.logging_steps == 0 or step == self.total_steps:
            self.log.write({"step": step, "epoch": self.position.micro_index / self.per_epoch,
                            "learning_rate": learning_rate, **record})
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                                  tok_s=f"{record['tokens_per_second']:.0f}")
        self.progress.update(1)

    def _nonfinite_error(self) -> FloatingPointError:
        last = ckpt.checkpoints(self.output_dir, self.run)
        return FloatingPointError(
            f"loss is not finite at step {self.position.step + 1} (micro-batch {self.position.micro_index}); last "
            f"good checkpoint: {last[-1][1] if last else 'none'}. Lower --lr, use --precision fp32, or pass "
            f"--skip-nonfinite-steps.")


# --- the console script --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """The console script: a bad option, bad data, a non-finite loss or running out of memory
    ends with one line saying what to do, not a traceback from deep inside a library; SIGINT /
    SIGTERM end with the line saying where the checkpoint is (exit status 128 + the signal)."""
    try:
        run(parse_config(argv))
    except RunInterrupted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"epa-train: {stop}", file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except KeyboardInterrupt:
        print("epa-train: stopped at once; the checkpoints already in --output-dir are complete (--resume continues "
              "from the newest)", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except torch.OutOfMemoryError as error:
        raise SystemExit(f"epa-train: out of memory ({str(error).splitlines()[0]}); lower --batch-size, or use "
                         f"--gradient-checkpointing, --precision bf16 or --lora-r") from None
    except (ConfigError, DataError, FloatingPointError) as error:
        raise SystemExit(f"epa-train: {error}") from None
