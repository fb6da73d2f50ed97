"""`epa-demo`: sequence log-probs of a batch of chosen/rejected completions, eager vs fused.

Builds a batch as a preference trainer sees it (prompt tokens masked out of the labels, logits
of a causal LM as [B, T, V]), computes per-sequence log-probs and their gradient once with plain
torch (log_softmax + gather + masked sum) and once with epa_ext, and prints how far apart they
are, how long each took and how much memory each needed on top of the logits.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import epa_ext
from epa_ext import reference


def _timed(fn, logits, labels, repeats):
    best = float("inf")
    for _ in range(repeats):
        x = logits.detach().requires_grad_()
        start = time.perf_counter()
        seq = fn(x, labels)
        seq.sum().backward()
        best = min(best, time.perf_counter() - start)
    return seq.detach(), x.grad, best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences (chosen and rejected answers)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    prompt_lengths = torch.randint(args.seq_len // 4, args.seq_len // 2, (args.batch,))
    completion_mask = torch.arange(args.seq_len)[None, :] >= prompt_lengths[:, None]
    labels = epa_ext.completion_labels(input_ids, completion_mask)
    logits = torch.randn(args.batch, args.seq_len, args.vocab) * 2
    print(f"batch of {args.batch} sequences x {args.seq_len} tokens, vocabulary {args.vocab}: "
          f"logits {logits.numel() * 4 / 2**20:.0f} MiB fp32, {int((labels != -100).sum())} completion tokens "
          f"(CPU kernels: {epa_ext.cpu_capability()}, {torch.get_num_threads()} threads)")

    eager_seq, eager_grad, eager_s = _timed(reference.sequence_logps, logits, labels, args.repeats)
    fused_seq, fused_grad, fused_s = _timed(epa_ext.sequence_logps, logits, labels, args.repeats)
    truth = reference.sequence_logps(logits.double(), labels)

    print(f"\n{'sequence':>8} {'eager logp':>14} {'epa_ext logp':>14} {'float64 logp':>14}")
    for b in range(min(args.batch, 4)):
        print(f"{b:>8} {eager_seq[b]:>14.4f} {fused_seq[b]:>14.4f} {truth[b]:>14.4f}")
    print(f"\nmax |epa_ext - float64| over sequences: {(fused_seq.double() - truth).abs().max():.2e}"
          f"   (eager: {(eager_seq.double() - truth).abs().max():.2e})")
    print(f"max |d(logits) epa_ext - eager|:         {(fused_grad - eager_grad).abs().max():.2e}")
    print(f"forward + backward, best of {args.repeats}: eager {eager_s * 1e3:.0f} ms, "
          f"epa_ext {fused_s * 1e3:.0f} ms ({eager_s / fused_s:.1f}x faster)")
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
