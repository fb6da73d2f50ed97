"""epa-train on real preference data: padded, length-grouped (--group-by-length) and padding-free
(--padding-free) batches side by side, with TRL 1.16's DPOTrainer on the same data and model as
the anchor.

    python bench/bench_real_data.py                  # ../shared/data/hh-rlhf-harmless-test.jsonl.gz, CPU,
                                                     # Llama hidden 256 and 512, vocab 32000, 8 pairs a step
    python bench/bench_real_data.py --mode rows      # padding-free with packed rows bounded at 1, 2, 4 x
                                                     # --max-length and unbounded (one row): --max-packed-length
    python bench/bench_real_data.py --mode prefix    # padded, padding-free and prefix-shared (--prefix-sharing
                                                     # on; several groups a row, and one), DPO and EPA K = 1
                                                     # with M = 4 and 8, and --prefix-sharing auto on short
                                                     # prompts with long answers (synthetic)

Every case is a real epa-train run set up in this process (epa_ext.train.trainer.set_up) on a
Llama-architecture model saved here (--layers layers, vocabulary --vocab, of which the BPE tokenizer
trained on the data uses what it learns), DPO with a reference model scored every step (TRL's
default), --max-length 512 / --max-prompt-length 256 (epa-train's defaults), fp32. The cases' optimizer
steps are timed in turns (bench/common.py's time_interleaved: a shared host's drift slows them
alike), each case drawing its own batches as its run would. TRL's DPOTrainer gets the very token ids
epa-train trains on (its own tokenization would make other sequences) and runs the same optimizer
steps through Trainer.training_step.

Reported per case: real tokens/s (the tokens of the batches without padding, summed over the timed
steps, over their summed time), the median step time, the padding share (of the positions the
decoder computes: padded rows, or packed rows and their free tails; over the first --share-batches
batches of the run's order), the peak memory of the tensors a step allocates (the profiler's memory
timeline, comparable within one process), and for padding-free the largest difference of its step
losses from the padded run's (the same batches). --mode prefix adds the decoder's tokens per step
(what it computes: padded rows, packed or shared rows with their free tails) and the loss (DPO, EPA
with M weak negatives) of each case.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import RESULTS_DIR, finish, peak_allocated_mib, time_interleaved

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-test.jsonl.gz"
BATCH_MODES = {
    "padded": [],
    "length-grouped": ["--group-by-length"],
    "padding-free": ["--padding-free"],
}
PREFIX_MODES = {
    "padded": [],
    "padding-free": ["--padding-free"],
    "prefix-shared": ["--prefix-sharing", "on"],
    "prefix-shared, a group a row": ["--prefix-sharing", "on", "--max-packed-length", "MAX_LENGTH"],
}
PREFIX_LOSSES = {"dpo": ["--loss", "dpo"], "epa K=1 M=4": ["--loss", "epa", "--num-strong", "1", "--num-weak", "4"],
                 "epa K=1 M=8": ["--loss", "epa", "--num-strong", "1", "--num-weak", "8"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="batches", choices=["batches", "rows", "prefix"],
                        help="batches: the three batch modes and TRL; rows: --max-packed-length bounds; prefix: "
                             "prefix-shared rows against padded and padding-free, DPO and EPA")
    parser.add_argument("--losses", nargs="+", default=list(PREFIX_LOSSES), choices=list(PREFIX_LOSSES),
                        help="--mode prefix: the losses")
    parser.add_argument("--dataset", default=str(DATA))
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=6, help="timed steps of each case")
    parser.add_argument("--share-batches", type=int, default=100, help="batches the padding share is measured on")
    parser.add_argument("--no-trl", action="store_true", help="leave out TRL's DPOTrainer")
    parser.add_argument("--out", default=None, help="directory for the JSON report (default bench/results)")
    return parser.parse_args(argv)


def save_model(args: argparse.Namespace, hidden: int, directory: Path) -> None:
    """A seeded Llama of this size (bench_train_step's and bench_trl's shape, vocabulary --vocab)
    and the BPE tokenizer epa-train's tiny model trains on the data (its ids fit the vocabulary),
    saved where --model loads them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from epa_ext.train.batching import render
    from epa_ext.train.data import load_rows, parse_rows
    from epa_ext.train.modeling import train_tiny_tokenizer

    examples, _ = parse_rows(load_rows(args.dataset), skip_bad_rows=True)
    texts = [render(part, None, is_prompt=i == 0) for example in examples
             for i, part in enumerate((example.prompt, example.chosen, *example.rejected))]
    tokenizer = train_tiny_tokenizer(texts, args.vocab)
    if len(tokenizer) > args.vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than --vocab {args.vocab}")
    heads = max(hidden // 64, 1)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=args.max_length, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def set_up_run(args: argparse.Namespace, model_dir: Path, out: Path, *flags: str):
    from epa_ext.train.config import parse_config
    from epa_ext.train.runtime import Runtime
    from epa_ext.train.trainer import set_up

    cfg = parse_config(["--dataset", args.dataset, "--model", str(model_dir), "--output-dir", str(out),
                        "--batch-size", str(args.batch), "--max-length", str(args.max_length), "--max-prompt-length",
                        str(args.max_prompt_length), "--eval-fraction", "0", "--skip-bad-rows", "--max-steps",
                        "100000", "--device", "cpu", "--lr", "1e-6", *flags])
    return set_up(cfg, Runtime(0, 1, torch.device("cpu")))


class EpaTrainCase:
    """One epa-train run; each call trains its next optimizer step."""

    def __init__(self, training):
        self.training, self.real_tokens, self.losses = training, [], []

    def __call__(self) -> None:
        before = self.training.position.num_tokens
        self.training.train_step()
        self.real_tokens.append(self.training.position.num_tokens - before)
        self.losses.append(self.training.log.records()[-1]["loss"])

    def padding_share(self, batches: int) -> float:
        """Share of the decoder's positions that are padding, over the run's first batches."""
        real, computed = self.token_counts(batches)
        return 1 - real / computed

    def token_counts(self, batches: int) -> tuple[int, int]:
        """(real tokens, positions the decoder computes) of the run's first batches: padded rows,
        or packed or prefix-shared rows with their free tails."""
        from epa_ext.preference.candidates import make_batch

        training, computed, real = self.training, 0, 0
        for micro_index in range(batches):
            batch = make_batch(training.data.train, training.order(micro_index), training.data.layout,
                               torch.device("cpu"))
            real += int(batch.attention_mask.sum())
            computed += batch.packed.num_tokens if batch.packed is not None else batch.input_ids.numel()
        return real, computed


class TrlCase:
    """TRL 1.16's DPOTrainer on the same model and token ids; each call trains one optimizer step
    (Trainer.training_step, then the optimizer and scheduler, gradients set to None)."""

    def __init__(self, args: argparse.Namespace, training, model_dir: Path, out: Path):
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer

        class PreTokenized(DPOTrainer):
            def _prepare_dataset(self, dataset, *_):
                return dataset

        rows = [{"prompt_ids": e.prompt_ids, "chosen_ids": e.answer_ids[0], "rejected_ids": e.answer_ids[1]}
                for e in training.data.train.examples]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = DPOConfig(output_dir=str(out), per_device_train_batch_size=args.batch, learning_rate=1e-6,
                           max_length=args.max_length, use_cpu=True, report_to="none", save_strategy="no",
                           disable_tqdm=True, seed=0, dataloader_num_workers=0, gradient_checkpointing=False,
                           bf16=False, logging_steps=1)
        self.trainer = PreTokenized(model=model, ref_model=copy.deepcopy(model), args=config,
                                    train_dataset=Dataset.from_list(rows), processing_class=training.data.tokenizer)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=100000)
        self.trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before its steps
        self.batches = iter(self.trainer.get_train_dataloader())
        self.real_tokens: list[int] = []

    def __call__(self) -> None:
        trainer = self.trainer
        inputs = next(self.batches)
        self.real_tokens.append(int(inputs["attention_mask"].sum()))
        trainer.training_step(trainer.model, inputs)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad(set_to_none=True)

    def padding_share(self, batches: int) -> float:
        loader, computed, real = iter(self.trainer.get_train_dataloader()), 0, 0
        for _ in range(batches):
            inputs = next(loader)
            real += int(inputs["attention_mask"].sum())
            computed += inputs["input_ids"].numel()
        return 1 - real / computed


def case_flags(args: argparse.Namespace, loss: str | None) -> dict[str, list[str]]:
    """The cases of one timed set: name -> epa-train flags."""
    if args.mode == "batches":
        return dict(BATCH_MODES)
    if args.mode == "rows":
        flags = {f"rows <= {n} x max-length": ["--padding-free", "--max-packed-length", str(n * args.max_length)]
                 for n in (1, 2, 4)}
        flags["one row"] = ["--padding-free", "--max-packed-length", str(10 ** 9)]
        return flags
    modes = PREFIX_MODES if loss != "short prompts" else {
        "padded": [], "prefix-shared": ["--prefix-sharing", "on"], "prefix-sharing auto": ["--prefix-sharing", "auto"]}
    loss_flags = PREFIX_LOSSES["epa K=1 M=4" if loss == "short prompts" else loss]
    return {name: [*loss_flags, *(str(args.max_length) if flag == "MAX_LENGTH" else flag for flag in flags)]
            for name, flags in modes.items()}


def short_prompt_data(scratch: Path, rows: int = 256) -> str:
    """A synthetic data file of short prompts (about 8 words) with long answers (about 150 words):
    where sharing the prompt saves little (UltraFeedback-like), to show what auto does there."""
    import json
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "light", "north", "green", "quiet", "swift"]
    path = scratch / "short_prompts.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            prompt = f"Question {i}: " + " ".join(rng.choices(words, k=8))
            answers = [" ".join(rng.choices(words, k=rng.randint(120, 180))) for _ in range(2)]
            f.write(json.dumps({"prompt": prompt, "chosen": answers[0], "rejected": answers[1]}) + "\n")
    return str(path)


def run_cases(args: argparse.Namespace, hidden: int, scratch: Path, loss: str | None = None) -> list[dict]:
    model_dir = scratch / f"model-{hidden}"
    if not model_dir.exists():
        save_model(args, hidden, model_dir)
    flags = case_flags(args, loss)
    if loss == "short prompts":
        args = argparse.Namespace(**{**vars(args), "dataset": short_prompt_data(scratch)})
    tag = "" if loss is None else "-" + "".join(c for c in loss if c.isalnum())
    with contextlib.ExitStack() as runs:
        cases = {name: EpaTrainCase(runs.enter_context(set_up_run(args, model_dir, scratch / f"{hidden}{tag}-{i}",
                                                                  *mode_flags)))
                 for i, (name, mode_flags) in enumerate(flags.items())}
        if args.mode == "batches" and not args.no_trl:
            cases["TRL DPOTrainer"] = TrlCase(args, cases["padded"].training, model_dir, scratch / f"{hidden}-trl")
        samples: dict[str, list[float]] = {}
        timings = time_interleaved(cases, "cpu", reps=args.reps, warmup=args.warmup, samples=samples)
        rows = []
        for name, case in cases.items():
            timed_tokens = case.real_tokens[args.warmup:]
            extra = {}
            if args.mode == "prefix":
                real, computed = case.token_counts(args.share_batches)
                extra = {"loss": loss, "decoder_tokens_per_step": computed / args.share_batches,
                         "real_tokens_per_step": real / args.share_batches}
            rows.append({"hidden": hidden, "provider": name, **extra, **timings[name],
                         "real_tokens_per_s": sum(timed_tokens) / sum(samples[name]) * 1e3,
                         "mean_real_tokens_per_step": statistics.mean(timed_tokens),
                         "padding_share": case.padding_share(args.share_batches),
                         "peak_allocated_mib": peak_allocated_mib(case, "cpu")})  # one more step, profiled
    base = rows[0]  # padded; rows mode: rows <= 1 x max-length
    for row in rows:
        row["tokens_per_s_vs_first"] = row["real_tokens_per_s"] / base["real_tokens_per_s"]
        case = cases[row["provider"]]
        if row is not base and isinstance(case, EpaTrainCase) and "--group-by-length" not in flags[row["provider"]]:
            # the same batches as the first case: the same losses, to rounding
            row["max_loss_difference"] = max(abs(a - b) for a, b in zip(case.losses, cases[base["provider"]].losses))
    trl = next((row for row in rows if row["provider"] == "TRL DPOTrainer"), None)
    for row in rows:
        if trl is not None:
            row["tokens_per_s_vs_trl"] = row["real_tokens_per_s"] / trl["real_tokens_per_s"]
    return rows


def main() -> None:
    args = parse_args()
    if not Path(args.dataset).exists():
        sys.exit(f"{args.dataset} does not exist (the shared HH-RLHF file; --dataset gives another)")
    with gzip.open(args.dataset, "rt") if args.dataset.endswith(".gz") else open(args.dataset) as f:
        num_rows = sum(1 for line in f if line.strip())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_real_data_") as scratch:
        for hidden in args.hidden:
            if args.mode == "prefix":
                for loss in [*args.losses, "short prompts"]:
                    rows += run_cases(args, hidden, Path(scratch), loss)
            else:
                rows += run_cases(args, hidden, Path(scratch))
    columns = ["hidden", "provider", "median_ms", "real_tokens_per_s", "tokens_per_s_vs_first", "tokens_per_s_vs_trl",
               "padding_share", "peak_allocated_mib", "max_loss_difference"]
    loss = "dpo (sigmoid), reference model every step"
    if args.mode == "prefix":
        columns = ["hidden", "loss", "provider", "median_ms", "real_tokens_per_s", "tokens_per_s_vs_first",
                   "decoder_tokens_per_step", "peak_allocated_mib", "max_loss_difference"]
        loss = ("per row's loss: DPO, or EPA K = 1 with M weak negatives (epa K=1 M=4 on the synthetic short-prompt "
                "data), reference model every step")
    payload = {"args": vars(args), "dataset_rows": num_rows, "loss": loss, "threads": torch.get_num_threads()}
    name = {"batches": "real_data", "rows": "real_data_rows", "prefix": "real_data_prefix"}[args.mode]
    finish(name, "cpu", rows, columns, payload, Path(args.out) if args.out else RESULTS_DIR)


if __name__ == "__main__":
    main()
