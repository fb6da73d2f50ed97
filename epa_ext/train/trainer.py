"""epa-train: align a causal LM with EPA or DPO on epa_ext's fused kernels.

Reads top to bottom as one run: set up devices, load and tokenize the data, load the policy
(and its reference), then step: each micro-batch's final hidden states go with the lm_head's
weight straight into epa_ext.fused_linear_epa_loss / fused_linear_dpo_loss, so the batch's
logits are never formed. Checkpoints are atomic and --resume continues bit-for-bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..losses import preference_metrics
from . import checkpoint as ckpt
from .config import TrainConfig, parse_config
from .data import (Batch, DataError, DropReport, TokenizedExample, collate, load_rows, parse_rows, render,
                   tokenize, weak_negative_sources)
from .modeling import (PreferenceLoss, build_tiny_model, frozen_copy, reference_logps, train_tiny_tokenizer,
                       unwrap)
from .plots import plot_training_curves


@dataclass
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """One process, or one of WORLD_SIZE under torchrun (gloo on CPU, nccl on GPU)."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda" if want_cuda else "cpu")
    rank = 0
    if world_size > 1:
        if want_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group("nccl" if want_cuda else "gloo")
        rank = dist.get_rank()
    return Runtime(rank, world_size, device)


def all_finite(loss: torch.Tensor, runtime: Runtime) -> bool:
    """Whether the loss is finite on every rank."""
    finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
    if runtime.world_size > 1:
        finite = finite.to(runtime.device if runtime.device.type == "cuda" else "cpu")
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def all_mean(values: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Mean of each value over the ranks."""
    if runtime.world_size == 1:
        return values
    keys = sorted(values)
    packed = torch.tensor([values[k] for k in keys], dtype=torch.float64,
                          device=runtime.device if runtime.device.type == "cuda" else "cpu")
    dist.all_reduce(packed)
    return {k: v / runtime.world_size for k, v in zip(keys, packed.tolist())}


# --- data ---------------------------------------------------------------------------------------


@dataclass
class Split:
    examples: list[TokenizedExample]
    weak_sources: list[list[tuple[int, int]]] | None


def load_examples(cfg: TrainConfig):
    """Rows -> normalized examples, with every dropped row counted."""
    rows = load_rows(cfg.dataset)
    examples, report = parse_rows(rows, source=cfg.dataset, skip_bad_rows=cfg.skip_bad_rows)
    if not examples:
        raise DataError(f"{cfg.dataset}: no usable example ({report.summary()})")
    return examples, report


def split_examples(tokenized: list[TokenizedExample], cfg: TrainConfig, num_weak: int) -> tuple[Split, Split]:
    """A seeded held-out split; weak negatives are borrowed within each split only."""
    order = torch.randperm(len(tokenized), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    num_eval = min(max(round(len(tokenized) * cfg.eval_fraction), 1 if cfg.eval_fraction > 0 else 0),
                   len(tokenized) - 1)
    eval_ids, train_ids = sorted(order[:num_eval]), sorted(order[num_eval:])

    def make(ids: list[int]) -> Split:
        examples = [tokenized[i] for i in ids]
        weak = num_weak if len(examples) > 1 else 0
        return Split(examples, weak_negative_sources(len(examples), weak, cfg.seed) if weak else None)

    return make(train_ids), make(eval_ids)


def make_batch(split: Split, ids: list[int], num_strong: int, num_weak: int, pad_id: int,
               device: torch.device, max_length: int) -> Batch:
    batch = collate([split.examples[i] for i in ids], ids, num_strong=num_strong,
                    num_weak=num_weak if split.weak_sources else 0, weak_sources=split.weak_sources,
                    all_examples=split.examples, pad_id=pad_id, max_length=max_length)
    for name in ("input_ids", "attention_mask", "labels", "candidate_mask"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch


def micro_batch_ids(num_examples: int, global_batch: int, seed: int, micro_index: int) -> list[int]:
    """The examples of the micro_index-th global micro-batch: a fresh seeded permutation per
    epoch, incomplete last batches dropped. A pure function of its arguments, so a resumed run
    sees the same batches."""
    per_epoch = num_examples // global_batch
    epoch, within = divmod(micro_index, per_epoch)
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[within * global_batch:(within + 1) * global_batch]


# --- models -------------------------------------------------------------------------------------


def load_initial_model(cfg: TrainConfig, tokenizer):
    from transformers import AutoModelForCausalLM

    if cfg.model == "tiny":
        return build_tiny_model(len(tokenizer), cfg.tiny_hidden_size, cfg.tiny_layers, cfg.max_length + 8, cfg.seed)
    return AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)


def load_tokenizer(cfg: TrainConfig, texts, resume_dir: Path | None):
    from transformers import AutoTokenizer

    if resume_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(resume_dir)
    elif cfg.model == "tiny":
        tokenizer = train_tiny_tokenizer(texts, cfg.tiny_vocab_size)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def wrap_lora(model, cfg: TrainConfig, resume_dir: Path | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_dir is not None:
        return PeftModel.from_pretrained(model, resume_dir, is_trainable=True)
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r, lora_dropout=0.0,
                        target_modules="all-linear")
    return get_peft_model(model, config)


def load_policy(cfg: TrainConfig, tokenizer, resume_dir: Path | None):
    """(policy, reference). The reference is the initial model, frozen; with LoRA it is None: the
    policy with its adapters disabled is the reference."""
    from transformers import AutoModelForCausalLM

    initial = load_initial_model(cfg, tokenizer)
    if cfg.lora_r:
        return wrap_lora(initial, cfg, resume_dir), None
    reference = frozen_copy(initial)
    policy = AutoModelForCausalLM.from_pretrained(resume_dir, dtype=torch.float32) if resume_dir else initial
    return policy, reference


@contextlib.contextmanager
def reference_mode(policy, reference):
    """The model that scores the reference log-probs."""
    if reference is not None:
        yield reference
        return
    was_training = policy.training
    policy.eval()
    with unwrap_peft(policy).disable_adapter():
        yield policy
    policy.train(was_training)


def unwrap_peft(model):
    """The model inside DDP wrappers, PEFT wrapper kept (it saves adapters, disables them)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def fingerprint(cfg: TrainConfig, split: Split, num_strong: int, num_weak: int) -> str:
    """What the cached reference log-probs depend on: the reference model, the tokenized data
    (hence the data file, tokenizer and truncation) and the candidate layout."""
    digest = hashlib.sha256()
    model_id = {"model": cfg.model, "lora": bool(cfg.lora_r)}
    if cfg.model == "tiny":
        model_id.update(seed=cfg.seed, hidden=cfg.tiny_hidden_size, layers=cfg.tiny_layers)
    elif Path(cfg.model, "config.json").is_file():
        model_id["config"] = Path(cfg.model, "config.json").read_text()
        model_id["weights"] = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                     for p in Path(cfg.model).glob("*.safetensors"))
    # "summed": the table holds summed log-probs (caches of length-averaged IPO tables are not reused)
    digest.update(json.dumps([model_id, num_strong, num_weak, "summed", split.weak_sources], default=str).encode())
    for example in split.examples:
        digest.update(json.dumps([example.prompt_ids, example.answer_ids]).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def precompute_reference(split: Split, scorer, cfg, num_strong, num_weak, pad_id, runtime) -> torch.Tensor:
    """[n, C] reference log-probs of every example's candidates (0 for padding candidates)."""
    rows = []
    for start in range(0, len(split.examples), cfg.batch_size):
        ids = list(range(start, min(start + cfg.batch_size, len(split.examples))))
        batch = make_batch(split, ids, num_strong, num_weak, pad_id, runtime.device, cfg.max_length)
        with autocast(cfg, runtime):
            logps = reference_logps(scorer, batch.input_ids, batch.attention_mask, batch.labels)
        rows.append(logps.view(batch.num_candidates, len(ids)).T.cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 1 + num_strong + num_weak)


def cached_reference(path: Path, compute, runtime: Runtime) -> torch.Tensor:
    """Computed by rank 0 into path (atomically), read by every rank."""
    if runtime.is_main and not path.is_file():
        table = compute()
        tmp = path.with_suffix(".tmp")
        torch.save(table, tmp)
        os.replace(tmp, path)
    if runtime.world_size > 1:
        dist.barrier()
    return torch.load(path, map_location="cpu")


def autocast(cfg: TrainConfig, runtime: Runtime):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(runtime.device.type, dtype=dtype)


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


# --- the run ------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl: one JSON line per logging step and per evaluation, written by rank 0. On
    resume, lines past the checkpoint's step are dropped so no step appears twice."""

    def __init__(self, path: Path, resumed_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut off by a kill
                    continue
                if record.get("step", 0) <= resumed_step:
                    kept.append(line)
            path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


def batch_metrics(loss_module: PreferenceLoss, batch: Batch, seq: torch.Tensor, ref: torch.Tensor,
                  beta: float) -> dict[str, float]:
    shape = (batch.num_candidates, -1)
    policy_bc, ref_bc = seq.detach().view(shape).T, ref.view(shape).T
    num_strong = 1 if loss_module.loss == "dpo" else batch.num_strong
    metrics = preference_metrics(policy_bc, ref_bc, beta=beta, num_strong=num_strong, mask=batch.candidate_mask)
    return {k: float(v) for k, v in metrics.items()}


def run(cfg: TrainConfig) -> list[dict]:
    """Trains as cfg says; returns the records written to metrics.jsonl."""
    from tqdm.auto import tqdm

    runtime = setup_runtime(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    resume_dir = None
    if cfg.resume:
        if runtime.is_main:
            ckpt.remove_partial_checkpoints(output_dir)
        found = ckpt.checkpoints(output_dir)
        resume_dir = found[-1][1] if found else None

    examples, report = load_examples(cfg)
    texts = (render(part, None, is_prompt=i == 0) for ex in examples
             for i, part in enumerate((ex.prompt, ex.chosen, *ex.rejected)))
    tokenizer = load_tokenizer(cfg, texts, resume_dir)
    tokenized = tokenize(examples, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         report=report)
    if cfg.loss == "dpo":
        num_strong, num_weak = 1, 0
    else:
        num_strong = cfg.num_strong or max(len(t.answer_ids) - 1 for t in tokenized)
        num_weak = cfg.num_weak
    train, held_out = split_examples(tokenized, cfg, num_weak)
    global_batch = cfg.batch_size * runtime.world_size
    if len(train.examples) < global_batch:
        raise DataError(f"{cfg.dataset}: {len(train.examples)} training examples, fewer than one batch of "
                        f"{global_batch} (--batch-size x processes); lower --batch-size or add data")
    per_epoch = len(train.examples) // global_batch
    total_steps = cfg.max_steps or max(math.ceil(cfg.epochs * per_epoch / cfg.grad_accum), 1)
    pad_id = tokenizer.pad_token_id

    policy, reference = load_policy(cfg, tokenizer, resume_dir)
    policy.to(runtime.device)
    if reference is not None:
        reference.to(runtime.device)
    loss_module = PreferenceLoss(policy, loss=cfg.loss, beta=cfg.beta, dpo_loss_type=cfg.dpo_loss_type,
                                 label_smoothing=cfg.label_smoothing, num_strong=num_strong,
                                 weak_weight=cfg.weak_weight)

    reference_tables = None
    if cfg.ref == "precompute":
        reference_tables = {}
        for name, split in (("train", train), ("eval", held_out)):
            key = fingerprint(cfg, split, num_strong, num_weak)
            with reference_mode(policy, reference) as scorer:
                reference_tables[name] = cached_reference(
                    output_dir / f"reference_logps-{name}-{key}.pt",
                    lambda: precompute_reference(split, scorer, cfg, num_strong, num_weak, pad_id, runtime), runtime)
        reference = None  # no reference model in memory from here on

    def reference_for(split_name: str, split: Split, batch: Batch) -> torch.Tensor:
        if reference_tables is not None:
            table = reference_tables[split_name][batch.example_ids]
            return table.T.reshape(-1).to(runtime.device)
        with reference_mode(policy, reference) as scorer, autocast(cfg, runtime):
            return reference_logps(scorer, batch.input_ids, batch.attention_mask, batch.labels)

    model = loss_module
    if cfg.fsdp:
        if cfg.lora_r:
            raise ValueError("--fsdp with --lora-r is not supported yet: LoRA adapters are small enough for DDP")
        if runtime.world_size > 1 and runtime.device.type != "cuda":
            raise ValueError("--fsdp across processes needs CUDA devices (NCCL); on CPU run torchrun without --fsdp")
        from torch.distributed.fsdp import fully_shard

        for layer in unwrap(policy).base_model.layers:
            fully_shard(layer)
        fully_shard(loss_module)
    elif runtime.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    trainable = [p for p in loss_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler(enabled=cfg.precision == "fp16" and runtime.device.type == "cuda")

    step, micro_index, skipped_steps = 0, 0, 0
    if resume_dir is not None:
        state = ckpt.load_trainer_state(resume_dir)
        load_optimizer_state(cfg, loss_module, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(state["rng"])
        step, micro_index, skipped_steps = state["step"], state["micro_index"], state.get("skipped_steps", 0)
    log = MetricsLog(output_dir / "metrics.jsonl", step, runtime.is_main)
    if runtime.is_main:
        (output_dir / "config.json").write_text(cfg.to_json() + "\n")
        if report.total():
            print(f"epa-train: {report.summary()}")

    def evaluate() -> dict[str, float]:
        if not held_out.examples:
            return {}
        policy.eval()
        sums: dict[str, float] = {}
        ids = list(range(runtime.rank, len(held_out.examples), runtime.world_size))
        with torch.no_grad():
            for start in range(0, len(ids), cfg.batch_size):
                chunk = ids[start:start + cfg.batch_size]
                batch = make_batch(held_out, chunk, num_strong, num_weak, pad_id, runtime.device, cfg.max_length)
                ref = reference_for("eval", held_out, batch)
                with autocast(cfg, runtime):
                    loss, seq = loss_module(batch.input_ids, batch.attention_mask, batch.labels, ref,
                                            batch.candidate_mask)
                values = {"loss": float(loss.detach()), **batch_metrics(loss_module, batch, seq, ref, cfg.beta)}
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value * len(chunk)
                sums["count"] = sums.get("count", 0.0) + len(chunk)
        policy.train()
        totals = all_mean(sums, runtime)
        return {f"eval/{k}": v / totals["count"] for k, v in totals.items() if k != "count"}

    progress = tqdm(total=total_steps, initial=step, disable=not runtime.is_main, desc=f"epa-train {cfg.loss}",
                    dynamic_ncols=True)
    policy.train()
    while step < total_steps:
        started, tokens, sums, nonfinite = time.perf_counter(), 0, {}, False
        for accum in range(cfg.grad_accum):
            ids = micro_batch_ids(len(train.examples), global_batch, cfg.seed, micro_index)
            ids = ids[runtime.rank * cfg.batch_size:(runtime.rank + 1) * cfg.batch_size]
            batch = make_batch(train, ids, num_strong, num_weak, pad_id, runtime.device, cfg.max_length)
            ref = reference_for("train", train, batch)
            sync = accum == cfg.grad_accum - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(cfg, runtime):
                loss, seq = model(batch.input_ids, batch.attention_mask, batch.labels, ref, batch.candidate_mask)
            if not all_finite(loss, runtime):  # the same decision on every rank
                if not cfg.skip_nonfinite_steps:
                    last = ckpt.checkpoints(output_dir)
                    raise FloatingPointError(
                        f"loss is not finite at step {step + 1} (micro-batch {micro_index}); last good checkpoint: "
                        f"{last[-1][1] if last else 'none'}. Lower --lr, use --precision fp32, or pass "
                        f"--skip-nonfinite-steps.")
                nonfinite = True
            # backward even for a step that will be skipped: DDP expects one after every forward
            scaler.scale(loss / cfg.grad_accum).backward()
            values = {"loss": float(loss.detach()), **batch_metrics(loss_module, batch, seq, ref, cfg.beta)}
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
            tokens += int(batch.attention_mask.sum())
            micro_index += 1
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        if nonfinite:  # the parameters and the optimizer state stay as they were
            skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
        else:
            scaler.step(optimizer)
        scaler.update()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        elapsed = time.perf_counter() - started
        record = all_mean({**sums, "grad_norm": float(grad_norm), "tokens_per_second": tokens / elapsed}, runtime)
        record["tokens_per_second"] *= runtime.world_size  # a sum over ranks, not a mean
        if cfg.skip_nonfinite_steps:
            record["nonfinite_steps_skipped"] = skipped_steps
        if step % cfg.logging_steps == 0 or step == total_steps:
            log.write({"step": step, "epoch": micro_index / per_epoch, "lr": lr, **record})
        progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}",
                             tok_s=f"{record['tokens_per_second']:.0f}")
        progress.update(1)
        if cfg.eval_steps and step % cfg.eval_steps == 0 and step < total_steps:
            log.write({"step": step, **evaluate()})
        if cfg.save_steps and step % cfg.save_steps == 0 and step < total_steps:
            save(cfg, runtime, output_dir, step, loss_module, tokenizer, optimizer, scheduler,
                 {"step": step, "micro_index": micro_index, "skipped_steps": skipped_steps})
    progress.close()
    final_eval = evaluate()
    if final_eval:
        log.write({"step": step, **final_eval})
    weights = full_weights(cfg, loss_module)
    if runtime.is_main:
        save_final(policy, tokenizer, output_dir / "final", weights)
        plot_training_curves(log.records(), output_dir / "training_curves.png")
    if runtime.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return log.records() if runtime.is_main else []


def full_weights(cfg: TrainConfig, loss_module: PreferenceLoss) -> dict | None:
    """With FSDP the parameters are shards: gather the policy's full weights (a collective: every
    rank calls it) on the CPU. None otherwise, and save_pretrained reads the model itself."""
    if not cfg.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(loss_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("policy."): v for k, v in state.items()}


def optimizer_state(cfg: TrainConfig, loss_module: PreferenceLoss, optimizer) -> dict:
    if not cfg.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(loss_module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(cfg: TrainConfig, loss_module: PreferenceLoss, optimizer, state: dict) -> None:
    if not cfg.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(loss_module, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def save(cfg, runtime, output_dir, step, loss_module, tokenizer, optimizer, scheduler, position: dict) -> None:
    """A checkpoint of everything a resumed run needs (position: step, micro_index and counters);
    collectives first, then rank 0 writes."""
    weights = full_weights(cfg, loss_module)
    state = {"optimizer": optimizer_state(cfg, loss_module, optimizer), "scheduler": scheduler.state_dict(),
             "rng": ckpt.rng_state(), **position}
    if runtime.is_main:
        ckpt.save_checkpoint(output_dir, step, unwrap_peft(loss_module.policy), tokenizer, state,
                             cfg.save_total_limit, model_state=weights)
    if runtime.world_size > 1:
        dist.barrier()


def save_final(policy, tokenizer, directory: Path, weights: dict | None = None) -> None:
    """A directory that AutoModelForCausalLM.from_pretrained loads (LoRA adapters merged in)."""
    model = unwrap_peft(policy)
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(directory)


def main(argv: list[str] | None = None) -> None:
    """The console script: problems with the options, the data or the run's numerics end with
    one line naming them instead of a traceback from deep inside a library."""
    try:
        run(parse_config(argv))
    except (DataError, FloatingPointError, ValueError) as error:
        raise SystemExit(f"epa-train: {error}") from None
