"""DPO training through TRL, side by side: TRL 1.16's DPOTrainer (its default path, and with
use_liger_kernel=True) against epa_ext's EPATrainer (epa_ext.integrations.trl), same
Llama-architecture model, data, batches, reference model and optimizer.

    python bench/bench_trl.py          # CPU: hidden 256, 4 layers, vocab 32000, fp32, 4 pairs x 256 tokens
    python bench/bench_trl.py --device cuda --dtype bf16 --hidden 2048 --layers 8 --vocab 128256 \\
        --prompt-len 512 --answer-len 512 --batch 4 --reps 10

Every provider trains in a process of its own (so that the peak memory is its own) for --warmup +
--reps optimizer steps of loss_type="sigmoid" with a reference model scored every step (TRL's
default), logging every step. Reported per provider: median step time (20/80 % quantiles),
steps/s, tokens/s (every token of the batch: prompt and answer of the chosen and rejected rows, as
TRL's num_tokens counts them), the peak memory of a step above what exists when it starts (weights,
gradients, optimizer state, reference model; the CPU's peak resident set, CUDA's allocator), and
the mean loss of the timed steps (the providers must agree on it). A provider that cannot run
here is reported with its error instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, finish, memory_mark, peak_since_mib

PROVIDERS = {
    "trl": "TRL DPOTrainer (default: its chunked fused lm_head)",
    "trl_liger": "TRL DPOTrainer, use_liger_kernel=True",
    "epa_ext": "EPATrainer (epa_ext fused-linear loss)",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (TRL's bf16=True)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--answer-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off here by default")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))
    parser.add_argument("--out", default=None, help="directory for the JSON report (default bench/results)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def word_tokenizer(vocab: int):
    """A word-level tokenizer whose words t0, t1, ... are one token each, so that texts of random
    words have exactly the lengths asked for."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    words = {token: i for i, token in enumerate(specials + [f"t{i}" for i in range(vocab - len(specials))])}
    backend = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def preference_rows(args: argparse.Namespace) -> list[dict]:
    """Random texts: prompts of prompt_len tokens, answers of answer_len tokens ending in </s>."""
    generator = torch.Generator().manual_seed(0)

    def text(length: int) -> str:
        ids = torch.randint(0, args.vocab - 3, (length,), generator=generator).tolist()
        return "".join(f" t{i}" for i in ids)

    rows = args.batch * (args.warmup + args.reps)
    return [{"prompt": text(args.prompt_len).strip(), "chosen": text(args.answer_len - 1) + " </s>",
             "rejected": text(args.answer_len - 1) + " </s>"} for _ in range(rows)]


def run_provider(args: argparse.Namespace) -> dict:
    """Trains with one provider in this process; returns its measurements."""
    import transformers
    import trl
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    provider, device = args.child, args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=max(args.hidden // 64, 1),
                         max_position_embeddings=args.prompt_len + args.answer_len, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    model = LlamaForCausalLM(config)
    ref_model = LlamaForCausalLM(config)
    ref_model.load_state_dict(model.state_dict())
    if provider == "epa_ext":
        from epa_ext.integrations.trl import EPAConfig as Config
        from epa_ext.integrations.trl import EPATrainer as Trainer
    else:
        Config, Trainer = DPOConfig, DPOTrainer
    out_dir = tempfile.mkdtemp(prefix=f"bench_trl_{provider}_")
    train_args = Config(
        output_dir=out_dir, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.reps,
        logging_steps=1, learning_rate=1e-6, bf16=args.dtype == "bf16", use_cpu=device == "cpu",
        gradient_checkpointing=args.gradient_checkpointing, max_length=args.prompt_len + args.answer_len,
        report_to="none", save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        use_liger_kernel=provider == "trl_liger")
    steps: list[dict] = []

    class StepMeter(TrainerCallback):
        """Time and peak memory of each optimizer step (from before its first forward to after the
        optimizer's update)."""

        def on_step_begin(self, *_, **__):
            self.mark = memory_mark(device)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.start
            steps.append({"seconds": seconds, "peak_extra_mib": peak_since_mib(device, self.mark)})

    trainer = Trainer(model=model, ref_model=ref_model, args=train_args, train_dataset=Dataset.from_list(
        preference_rows(args)), processing_class=word_tokenizer(args.vocab), callbacks=[StepMeter()])
    trainer.train()
    timed = steps[args.warmup:]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][args.warmup:]
    seconds = sorted(step["seconds"] for step in timed)
    quantiles = statistics.quantiles(seconds, n=5, method="inclusive") if len(seconds) > 1 else seconds * 4
    median = statistics.median(seconds)
    tokens = 2 * args.batch * (args.prompt_len + args.answer_len)
    return {"provider": provider, "what": PROVIDERS[provider], "median_ms": median * 1e3, "q20_ms": quantiles[0] * 1e3,
            "q80_ms": quantiles[3] * 1e3, "steps_per_s": 1 / median, "tokens_per_s": tokens / median,
            "peak_extra_mib": max(step["peak_extra_mib"] for step in timed), "mean_loss": statistics.mean(losses),
            "trl": trl.__version__, "transformers": transformers.__version__}


def main() -> None:
    args = parse_args()
    if args.child:
        result = run_provider(args)
        Path(args.child_result).write_text(json.dumps(result))
        return
    rows = []
    passthrough = [a for a in sys.argv[1:] if a != "--providers" and a not in PROVIDERS]
    for provider in args.providers:
        with tempfile.NamedTemporaryFile(suffix=".json") as result:
            command = [sys.executable, __file__, *passthrough, "--child", provider, "--child-result", result.name]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if done.returncode == 0:
                rows.append(json.loads(Path(result.name).read_text()))
            else:
                error = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
                rows.append({"provider": provider, "what": PROVIDERS[provider], "error": error[0]})
    base = next((row for row in rows if row["provider"] == "trl" and "error" not in row), None)
    for row in rows:
        if base and "error" not in row:
            row["tokens_per_s_vs_trl"] = row["tokens_per_s"] / base["tokens_per_s"]
            if base["peak_extra_mib"] > 0:
                row["memory_vs_trl"] = row["peak_extra_mib"] / base["peak_extra_mib"]
    payload = {key: getattr(args, key) for key in ("dtype", "hidden", "layers", "vocab", "batch", "prompt_len",
                                                   "answer_len", "warmup", "reps", "gradient_checkpointing")}
    versions = next(({"trl": r.pop("trl"), "transformers": r.pop("transformers")} for r in rows if "trl" in r), {})
    for row in rows:
        row.pop("trl", None), row.pop("transformers", None)
    payload.update(versions, loss_type="sigmoid", reference="model scored every step",
                   threads=args.threads or torch.get_num_threads())
    columns = ["provider", "median_ms", "steps_per_s", "tokens_per_s", "tokens_per_s_vs_trl", "peak_extra_mib",
               "memory_vs_trl", "mean_loss", "error"]
    finish("trl", args.device, rows, columns, payload, Path(args.out) if args.out else RESULTS_DIR)


if __name__ == "__main__":
    main()
