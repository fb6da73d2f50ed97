"""Benchmark of sequence log-probs from hidden states and the lm_head: the eager path (full
logits, log_softmax, gather, masked sum; autograd) against epa_ext.linear_sequence_logps.

    python bench/bench_fused_linear.py          # CPU: N = 8192 tokens, H = 512, V = 65536, fp32
    python bench/bench_fused_linear.py --device cuda --tokens 16384 --hidden 4096 --vocab 128256 --dtype bf16

Modes: forward (no grad), full (forward + backward for hidden and weight). Each case runs with all
labels kept and with half of them ignored (prompt tokens). Work is counted as 2*N*H*V flops
forward and 6*N*H*V forward + backward; on CUDA it is set against a measured bf16/fp32 matmul
rate on the same card.
"""

from __future__ import annotations

import argparse

import torch
from common import add_ratios_to_eager, finish, peak_extra_mib, time_ms

import epa_ext
from epa_ext import eager

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_tflops(hidden_size: int, vocab: int, dtype, device: str, reps: int) -> float:
    """The card's rate on a matmul shaped like one chunk: [4096, H] x [H, V]."""
    a = torch.randn(4096, hidden_size, dtype=dtype, device=device)
    b = torch.randn(hidden_size, vocab, dtype=dtype, device=device)
    timing = time_ms(lambda: a @ b, device, reps=reps)
    return 2 * 4096 * hidden_size * vocab / timing["median_ms"] / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["forward", "full"])
    parser.add_argument("--ignored", nargs="+", type=float, default=[0.0, 0.5], help="shares of ignored labels")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default: 3 on CPU, 10 on CUDA)")
    parser.add_argument("--out", default=None, help="directory for the JSON report (default bench/results)")
    args = parser.parse_args()
    reps = args.reps or (10 if args.device == "cuda" else 3)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    batch = max(args.tokens // args.seq_len, 1)
    hidden = torch.randn(batch, args.seq_len, args.hidden, dtype=dtype, device=args.device).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, dtype=dtype, device=args.device) / args.hidden**0.5).requires_grad_()
    tokens = batch * args.seq_len
    providers = {"eager": eager.linear_sequence_logps, "epa_ext": epa_ext.linear_sequence_logps}
    rate = matmul_tflops(args.hidden, args.vocab, dtype, args.device, reps) if args.device == "cuda" else None

    rows = []
    for ignored in args.ignored:
        labels = torch.randint(0, args.vocab, (batch, args.seq_len), device=args.device)
        labels[:, : int(args.seq_len * ignored)] = epa_ext.IGNORE_INDEX  # the prompt comes first
        for mode in args.modes:
            for name, fn in providers.items():
                def run(fn=fn, mode=mode):
                    if mode == "forward":
                        with torch.no_grad():
                            return fn(hidden, weight, labels)
                    return torch.autograd.grad(fn(hidden, weight, labels).sum(), [hidden, weight])

                timing = time_ms(run, args.device, reps=reps, warmup=1)
                flops = (2 if mode == "forward" else 6) * tokens * args.hidden * args.vocab
                row = {"ignored": ignored, "mode": mode, "provider": name, **timing,
                       "peak_extra_mib": peak_extra_mib(run, args.device),
                       "tflops": flops / timing["median_ms"] / 1e9}
                if rate:
                    row["fraction_of_matmul"] = row["tflops"] / rate
                rows.append(row)
    add_ratios_to_eager(rows, ("mode", "ignored"))
    print(f"N = {tokens} tokens, H = {args.hidden}, V = {args.vocab}, {args.dtype}"
          + (f"; matmul rate {rate:.0f} TFLOP/s" if rate else ""))
    columns = ["ignored", "mode", "provider", "median_ms", "q20_ms", "q80_ms", "speedup_vs_eager", "peak_extra_mib",
               "memory_vs_eager", "tflops"] + (["fraction_of_matmul"] if rate else [])
    finish("fused_linear", args.device, rows, columns, {"args": vars(args), "matmul_tflops": rate}, args.out)


if __name__ == "__main__":
    main()
