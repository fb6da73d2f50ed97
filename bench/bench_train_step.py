"""Benchmark of one EPA optimizer step of a Llama-architecture model: epa_ext's path (final hidden
states straight into fused_linear_epa_loss, as epa-train does) against the eager path a TRL user
runs (the model's full logits, log_softmax, gather, masked sum, then the loss; autograd).

    python bench/bench_train_step.py            # CPU: hidden 256, 4 layers, vocab 32000, fp32,
                                                 # 4 candidates x 2 prompts x 256 tokens (half prompt)
    python bench/bench_train_step.py --device cuda --dtype bf16 --hidden 2048 --layers 8 --vocab 128256 --seq-len 1024

Same model, batch and reference log-probs (given, as with a precomputed reference) for both;
reported: step time, tokens/s (all candidate tokens) and peak memory above the model and
optimizer state.
"""

from __future__ import annotations

import argparse

import torch
from common import add_ratios_to_eager, finish, peak_extra_mib, time_ms

import epa_ext
from epa_ext import eager
from epa_ext.train.modeling import PreferenceLoss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype (weights stay fp32)")
    parser.add_argument("--reps", type=int, default=None, help="timed steps (default: 5 on CPU, 20 on CUDA)")
    parser.add_argument("--out", default=None, help="directory for the JSON report (default bench/results)")
    args = parser.parse_args()
    reps = args.reps or (20 if args.device == "cuda" else 5)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=max(args.hidden // 64, 1), max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(config).to(args.device)
    rows = args.candidates * args.prompts
    input_ids = torch.randint(0, args.vocab, (rows, args.seq_len), device=args.device)
    attention_mask = torch.ones_like(input_ids)
    completion = torch.arange(args.seq_len, device=args.device).expand(rows, -1) >= args.seq_len // 2
    labels = epa_ext.completion_labels(input_ids, completion)
    ref_logps = -torch.rand(rows, device=args.device) * 100
    candidate_mask = torch.ones(args.prompts, args.candidates, dtype=torch.bool, device=args.device)
    fused = PreferenceLoss(model, loss="epa", beta=0.1, dpo_loss_type="sigmoid", label_smoothing=0.0,
                           num_strong=args.candidates - 1, weak_weight=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    autocast = (torch.autocast(args.device, dtype=DTYPES[args.dtype]) if args.dtype != "fp32"
                else torch.autocast(args.device, enabled=False))

    def eager_loss():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss, _ = eager.fused_epa_loss(logits.float(), labels, ref_logps, num_candidates=args.candidates)
        return loss

    def fused_loss():
        loss, _, _ = fused(input_ids, attention_mask, labels, ref_logps, candidate_mask)
        return loss

    def step(loss_fn):
        with autocast:
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: both paths start from the same state

    for loss_fn in (eager_loss, fused_loss):  # optimizer state and gradient buffers exist before measuring
        step(loss_fn)
    results = []
    for name, loss_fn in (("eager", eager_loss), ("epa_ext", fused_loss)):
        timing = time_ms(lambda: step(loss_fn), args.device, reps=reps, warmup=1)
        results.append({"provider": name, **timing, "peak_extra_mib": peak_extra_mib(lambda: step(loss_fn), args.device),
                        "tokens_per_second": rows * args.seq_len / timing["median_ms"] * 1e3})
    add_ratios_to_eager(results, ())
    print(f"EPA step: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"{args.candidates} candidates x {args.prompts} prompts x {args.seq_len} tokens, {args.dtype}")
    finish("train_step", args.device, results,
           ["provider", "median_ms", "q20_ms", "q80_ms", "tokens_per_second", "speedup_vs_eager", "peak_extra_mib",
            "memory_vs_eager"], {"args": vars(args)}, args.out)


if __name__ == "__main__":
    main()
