"""Benchmark of one training step's loss part: EPA from logits, forward + backward.

    python bench/bench_losses.py                 # CPU: B = 4 prompts x C = 4 candidates x T = 512, V = 32000, fp32
    python bench/bench_losses.py --device cuda --dtype bf16 --vocab 128256

Providers: eager, the composition a TRL user writes today (log_softmax, gather, masked sum, then
the loss; autograd), from epa_ext.eager; epa_ext.fused_epa_loss; and the same with
inplace_backward=True, which writes d(logits) over the logits. Memory is the peak above what
exists before the step (the logits themselves), with d(logits) kept alive.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from common import add_ratios_to_eager, finish, peak_extra_mib, time_ms

import epa_ext
from epa_ext import eager

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--prompt-fraction", type=float, default=0.5, help="share of each sequence that is prompt")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default: 5 on CPU, 30 on CUDA)")
    parser.add_argument("--out", default=None, help="directory for the JSON report (default bench/results)")
    args = parser.parse_args()
    reps = args.reps or (30 if args.device == "cuda" else 5)
    torch.manual_seed(0)

    rows = args.prompts * args.candidates
    shape = (rows, args.seq_len, args.vocab)
    base = torch.randn(shape, dtype=DTYPES[args.dtype], device=args.device)
    labels = torch.randint(0, args.vocab, shape[:2], device=args.device)
    labels[:, : int(args.seq_len * args.prompt_fraction)] = epa_ext.IGNORE_INDEX
    labels[:, -1] = epa_ext.IGNORE_INDEX
    ref_logps = -torch.rand(rows, device=args.device) * 100
    options = dict(num_candidates=args.candidates, beta=0.1)
    providers = {
        "eager": partial(eager.fused_epa_loss, **options),
        "epa_ext": partial(epa_ext.fused_epa_loss, **options),
        "epa_ext inplace": partial(epa_ext.fused_epa_loss, inplace_backward=True, **options),
    }

    state = {}

    def fresh_logits():  # untimed: in-place providers overwrite the logits
        state.clear()
        # The logits as an lm_head hands them over: the output of an op, not a leaf (which
        # inplace_backward refuses to overwrite).
        state["logits"] = base.clone().requires_grad_().clone()

    def step(fn):
        # autograd.grad hands d(logits) to the caller as an lm_head's backward would receive it
        # (accumulating it into a leaf's .grad would copy an in-place gradient).
        logits = state["logits"]
        loss, _ = fn(logits, labels, ref_logps)
        return torch.autograd.grad(loss, [logits])[0]

    results = []
    for name, fn in providers.items():
        timing = time_ms(partial(step, fn), args.device, reps=reps, setup=fresh_logits)
        fresh_logits()
        memory = peak_extra_mib(partial(step, fn), args.device)
        results.append({"provider": name, **timing, "peak_extra_mib": memory})
    add_ratios_to_eager(results, ())
    logits_mib = base.numel() * base.element_size() / 2**20
    print(f"EPA loss step, logits [{rows}, {args.seq_len}, {args.vocab}] {args.dtype} = {logits_mib:.0f} MiB, "
          f"{args.prompt_fraction:.0%} prompt tokens")
    finish("losses", args.device, results,
           ["provider", "median_ms", "q20_ms", "q80_ms", "speedup_vs_eager", "peak_extra_mib", "memory_vs_eager"],
           {"args": vars(args), "logits_mib": logits_mib}, args.out)


if __name__ == "__main__":
    main()
