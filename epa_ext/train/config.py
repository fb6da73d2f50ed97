"""TrainConfig: the single source of truth for epa-train's command-line flags, YAML keys and
defaults. Each field's help text is its flag's help; a YAML file given with --config sets the
same keys (flag names with dashes or underscores), and flags given on the command line win."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints


def _opt(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train on
    model: str = _opt("tiny", "local path or hub id of a causal LM (transformers), or 'tiny': a small random "
                              "Llama-architecture model with a byte-level BPE tokenizer trained on the data")
    dataset: str = _opt("", "local .jsonl/.jsonl.gz/.json/.parquet file or hub dataset id", required=True)
    output_dir: str = _opt("", "directory for checkpoints, metrics.jsonl, training_curves.png, final/",
                           required=True)
    config: str | None = _opt(None, "YAML file whose keys mirror these flags")
    # --- the objective
    loss: Literal["epa", "dpo"] = _opt("epa", "epa: chosen against strong and weak negatives; dpo: against one "
                                              "rejected answer")
    beta: float = _opt(0.1, "KL strength: rewards are beta * log(pi / pi_ref)")
    dpo_loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = _opt("sigmoid", "DPO variant (--loss dpo)")
    label_smoothing: float = _opt(0.0, "cDPO / robust DPO label smoothing in [0, 0.5)")
    num_strong: int | None = _opt(None, "EPA strong negatives per prompt (rejected answers; default: the most any "
                                        "example has, fewer are masked)")
    num_weak: int = _opt(0, "EPA weak negatives per prompt: answers of other examples scored under this prompt")
    weak_weight: float = _opt(1.0, "weight of each weak negative in EPA's partition sum")
    # --- optimization
    max_steps: int | None = _opt(None, "optimizer steps (overrides --epochs)")
    epochs: float = _opt(1.0, "passes over the training split when --max-steps is not given")
    batch_size: int = _opt(4, "prompts per device per micro-step")
    grad_accum: int = _opt(1, "micro-steps per optimizer step")
    lr: float = _opt(5e-6, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_ratio: float = _opt(0.1, "share of the steps spent warming the learning rate up linearly")
    scheduler: Literal["cosine", "linear", "constant"] = _opt("cosine", "learning-rate decay after warm-up")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    precision: Literal["fp32", "bf16", "fp16"] = _opt("fp32", "autocast dtype of forward passes")
    # --- data
    max_length: int = _opt(512, "longest prompt + answer in tokens; answers are cut from the right")
    max_prompt_length: int = _opt(256, "longest prompt in tokens; prompts keep their last tokens")
    eval_fraction: float = _opt(0.05, "share of examples held out for evaluation")
    skip_bad_rows: bool = _opt(False, "warn about and count malformed rows instead of stopping")
    skip_nonfinite_steps: bool = _opt(False, "skip (and count) optimizer steps whose loss is NaN or inf instead of "
                                             "stopping the run")
    # --- reference model and adapters
    ref: Literal["model", "precompute"] = _opt("model", "model: a frozen copy of the initial policy scores every "
                                                        "batch; precompute: one pass before training, cached in "
                                                        "output_dir, then no reference model in memory")
    lora_r: int = _opt(0, "LoRA rank (PEFT) for every linear layer; 0 trains all weights. The reference is then "
                          "the base model with adapters disabled")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default 2 * lora_r)")
    fsdp: bool = _opt(False, "shard the model with FSDP2 (fully_shard) under torchrun")
    # --- bookkeeping
    logging_steps: int = _opt(1, "optimizer steps between metrics.jsonl lines")
    eval_steps: int = _opt(0, "optimizer steps between evaluations (0: only at the end)")
    save_steps: int = _opt(0, "optimizer steps between checkpoints (0: only final/)")
    save_total_limit: int | None = _opt(None, "keep at most this many checkpoints (oldest deleted)")
    resume: bool = _opt(False, "continue from the newest complete checkpoint in output_dir")
    seed: int = _opt(0, "seed of model init (tiny), data order, weak-negative pairing and dropout")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto: cuda when available")
    # --- the tiny model
    tiny_hidden_size: int = _opt(64, "hidden size of --model tiny")
    tiny_layers: int = _opt(2, "layers of --model tiny")
    tiny_vocab_size: int = _opt(512, "BPE vocabulary of --model tiny's tokenizer")

    def validate(self) -> None:
        """Raises ValueError naming the first bad option."""
        for name in ("dataset", "output_dir"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')} is required")
        positive = ("batch_size", "grad_accum", "max_length", "max_prompt_length", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError("--max-prompt-length must be smaller than --max-length")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"--eval-fraction must lie in [0, 1); got {self.eval_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1; got {self.max_steps}")
        if self.num_weak < 0 or (self.num_strong is not None and self.num_strong < 1):
            raise ValueError("--num-strong must be >= 1 and --num-weak >= 0")
        if self.beta <= 0:
            raise ValueError(f"--beta must be > 0; got {self.beta}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _flag_type(hint: Any):
    """argparse type and choices of a field's annotation."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is Literal:
        return str, list(get_args(hint))
    if args and get_origin(args[0]) is Literal:
        return str, list(get_args(args[0]))
    base = args[0] if args else hint
    return base, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epa-train", description="Align a causal LM with EPA or DPO on epa_ext's fused kernels.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind, choices = _flag_type(hints[f.name])
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS,
                                help=f"{f.metadata['help']} (default: {f.default})")
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file of --config, then the flags given on the command line."""
    given = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if given.get("config"):
        values.update(load_yaml(given["config"]))
    values.update(given)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"{path}: unknown option {key!r}")
        values[name] = value
    return values
