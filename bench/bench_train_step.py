"""Benchmark of one EPA optimizer step of a Llama-architecture model: epa-train's path (final
hidden states straight into fused_linear_epa_loss, through epa_ext.preference.loss.PreferenceLoss)
against the eager path a TRL user runs (the model's full logits, log_softmax, gather, masked sum,
then the loss; autograd).

    python bench/bench_train_step.py                       # speed: CPU, hidden 256, 4 layers, vocab 32000,
                                                            # fp32, 4 candidates x 2 prompts x 256 tokens
    python bench/bench_train_step.py --mode max-batch --memory-budget-mib 4096
    python bench/bench_train_step.py --mode checkpointing --prompts 4
    python bench/bench_train_step.py --device cuda --dtype bf16 --hidden 2048 --layers 8 --vocab 128256 --seq-len 1024

Modes:
- speed: step time, tokens/s (all candidate tokens) and peak memory, for both paths at --prompts.
- max-batch: for each path the largest micro-batch (prompts, doubling then bisecting) whose
  step's peak memory fits --memory-budget-mib, and tokens/s at that batch.
- checkpointing: epa-train's step with and without --gradient-checkpointing (the decoder layers
  recomputed in backward): peak memory and time.

Same model, batch and reference log-probs (given, as with a precomputed reference) for both
paths; fused AdamW for both; gradients are set to None after each step, as the trainers do.

Memory, in every mode (MEMORY_DEFINITION, recorded in the report): the peak of a path's first
optimizer step in a fresh process, above the model, its AdamW state and the batch, so it includes
the gradients the step forms; CPU: the rise of the process's peak resident set, CUDA: the caching
allocator's peak. A fresh process, because on CPU the peak resident set of a process that ran a
step before hides the memory that step's pages leave to reuse. (Before the report had a
memory_definition field, speed mode measured a step after the timed ones, in the timing process.)
The speed mode times both paths in turns in one process and takes each path's memory from a child.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import add_ratios_to_eager, finish, peak_extra_mib, time_interleaved, time_ms

import epa_ext
from epa_ext import eager
from epa_ext.preference.loss import LossSpec, PreferenceLoss
from epa_ext.train.modeling import enable_gradient_checkpointing

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MEMORY_DEFINITION = ("first-step-fresh-process: peak of the first optimizer step in a fresh process above the model, "
                     "its AdamW state and the batch (the step's gradients included); CPU: rise of the peak resident "
                     "set, CUDA: the caching allocator's peak")
PROVIDERS = ("eager", "epa_ext")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="speed", choices=["speed", "max-batch", "checkpointing"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2, help="micro-batch (speed, checkpointing)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype (weights stay fp32)")
    parser.add_argument("--memory-budget-mib", type=float, default=4096, help="max-batch: peak extra memory allowed")
    parser.add_argument("--max-prompts", type=int, default=256, help="max-batch: largest micro-batch tried")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default: 5 on CPU, 20 on CUDA)")
    parser.add_argument("--out", default=None, help="directory for the JSON report (default bench/results)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: measure one case, print JSON
    parser.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.reps = args.reps or (20 if args.device == "cuda" else 5)
    return args


class Step:
    """One optimizer step of provider's path on a seeded model and batch."""

    def __init__(self, args: argparse.Namespace, provider: str, prompts: int, gradient_checkpointing: bool = False):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                             num_key_value_heads=max(args.hidden // 64, 1), max_position_embeddings=args.seq_len)
        self.model = LlamaForCausalLM(config).to(args.device)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.train()
        self.args, self.provider, self.rows = args, provider, args.candidates * prompts
        self.input_ids = torch.randint(0, args.vocab, (self.rows, args.seq_len), device=args.device)
        self.attention_mask = torch.ones_like(self.input_ids)
        completion = torch.arange(args.seq_len, device=args.device).expand(self.rows, -1) >= args.seq_len // 2
        self.labels = epa_ext.completion_labels(self.input_ids, completion)
        self.ref_logps = -torch.rand(self.rows, device=args.device) * 100
        self.candidate_mask = torch.ones(prompts, args.candidates, dtype=torch.bool, device=args.device)
        self.fused = PreferenceLoss(self.model, LossSpec("epa", 0.1, num_strong=args.candidates - 1))
        # fused AdamW: epa-train's optimizer, and transformers' default (adamw_torch_fused) for TRL users
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6, fused=True)
        self.tokens = self.rows * args.seq_len

    def prepare_state(self) -> None:
        """AdamW state as after a first step, without running one; no gradients, as after the
        trainers' zero_grad, so that a step's peak includes the gradients it forms."""
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_row(self, timing: dict, peak_mib: float | None) -> dict:
        """A report row: the timing, the peak and tokens/s (all candidate tokens)."""
        return {**timing, "peak_extra_mib": peak_mib, "tokens_per_second": self.tokens / timing["median_ms"] * 1e3}

    def loss(self) -> torch.Tensor:
        if self.provider == "eager":
            logits = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask).logits
            loss, _ = eager.fused_epa_loss(logits.float(), self.labels, self.ref_logps,
                                           num_candidates=self.args.candidates)
            return loss
        loss, *_ = self.fused(self.input_ids, self.attention_mask, self.labels, self.ref_logps, self.candidate_mask)
        return loss

    def __call__(self) -> None:
        autocast = (torch.autocast(self.args.device, dtype=DTYPES[self.args.dtype]) if self.args.dtype != "fp32"
                    else torch.autocast(self.args.device, enabled=False))
        with autocast:
            loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # as epa-train and transformers' Trainer (TRL's) do


def measure(step: Step, reps: int) -> dict:
    """Peak extra memory of the process's first step (a fresh process), then the step's timing."""
    peak = peak_extra_mib(step, step.args.device)
    timing = time_ms(step, step.args.device, reps=reps, warmup=1)
    return step.timed_row(timing, peak)


def measure_in_child(args: argparse.Namespace, provider: str, prompts: int, checkpointing: bool = False,
                     reps: int | None = None) -> dict:
    command = [sys.executable, __file__, "--one", provider, "--prompts", str(prompts), "--reps", str(reps or args.reps),
               "--device", args.device, "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab",
               str(args.vocab), "--candidates", str(args.candidates), "--seq-len", str(args.seq_len), "--dtype",
               args.dtype] + (["--gradient-checkpointing"] if checkpointing else [])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        if "out of memory" in result.stderr.lower():
            return {"peak_extra_mib": float("inf")}
        raise RuntimeError(f"measuring {provider} at {prompts} prompts failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def largest_fitting(args: argparse.Namespace, provider: str) -> tuple[int, dict | None]:
    """(prompts, measurement) of the largest micro-batch whose peak fits the budget (0, None if
    not even one prompt fits): doubling, then bisecting. Probes are timed with 1 rep."""
    fits = lambda m: m["peak_extra_mib"] <= args.memory_budget_mib  # noqa: E731
    best, best_result, prompts = 0, None, 1
    while prompts <= args.max_prompts:
        result = measure_in_child(args, provider, prompts, reps=1)
        if not fits(result):
            break
        best, best_result, prompts = prompts, result, prompts * 2
    low, high = best, min(prompts, args.max_prompts + 1)
    while high - low > 1:
        middle = (low + high) // 2
        result = measure_in_child(args, provider, middle, reps=1)
        if fits(result):
            low, best, best_result = middle, middle, result
        else:
            high = middle
    # Timed properly at the chosen batch. The peak resident set of a step varies a little from
    # process to process (allocation order across threads): where this measurement no longer fits,
    # the batch steps down, so that the reported row always keeps the budget.
    while best:
        best_result = measure_in_child(args, provider, best)
        if fits(best_result):
            break
        best, best_result = best - 1, None
    return best, best_result


def describe(args: argparse.Namespace) -> str:
    return (f"EPA step: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.candidates} "
            f"candidates x {args.seq_len} tokens per prompt, {args.dtype}")


def main() -> None:
    args = parse_args()
    columns = ["provider", "prompts", "median_ms", "q20_ms", "q80_ms", "tokens_per_second", "speedup_vs_eager",
               "peak_extra_mib", "memory_vs_eager"]
    if args.one:
        step = Step(args, args.one, args.prompts, args.gradient_checkpointing)
        step.prepare_state()
        print(json.dumps(measure(step, args.reps)))
        return
    print(describe(args))
    if args.mode == "speed":
        # memory first, each path in its own fresh process (before this one holds any model)
        peaks = {name: measure_in_child(args, name, args.prompts, reps=1)["peak_extra_mib"] for name in PROVIDERS}
        steps = {name: Step(args, name, args.prompts) for name in PROVIDERS}
        for step in steps.values():  # the optimizer state exists before timing
            step()
        # timed in turns, so that a drift in a shared host's speed slows both paths alike
        timings = time_interleaved(steps, args.device, reps=args.reps)
        rows = [{"provider": name, "prompts": args.prompts, **step.timed_row(timings[name], peaks[name])}
                for name, step in steps.items()]
        add_ratios_to_eager(rows, ())
    elif args.mode == "max-batch":
        rows = []
        for name in PROVIDERS:
            prompts, result = largest_fitting(args, name)
            rows.append({"provider": name, "prompts": prompts, **(result or {})})
            print(f"{name}: {prompts} prompts fit {args.memory_budget_mib:.0f} MiB")
        eager_row = rows[0]
        for row in rows:
            if eager_row.get("tokens_per_second") and row.get("tokens_per_second"):
                row["speedup_vs_eager"] = row["tokens_per_second"] / eager_row["tokens_per_second"]
        columns.remove("memory_vs_eager")
    else:
        rows = [{"provider": "epa_ext" + (" + gradient checkpointing" if checkpointing else ""),
                 "prompts": args.prompts, **measure_in_child(args, "epa_ext", args.prompts, checkpointing)}
                for checkpointing in (False, True)]
        rows[1]["memory_vs_plain"] = rows[1]["peak_extra_mib"] / rows[0]["peak_extra_mib"]
        rows[1]["time_vs_plain"] = rows[1]["median_ms"] / rows[0]["median_ms"]
        columns = ["provider", "prompts", "median_ms", "tokens_per_second", "peak_extra_mib", "memory_vs_plain",
                   "time_vs_plain"]
    finish("train_step" if args.mode == "speed" else f"train_step_{args.mode.replace('-', '_')}", args.device, rows,
           columns, {"args": vars(args), "memory_definition": MEMORY_DEFINITION}, args.out)


if __name__ == "__main__":
    main()
