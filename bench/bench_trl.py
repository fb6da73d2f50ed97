"""DPO training through TRL, side by side: TRL 1.16's DPOTrainer (its default path, and with
use_liger_kernel=True) against epa_ext's EPATrainer (epa_ext.integrations.trl), same
Llama-architecture model, data, batches, reference model and optimizer.

    python bench/bench_trl.py          # CPU: hidden 256, 4 layers, vocab 32000, fp32, 4 pairs x 256 tokens
    python bench/bench_trl.py --device cuda --dtype bf16 --hidden 2048 --layers 8 --vocab 128256 \\
        --prompt-len 512 --answer-len 512 --batch 4 --providers trl epa_ext    # bench_train_step's GPU model

Each provider trains its own copy of one seeded model for --warmup + --reps optimizer steps of
loss_type="sigmoid" with a reference model scored every step (TRL's default), logging every step.
The providers train in one process, in turns: each runs one optimizer step, then hands over to the
next (a thread per trainer, only one running at a time), so that a drift in the machine's speed
slows them alike; except use_liger_kernel=True, which trains alone in a process of its own, as
Liger patches transformers' Llama module for the whole process. Reported per provider: median
step time (20/80 % quantiles), steps/s, tokens/s (every token of the batch: prompt and answer of
the chosen and rejected rows, as TRL's num_tokens counts them), the peak memory of a step above
what exists when it starts, the mean loss of the timed steps, and the largest difference of its
per-step loss and mean chosen log-prob from TRL's (both train the same batches in the same order
from the same weights: fp32 agrees to rounding, bf16 to bf16's; the log-prob, unlike the loss,
which starts at log 2 whatever the batch, shows that the batches are the same).
Memory (MEMORY_DEFINITION): on CUDA, the caching allocator's peak during the step, in the turns
process (one step runs at a time, so the others' memory is part of what exists when it starts); on
the CPU, the rise of the peak resident set during a step, in a process of the provider's own (in a
shared process one trainer's step reuses pages another's left). A provider that cannot run here is
reported with its error instead of numbers.

On the CPU, TRL's fused lm_head scores every position of the batch (prompt and padding too); on a
GPU with Triton it scores only the answer tokens (trl/kernels/chunked_logprob.py): a CPU ratio is
not a GPU ratio, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, finish, memory_mark, peak_since_mib

PROVIDERS = {
    "trl": "TRL DPOTrainer (default: its chunked fused lm_head)",
    "trl_liger": "TRL DPOTrainer, use_liger_kernel=True",
    "epa_ext": "EPATrainer (epa_ext fused-linear loss)",
}
MEMORY_DEFINITION = {
    "cuda": "peak of the caching allocator during a timed step above what was allocated when it began, all "
            "providers in one process taking turns",
    "cpu": "rise of the peak resident set during a timed step, each provider alone in a fresh process",
}
# Liger replaces functions of transformers' Llama module, for every model of the process.
ALONE = {"trl_liger"}
CPU_NOTE = ("CPU run: TRL 1.16's fused lm_head scores every position here (prompt and padding too) and only the "
            "answer tokens on a GPU with Triton, so these ratios are not GPU ratios")


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
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one provider alone
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


class Turns:
    """Runs threads one at a time, in the order they joined: a thread holds the turn from its start
    until it hands over (before each optimizer step, and when it ends), then waits for the turn to
    come back."""

    def __init__(self):
        self.order: list[str] = []
        self.active: set[str] = set()
        self.current: str | None = None
        self.changed = threading.Condition()

    def join(self, name: str) -> None:
        with self.changed:
            self.order.append(name)
            self.active.add(name)
            self.current = self.current or name

    def wait(self, name: str) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.current == name)

    def hand_over(self, name: str, leaving: bool = False) -> None:
        with self.changed:
            if leaving:
                self.active.discard(name)
            start = self.order.index(name) + 1
            cycle = self.order[start:] + self.order[:start]
            self.current = next((other for other in cycle if other in self.active), None)
            self.changed.notify_all()


def step_meter(device: str, steps: list[dict], turns: Turns | None = None, name: str = ""):
    """A TrainerCallback recording each optimizer step's time and peak memory (from before its first
    forward to after the optimizer's update); with turns, it hands over before each step."""
    from transformers import TrainerCallback

    class StepMeter(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if turns is not None:
                turns.hand_over(name)
                turns.wait(name)
            self.mark = memory_mark(device)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - self.start
            steps.append({"seconds": seconds, "peak_extra_mib": peak_since_mib(device, self.mark)})

    return StepMeter()


def build_trainer(args: argparse.Namespace, provider: str, callback):
    """provider's trainer of a freshly seeded model and its reference, on args.device."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=max(args.hidden // 64, 1),
                         max_position_embeddings=args.prompt_len + args.answer_len, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    with torch.device(args.device):  # a GPU-sized model initializes on the GPU, not on the host
        model = LlamaForCausalLM(config)
        ref_model = LlamaForCausalLM(config)
    ref_model.load_state_dict(model.state_dict())
    if provider == "epa_ext":
        from epa_ext.integrations.trl import EPAConfig as Config
        from epa_ext.integrations.trl import EPATrainer as Trainer
    else:
        Config, Trainer = DPOConfig, DPOTrainer
    train_args = Config(
        output_dir=tempfile.mkdtemp(prefix=f"bench_trl_{provider}_"), per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.reps, logging_steps=1, learning_rate=1e-6, bf16=args.dtype == "bf16",
        use_cpu=args.device == "cpu", gradient_checkpointing=args.gradient_checkpointing,
        max_length=args.prompt_len + args.answer_len, report_to="none", save_strategy="no", disable_tqdm=True,
        seed=0, dataloader_num_workers=0, use_liger_kernel=provider == "trl_liger")
    return Trainer(model=model, ref_model=ref_model, args=train_args, train_dataset=Dataset.from_list(
        preference_rows(args)), processing_class=word_tokenizer(args.vocab), callbacks=[callback])


def error_line(error: BaseException) -> str:
    return (f"{type(error).__name__}: {error}".splitlines() or ["(no message)"])[0]


def largest_peak(steps: list[dict]) -> float | None:
    peaks = [step["peak_extra_mib"] for step in steps]
    return None if None in peaks else max(peaks)


def summary(args: argparse.Namespace, provider: str, steps: list[dict], log_history: list[dict]) -> dict:
    """provider's row from its steps' times and peaks and its trainer's per-step losses."""
    timed = steps[args.warmup:]
    losses = {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}
    chosen_logps = {entry["step"]: entry["logps/chosen"] for entry in log_history if "logps/chosen" in entry}
    seconds = sorted(step["seconds"] for step in timed)
    quantiles = statistics.quantiles(seconds, n=5, method="inclusive") if len(seconds) > 1 else seconds * 4
    median = statistics.median(seconds)
    tokens = 2 * args.batch * (args.prompt_len + args.answer_len)
    return {"provider": provider, "what": PROVIDERS[provider], "median_ms": median * 1e3,
            "q20_ms": quantiles[0] * 1e3, "q80_ms": quantiles[3] * 1e3, "steps_per_s": 1 / median,
            "tokens_per_s": tokens / median, "peak_extra_mib": largest_peak(timed),
            "mean_loss": statistics.mean(loss for step, loss in losses.items() if step > args.warmup),
            "losses": [losses[step] for step in sorted(losses)],
            "chosen_logps": [chosen_logps[step] for step in sorted(chosen_logps)]}


def train_in_turns(args: argparse.Namespace, providers: list[str]) -> dict[str, dict]:
    """Each provider's row, trained in turns in this process."""
    steps: dict[str, list[dict]] = {provider: [] for provider in providers}
    trainers, errors = {}, {}
    turns = Turns()
    for provider in providers:  # built one after another, before any trains
        try:
            trainers[provider] = build_trainer(args, provider, step_meter(args.device, steps[provider], turns,
                                                                          provider))
            turns.join(provider)
        except Exception as error:  # reported as the provider's row
            errors[provider] = error_line(error)

    def train(provider: str) -> None:
        turns.wait(provider)
        try:
            trainers[provider].train()
        except Exception as error:  # reported as the provider's row; the others go on
            errors[provider] = error_line(error)
        finally:
            turns.hand_over(provider, leaving=True)

    threads = [threading.Thread(target=train, args=(provider,), name=provider) for provider in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {provider: {"provider": provider, "what": PROVIDERS[provider], "error": errors[provider]}
            if provider in errors else summary(args, provider, steps[provider], trainers[provider].state.log_history)
            for provider in providers}


def train_alone(args: argparse.Namespace, provider: str) -> dict:
    """provider's row, trained alone in a fresh process of its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        passthrough = [a for a in sys.argv[1:] if a != "--providers" and a not in PROVIDERS]
        command = [sys.executable, __file__, *passthrough, "--child", provider, "--child-result", result.name]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode == 0:
            return json.loads(Path(result.name).read_text())
    error = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    return {"provider": provider, "what": PROVIDERS[provider], "error": error[0]}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        steps: list[dict] = []
        trainer = build_trainer(args, args.child, step_meter(args.device, steps))
        trainer.train()
        Path(args.child_result).write_text(json.dumps(summary(args, args.child, steps, trainer.state.log_history)))
        return
    import transformers
    import trl

    by_provider = train_in_turns(args, [provider for provider in args.providers if provider not in ALONE])
    for provider in args.providers:
        if provider in ALONE:
            by_provider[provider] = {**train_alone(args, provider), "timing": "alone, in its own process"}
        elif args.device == "cpu" and "error" not in by_provider[provider]:
            by_provider[provider]["peak_extra_mib"] = train_alone(args, provider).get("peak_extra_mib")
    rows = [by_provider[provider] for provider in args.providers]
    base = next((row for row in rows if row["provider"] == "trl" and "error" not in row), None)
    for row in rows:
        if base and "error" not in row:
            row["tokens_per_s_vs_trl"] = row["tokens_per_s"] / base["tokens_per_s"]
            if base["peak_extra_mib"] and row["peak_extra_mib"] is not None:
                row["memory_vs_trl"] = row["peak_extra_mib"] / base["peak_extra_mib"]
            for key, series in (("loss", "losses"), ("chosen_logps", "chosen_logps")):
                row[f"max_{key}_difference_vs_trl"] = max(abs(a - b) for a, b in zip(row[series], base[series]))
    for row in rows:  # the per-step series: in the report only through the differences above
        row.pop("losses", None), row.pop("chosen_logps", None)
    payload = {key: getattr(args, key) for key in ("dtype", "hidden", "layers", "vocab", "batch", "prompt_len",
                                                   "answer_len", "warmup", "reps", "gradient_checkpointing")}
    payload.update(trl=trl.__version__, transformers=transformers.__version__, loss_type="sigmoid",
                   reference="model scored every step", timing="in turns, one process (except where a row says)",
                   memory_definition=MEMORY_DEFINITION[args.device], threads=torch.get_num_threads())
    if args.device == "cpu":
        payload["note"] = CPU_NOTE
        print(CPU_NOTE)
    columns = ["provider", "median_ms", "steps_per_s", "tokens_per_s", "tokens_per_s_vs_trl", "peak_extra_mib",
               "memory_vs_trl", "mean_loss", "max_loss_difference_vs_trl", "max_chosen_logps_difference_vs_trl",
               "error"]
    finish("trl", args.device, rows, columns, payload, Path(args.out) if args.out else RESULTS_DIR)


if __name__ == "__main__":
    main()
