"""Benchmark of the preference losses from hidden states and the lm_head, side by side:

- eager: full logits h @ W^T, log_softmax, gather, masked sum, the loss (epa_ext.eager); autograd;
- liger: Liger-Kernel's LigerFusedLinearDPOLoss (chunked, torch.compile'd, gradient in the
  forward; DPO only);
- recompute: epa_ext.fused_linear_*_loss(differentiable_logps=True), the recomputing path
  (4 matmuls: the backward recomputes each chunk's logits);
- epa_ext: epa_ext.fused_linear_*_loss, the three-matmul path (gradient formed in the forward,
  whole prompt groups per chunk);
- epa_ext@N (with --max-chunk-tokens N): the same with a budget of N tokens per chunk; a group
  over it goes in pieces, the logits of all but the last recomputed (less memory, more matmuls).

With --softcap C (Gemma-2's final_logit_softcapping is 30) every provider computes the log-probs of
C * tanh(logits / C): eager on its logits, epa_ext in its row kernels; "epa_ext-nocap" is epa_ext
without it, for the softcap's cost. Liger's chunked DPO loss has no softcap and is left out; on
CUDA, "liger_flce" is Liger's softcapped fused linear cross-entropy over the same kept tokens (a
token loss, not DPO, for the speed of a softcapped fused head). Hidden states are N(0, 1) and the
lm_head is scaled so that the logits are N(0, --logit-std^2) (default 1: far below a cap of 30).

    python bench/bench_fused_linear.py          # CPU: 4096 tokens, H = 512, V = 32000 and 65536, fp32
    python bench/bench_fused_linear.py --vocab 32000 --losses dpo --max-chunk-tokens 256 128
    python bench/bench_fused_linear.py --device cuda --tokens 16384 --hidden 4096 --vocab 128256 --dtype bf16
    python bench/bench_fused_linear.py --vocab 32000 --softcap 30 --providers eager epa_ext epa_ext-nocap

DPO takes pairs of 256-token sequences, EPA groups of 4 candidates of 128 tokens (so a prompt
group, C x T = 512 tokens, fits the default chunk budget max(H, 512)); with half of the labels
ignored, the first half of every sequence is the prompt. Mode "full" is forward + backward for
hidden and weight, "forward" the loss alone without gradients (reference scoring).

Conventions: Liger computes the reference's log-probs itself from the reference's hidden states
and weight (one more matmul per chunk, under no_grad); epa_ext's ops take precomputed reference
log-probs (epa-train computes them with the reference model or from its cache). For one loss for
all, Liger runs with use_ref_model=False and every provider gets reference log-probs of 0; the
losses then agree, and the table gives each provider's largest deviation from eager in the loss
and in the gradients (same dtype). Liger chunks by pairs (chunk_size=1, its default) and computes
the logits of every position, ignored ones included.

On CUDA each case is also timed with a torch.cuda._sleep queued before the start event, so that
the host has enqueued the work before the device reaches it: "queued_ms" is then the device's
time without the host's per-call overhead, except where an op itself waits for the device (the
fused-linear ops read the labels on the host once per call).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import add_ratios_to_eager, finish, peak_allocated_mib, peak_extra_mib, time_interleaved, time_ms

import epa_ext
from epa_ext import eager

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = {"dpo": (2, 256), "epa": (4, 128)}  # candidates per prompt, tokens per sequence


def liger_dpo():
    """Liger's fused linear DPO loss, or None where liger-kernel is not installed."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError:
        return None
    return LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=True)


def liger_flce(softcap: float):
    """Liger's softcapped fused linear cross-entropy (Triton: CUDA only), or None without liger."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(softcap=softcap, reduction="sum")


def providers(loss: str, candidates: int, budgets: list[int], softcap: float | None, device: str) -> dict:
    """name -> fn(hidden, weight, labels, ref) -> loss."""
    if loss == "dpo":
        ours = lambda h, w, y, r, **options: epa_ext.fused_linear_dpo_loss(h, w, y, r, **options)[0]  # noqa: E731
        table = {"eager": lambda h, w, y, r: eager.fused_dpo_loss(h @ w.T, y, r, softcap=softcap)[0]}
    else:
        ours = lambda h, w, y, r, **options: epa_ext.fused_linear_epa_loss(  # noqa: E731
            h, w, y, r, num_candidates=candidates, **options)[0]
        table = {"eager": lambda h, w, y, r: eager.fused_epa_loss(h @ w.T, y, r, candidates, softcap=softcap)[0]}
    table["recompute"] = lambda h, w, y, r: ours(h, w, y, r, differentiable_logps=True, softcap=softcap)
    table["epa_ext"] = lambda h, w, y, r: ours(h, w, y, r, softcap=softcap)
    for budget in budgets:
        table[f"epa_ext@{budget}"] = lambda h, w, y, r, budget=budget: ours(h, w, y, r, max_chunk_tokens=budget,
                                                                              softcap=softcap)
    if softcap is not None:
        table["epa_ext-nocap"] = ours
        flce = liger_flce(softcap) if device == "cuda" else None
        if flce is not None:
            table["liger_flce"] = lambda h, w, y, r: flce(w, h.flatten(0, 1), y.flatten())
        return table
    liger = liger_dpo() if loss == "dpo" else None
    if liger is not None:
        table["liger"] = lambda h, w, y, r: liger(w, h, y)[0]
    return table


def matmul_tflops(hidden_size: int, vocab: int, dtype, device: str, reps: int) -> float:
    """The card's rate on a matmul shaped like one chunk: [4096, H] x [H, V]."""
    a = torch.randn(4096, hidden_size, dtype=dtype, device=device)
    b = torch.randn(hidden_size, vocab, dtype=dtype, device=device)
    timing = time_ms(lambda: a @ b, device, reps=reps)
    return 2 * 4096 * hidden_size * vocab / timing["median_ms"] / 1e9


def queued_ms(fn, reps: int) -> float:
    """Median device time of fn with the host's launches hidden behind a queued sleep (CUDA)."""
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)  # ~20-40 ms of device time, long enough to enqueue a step
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def deviations(result, baseline) -> dict:
    """Largest |loss - eager's| and largest gradient deviation relative to eager's largest entry."""
    (loss, grads), (base_loss, base_grads) = result, baseline
    out = {"loss_value": loss.item(), "loss_dev": abs(loss.item() - base_loss.item())}
    for name, g, b in zip(("d_hidden", "d_weight"), grads, base_grads):
        out[f"{name}_rel_dev"] = ((g.double() - b.double()).abs().max() / b.double().abs().max()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (sequences x sequence length)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 65536])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--losses", nargs="+", default=["dpo", "epa"], choices=list(LAYOUTS))
    parser.add_argument("--providers", nargs="+", default=["eager", "liger", "recompute", "epa_ext"])
    parser.add_argument("--modes", nargs="+", default=["full"], choices=["full", "forward"])
    parser.add_argument("--max-chunk-tokens", type=int, nargs="*", default=[],
                        help="also run epa_ext with these chunk budgets (providers epa_ext@N)")
    parser.add_argument("--ignored", nargs="+", type=float, default=[0.0, 0.5], help="shares of ignored labels")
    parser.add_argument("--softcap", type=float, default=None,
                        help="logit softcap C of every provider (Gemma-2: 30); adds epa_ext-nocap")
    parser.add_argument("--logit-std", type=float, default=1.0,
                        help="standard deviation of the logits (the lm_head's scale; N(0, 1) hidden states)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs (default: 3 on CPU, 10 on CUDA)")
    parser.add_argument("--out", default=None, help="directory for the JSON report (default bench/results)")
    parser.add_argument("--report-name", default=None,
                        help="file name stem of the report (default: fused_linear, fused_linear_softcapC with --softcap)")
    args = parser.parse_args()
    reps = args.reps or (10 if args.device == "cuda" else 3)
    dtype = DTYPES[args.dtype]
    if "liger" in args.providers and liger_dpo() is None:
        print("liger-kernel is not installed: the liger provider is left out")

    rows = []
    for vocab in args.vocab:
        rate = matmul_tflops(args.hidden, vocab, dtype, args.device, reps) if args.device == "cuda" else None
        for loss in args.losses:
            candidates, seq_len = LAYOUTS[loss]
            sequences = max(args.tokens // seq_len // candidates, 1) * candidates
            torch.manual_seed(0)
            hidden = torch.randn(sequences, seq_len, args.hidden, dtype=dtype, device=args.device).requires_grad_()
            weight = (torch.randn(vocab, args.hidden, dtype=dtype, device=args.device)
                      * (args.logit_std / args.hidden**0.5)).requires_grad_()
            ref = torch.zeros(sequences, device=args.device)
            table = {k: v for k, v in providers(loss, candidates, args.max_chunk_tokens, args.softcap,
                                                args.device).items()
                     if k in args.providers or k.startswith("epa_ext@") or k == "liger_flce"}
            for ignored in args.ignored:
                labels = torch.randint(0, vocab, (sequences, seq_len), device=args.device)
                labels[:, : int(seq_len * ignored)] = epa_ext.IGNORE_INDEX  # the prompt comes first
                kept = int((labels != epa_ext.IGNORE_INDEX).sum())
                baseline = None
                for mode in args.modes:
                    runs, case_rows = {}, []
                    for name, fn in table.items():
                        def run(fn=fn, mode=mode):
                            if mode == "forward":
                                with torch.no_grad():
                                    return fn(hidden, weight, labels, ref)
                            value = fn(hidden, weight, labels, ref)
                            return value.detach(), torch.autograd.grad(value, [hidden, weight])

                        result = run()
                        row = {"vocab": vocab, "loss": loss, "ignored": ignored, "mode": mode, "provider": name,
                               "tokens": sequences * seq_len, "kept_tokens": kept}
                        if mode == "full":
                            baseline = result if name == "eager" else baseline
                            if baseline is not None and name not in ("epa_ext-nocap", "liger_flce"):  # other losses
                                row.update(deviations(result, baseline))
                        del result
                        row["peak_extra_mib"] = peak_extra_mib(run, args.device)
                        if args.device == "cpu":
                            row["peak_allocated_mib"] = peak_allocated_mib(run, args.device)
                        runs[name] = run
                        case_rows.append(row)
                    # timed in turns, so that a drift in the machine's speed slows every provider alike
                    timings = time_interleaved(runs, args.device, reps=reps)
                    for row in case_rows:
                        row.update(timings[row["provider"]])
                        flops = (2 if mode == "forward" else 6) * kept * args.hidden * vocab
                        row["tflops_kept"] = flops / row["median_ms"] / 1e9
                        if args.device == "cuda":
                            row["queued_ms"] = queued_ms(runs[row["provider"]], reps)
                            row["fraction_of_matmul"] = row["tflops_kept"] / rate
                        print(f"V={vocab} {loss} ignored={ignored} {mode} {row['provider']}: "
                              f"{row['median_ms']:.1f} ms, peak extra {row['peak_extra_mib']} MiB", flush=True)
                    rows.extend(case_rows)
    add_ratios_to_eager(rows, ("vocab", "loss", "ignored", "mode"))
    cap = f", softcap {args.softcap:g}" if args.softcap is not None else ""
    print(f"{args.dtype}, H = {args.hidden}, {args.tokens} tokens per step{cap}")
    columns = ["vocab", "loss", "ignored", "mode", "provider", "median_ms", "q20_ms", "q80_ms", "speedup_vs_eager",
               "peak_extra_mib", "memory_vs_eager", "loss_dev", "d_hidden_rel_dev", "d_weight_rel_dev", "tflops_kept"]
    columns += ["queued_ms", "fraction_of_matmul"] if args.device == "cuda" else ["peak_allocated_mib",
                                                                                  "allocated_vs_eager"]
    name = args.report_name or ("fused_linear" if args.softcap is None else f"fused_linear_softcap{args.softcap:g}")
    finish(name, args.device, rows, columns, {"args": vars(args)}, args.out)


if __name__ == "__main__":
    main()
