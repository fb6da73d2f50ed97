"""Benchmark of sequence log-probs, forward / backward / full, eager torch vs torch.compile vs epa_ext.

    python bench/bench_logps.py                        # CPU: 4096 tokens, V = 32000, fp32
    python bench/bench_logps.py --device cuda --tokens 8192 --vocab 32000 128256 --dtype bf16 fp32
    python bench/bench_logps.py --softcap 30 --modes full --providers eager epa_ext epa_ext-nocap

eager is what a TRL user runs today (log_softmax, gather, masked sum; autograd); compile is
torch.compile of the same function; both come from epa_ext.eager. On CUDA each row also gets
its achieved bandwidth (bytes the op must move: forward reads the logits once, backward reads
them and writes their gradient) next to a same-size device copy. With --softcap C every provider
caps the logits at C * tanh(logits / C) and "epa_ext-nocap" is epa_ext without it, for the cap's
cost in the row kernels (logits are N(0, 1)).
"""

from __future__ import annotations

import argparse
import functools

import torch
from common import add_ratios_to_eager, finish, peak_extra_mib, time_ms

import epa_ext
from epa_ext import eager

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def providers(names: list[str], softcap: float | None) -> dict:
    capped_eager = functools.partial(eager.sequence_logps, softcap=softcap)
    table = {
        "eager": capped_eager,
        "compile": torch.compile(capped_eager),
        "epa_ext": functools.partial(epa_ext.sequence_logps, softcap=softcap),
    }
    if softcap is not None:
        table["epa_ext-nocap"] = epa_ext.sequence_logps
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise ValueError(f"--providers: unknown {unknown} (epa_ext-nocap needs --softcap); known: {sorted(table)}")
    return {name: table[name] for name in names}


def make_batch(tokens: int, vocab: int, seq_len: int, dtype, device, ignore_fraction: float):
    seq_len = min(seq_len, tokens)
    batch = max(tokens // seq_len, 1)
    logits = torch.randn(batch, seq_len, vocab, dtype=dtype, device=device).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq_len), device=device)
    labels[torch.rand(batch, seq_len, device=device) < ignore_fraction] = epa_ext.IGNORE_INDEX
    return logits, labels


def copy_bandwidth(logits, device, reps) -> float:
    """GB/s of a device copy of a logits-sized tensor (bytes read + written)."""
    src = logits.detach()
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), device, reps=reps)
    return 2 * src.numel() * src.element_size() / timing["median_ms"] / 1e6


def run_case(name, fn, mode, logits, labels, device, reps):
    def forward():
        return fn(logits, labels)

    def full():
        fn(logits, labels).sum().backward()
        return logits.grad

    pending = {}

    def prepare_backward():
        clear_grad()
        pending["out"] = forward()

    def backward():
        pending.pop("out").sum().backward()
        return logits.grad

    def clear_grad():
        logits.grad = None

    if mode == "forward":
        timing = time_ms(forward, device, reps=reps)
        memory = peak_extra_mib(forward, device)
    elif mode == "backward":
        timing = time_ms(backward, device, reps=reps, setup=prepare_backward)
        prepare_backward()
        memory = peak_extra_mib(backward, device)
    else:
        timing = time_ms(full, device, reps=reps, setup=clear_grad)
        clear_grad()
        memory = peak_extra_mib(full, device)
    clear_grad()
    moved = logits.numel() * logits.element_size() * {"forward": 1, "backward": 2, "full": 3}[mode]
    return {"provider": name, "mode": mode, **timing, "peak_extra_mib": memory,
            "gb_per_s": moved / timing["median_ms"] / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=4096, help="rows N = batch x sequence length")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["forward", "backward", "full"])
    parser.add_argument("--providers", nargs="+", default=["eager", "compile", "epa_ext"])
    parser.add_argument("--ignore-fraction", type=float, default=0.0, help="share of labels set to ignore_index")
    parser.add_argument("--softcap", type=float, default=None, help="logit softcap C of every provider (Gemma-2: 30)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default: 7 on CPU, 50 on CUDA)")
    parser.add_argument("--out", default=None, help="directory for the JSON report (default bench/results)")
    args = parser.parse_args()
    reps = args.reps or (50 if args.device == "cuda" else 7)
    torch.manual_seed(0)

    rows, copies = [], {}
    chosen = providers(args.providers, args.softcap)
    for dtype_name in args.dtype:
        for vocab in args.vocab:
            logits, labels = make_batch(args.tokens, vocab, args.seq_len, DTYPES[dtype_name], args.device,
                                        args.ignore_fraction)
            case = {"dtype": dtype_name, "tokens": logits.shape[0] * logits.shape[1], "vocab": vocab}
            copy_gbps = copy_bandwidth(logits, args.device, reps) if args.device == "cuda" else None
            copies[f"{dtype_name}/{vocab}"] = copy_gbps
            for mode in args.modes:
                for name, fn in chosen.items():
                    row = {**case, **run_case(name, fn, mode, logits, labels, args.device, reps)}
                    if copy_gbps:
                        row["copy_gb_per_s"] = copy_gbps
                        row["fraction_of_copy"] = row["gb_per_s"] / copy_gbps
                    rows.append(row)
            del logits, labels
    add_ratios_to_eager(rows, ("mode", "dtype", "vocab"))
    columns = ["dtype", "vocab", "mode", "provider", "median_ms", "q20_ms", "q80_ms", "speedup_vs_eager",
               "peak_extra_mib", "memory_vs_eager", "gb_per_s"]
    if args.device == "cuda":
        columns.append("fraction_of_copy")
    name = "logps" if args.softcap is None else f"logps_softcap{args.softcap:g}"
    finish(name, args.device, rows, columns, {"args": vars(args), "copy_gb_per_s": copies}, args.out)


if __name__ == "__main__":
    main()
