"""`epa-demo`: what epa_ext does, in two parts.

1. Sequence log-probs of a batch of completions, eager vs fused: a batch as a preference trainer
   sees it (prompt tokens masked out of the labels, logits [B, T, V]); per-sequence log-probs
   and their gradient once with plain torch (log_softmax + gather + masked sum) and once with
   epa_ext; how far apart they are and how long each took.
2. A short real EPA training run with epa-train: a tiny Llama-architecture model learns, from
   generated preference data, to prefer the sorted answer to a "sort these letters" prompt over
   unsorted ones (two strong negatives and two weak negatives per prompt), with a progress bar,
   metrics.jsonl and training_curves.png.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

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


def compare_logps(args) -> None:
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    prompt_lengths = torch.randint(args.seq_len // 4, args.seq_len // 2, (args.batch,))
    completion_mask = torch.arange(args.seq_len)[None, :] >= prompt_lengths[:, None]
    labels = epa_ext.completion_labels(input_ids, completion_mask)
    logits = torch.randn(args.batch, args.seq_len, args.vocab) * 2
    print(f"[1/2] batch of {args.batch} sequences x {args.seq_len} tokens, vocabulary {args.vocab}: "
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


def write_sorting_preferences(path: Path, num_examples: int, seed: int) -> None:
    """Prompts "sort: d a c b"; chosen: the letters sorted; rejected: two other orders."""
    rng = random.Random(seed)
    letters = "abcdefghij"
    with open(path, "w") as handle:
        for _ in range(num_examples):
            word = rng.sample(letters, rng.randint(3, 6))
            wrong = set()
            while len(wrong) < 2:
                candidate = rng.sample(word, len(word))
                if candidate != sorted(word):
                    wrong.add(" ".join(candidate))
            row = {"prompt": "sort: " + " ".join(word) + "\n", "chosen": " ".join(sorted(word)),
                   "rejected": sorted(wrong)}
            handle.write(json.dumps(row) + "\n")


def train_demo(args) -> None:
    from epa_ext.train.config import parse_config
    from epa_ext.train.trainer import run

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "sorting_preferences.jsonl"
    write_sorting_preferences(data, 600, seed=0)
    print(f"\n[2/2] EPA on {data} (tiny model, {args.steps} steps, 2 strong + 2 weak negatives per prompt)")
    started = time.perf_counter()
    records = run(parse_config([
        "--dataset", str(data), "--output-dir", str(out), "--model", "tiny", "--loss", "epa", "--num-weak", "2",
        "--max-steps", str(args.steps), "--batch-size", "8", "--lr", "3e-3", "--beta", "0.5", "--max-length", "48",
        "--max-prompt-length", "24", "--eval-fraction", "0.1", "--eval-steps", str(max(args.steps // 4, 1)),
        "--tiny-vocab-size", "256", "--tiny-hidden-size", "64", "--tiny-layers", "2",
    ]))
    evals = [r for r in records if "eval/loss" in r]
    print(f"\n{'step':>6} {'eval loss':>10} {'eval reward accuracy':>21} {'eval reward margin':>19}")
    for r in evals:
        print(f"{r['step']:>6} {r['eval/loss']:>10.4f} {r['eval/rewards/accuracies']:>21.3f} "
              f"{r['eval/rewards/margins']:>19.3f}")
    print(f"\ntrained in {time.perf_counter() - started:.0f} s; metrics: {out / 'metrics.jsonl'}; "
          f"curves: {out / 'training_curves.png'}; model: {out / 'final'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="part 1: sequences (chosen and rejected answers)")
    parser.add_argument("--seq-len", type=int, default=256, help="part 1: tokens per sequence")
    parser.add_argument("--vocab", type=int, default=32000, help="part 1: vocabulary size")
    parser.add_argument("--repeats", type=int, default=2, help="part 1: timed runs per provider")
    parser.add_argument("--steps", type=int, default=120, help="part 2: optimizer steps (0: skip the training run)")
    parser.add_argument("--output-dir", default="epa-demo-run", help="part 2: where the run writes its files")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    compare_logps(args)
    if args.steps:
        train_demo(args)


if __name__ == "__main__":
    main()
