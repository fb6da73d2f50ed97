"""TrainConfig: the single source of truth for epa-train's command-line flags, YAML keys and
defaults. Each field's help text is its flag's help; a YAML file given with --config sets the
same keys (flag names with dashes or underscores), and flags given on the command line win.

Flags and YAML values go through one conversion (``convert``: numbers in scientific notation,
integers written as such, choices checked) and one validation (``TrainConfig.validate``), so a
YAML file is held to exactly what the command line is, and every bad option is a ConfigError of
one line naming the flag or key and what is allowed, raised before anything is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..preference.options import EPA_OPTIONS, FLAGS, PACKED_ROW_LENGTHS, check_epa_options
from . import hub


# Training options whose default other options set (TrainConfig.training_options resolves them),
# with the rule a message about a change of their value states.
DERIVED_DEFAULTS = {"eval_fraction": "its default is 0.05, or 0 with --eval-dataset",
                    "lora_alpha": "its default is 2 x --lora-r"}


class ConfigError(ValueError):
    """A bad option or combination of options; the message names the flag (or YAML key) and what
    is allowed instead."""


def _opt(default: Any, help: str, *, required: bool = False, bookkeeping: bool = False) -> Any:
    """A TrainConfig field. bookkeeping: the option does not change what a step computes (logging,
    saving, where the run lives, how it is computed, how many steps are trained), so --resume
    accepts a change of it."""
    return field(default=default, metadata={"help": help, "required": required, "bookkeeping": bookkeeping})


@dataclass
class TrainConfig:
    # --- what to train on
    model: str = _opt("tiny", "local directory or hub id of a causal LM (transformers), or 'tiny': a small random "
                              "Llama-architecture model with a byte-level BPE tokenizer trained on the data")
    dataset: str = _opt("", "local .jsonl/.jsonl.gz/.json/.parquet file, a directory of them, or a hub dataset id",
                        required=True)
    eval_dataset: str | None = _opt(None, "evaluate on this data (any format --dataset accepts) instead of holding "
                                          "out --eval-fraction of --dataset", bookkeeping=True)
    output_dir: str = _opt("", "directory for checkpoints, metrics.jsonl, training_curves.png, final/",
                           required=True, bookkeeping=True)
    overwrite_output_dir: bool = _opt(False, "start over in an output_dir that holds another run: its checkpoints, "
                                             "metrics and final/ are deleted first", bookkeeping=True)
    config: str | None = _opt(None, "YAML file whose keys mirror these flags", bookkeeping=True)
    # --- the objective
    loss: Literal["epa", "dpo"] = _opt("epa", "epa: chosen against strong and weak negatives; dpo: against one "
                                              "rejected answer")
    beta: float = _opt(0.1, "KL strength: rewards are beta * log(pi / pi_ref)")
    dpo_loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = _opt("sigmoid", "DPO variant (--loss dpo)")
    label_smoothing: float = _opt(0.0, "eps in [0, 0.5) for --loss dpo with --dpo-loss-type sigmoid (cDPO: "
                                       "-(1-eps) log s(beta d) - eps log s(-beta d)) or robust. Unlike TRL 1.16, "
                                       "which ignores it for sigmoid, epa-train applies it there")
    num_strong: int | None = _opt(EPA_OPTIONS["num_strong"].default, EPA_OPTIONS["num_strong"].help)
    num_weak: int = _opt(EPA_OPTIONS["num_weak"].default, EPA_OPTIONS["num_weak"].help)
    weak_weight: float = _opt(EPA_OPTIONS["weak_weight"].default, EPA_OPTIONS["weak_weight"].help)
    weak_correction: Literal["none", "importance"] = _opt(
        EPA_OPTIONS["weak_correction"].default, EPA_OPTIONS["weak_correction"].help + "; scored once before training "
                                                                                     "and cached in output_dir")
    weak_correction_prompts: int = _opt(EPA_OPTIONS["weak_correction_prompts"].default,
                                        EPA_OPTIONS["weak_correction_prompts"].help)
    weak_source: Literal["any", "rejected"] = _opt(EPA_OPTIONS["weak_source"].default,
                                                   EPA_OPTIONS["weak_source"].help)
    sft_weight: float = _opt(0.0, "lambda >= 0: adds lambda * the chosen answers' negative log-likelihood, averaged "
                                  "over all their completion tokens in the batch, to the loss (DPO + SFT = RPO; "
                                  "TRL's rpo_alpha)")
    # --- optimization
    max_steps: int | None = _opt(None, "optimizer steps (default: as many as --epochs takes); may be raised on "
                                       "--resume to train a finished run further", bookkeeping=True)
    epochs: float = _opt(1.0, "passes over the training split when --max-steps is not given; may be raised on "
                              "--resume", bookkeeping=True)
    batch_size: int = _opt(4, "prompts per device per micro-step")
    grad_accum: int = _opt(1, "micro-steps per optimizer step")
    lr: float = _opt(5e-6, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_ratio: float = _opt(0.1, "share of the steps, in [0, 1], spent warming the learning rate up linearly")
    scheduler: Literal["cosine", "linear", "constant"] = _opt("cosine", "learning-rate decay after warm-up")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0: off)")
    precision: Literal["fp32", "bf16", "fp16"] = _opt("fp32", "autocast dtype of forward passes")
    gradient_checkpointing: bool = _opt(False, "recompute the decoder's activations in backward instead of keeping "
                                               "them (less memory, one more forward; the same losses and weights)",
                                        bookkeeping=True)
    # --- data
    max_length: int = _opt(512, "longest prompt + answer in tokens. Truncation: a prompt keeps its last "
                                "--max-prompt-length tokens (its BOS stays in front), then each answer is cut from "
                                "the right to fit (losing its EOS); an example left with an empty answer is dropped "
                                "and reported by row")
    max_prompt_length: int = _opt(256, "longest prompt in tokens; prompts keep their last tokens")
    group_by_length: bool = _opt(False, "batches of examples of similar length: each epoch's shuffled examples are "
                                        "sorted by length within mega-batches of 50 global batches, whose batches "
                                        "are then shuffled (the longest first); less padding, other batches than "
                                        "without it")
    padding_free: bool = _opt(False, "pack each batch's sequences into rows without padding, position ids restarting "
                                     "at every sequence (attention sdpa, eager, flex or flash); the same log-probs "
                                     "and losses as padded batches, to rounding", bookkeeping=True)
    prefix_sharing: Literal["auto", "on", "off"] = _opt(EPA_OPTIONS["prefix_sharing"].default,
                                                        EPA_OPTIONS["prefix_sharing"].help)
    max_packed_length: int | None = _opt(EPA_OPTIONS["max_packed_length"].default,
                                         EPA_OPTIONS["max_packed_length"].help, bookkeeping=True)
    eval_fraction: float | None = _opt(None, "share of --dataset held out for evaluation, in [0, 1) (default: 0.05, "
                                             "or 0 with --eval-dataset)")
    skip_bad_rows: bool = _opt(False, "warn about and count malformed rows instead of stopping", bookkeeping=True)
    skip_nonfinite_steps: bool = _opt(False, "skip (and count) optimizer steps whose loss is NaN or inf instead of "
                                             "stopping the run", bookkeeping=True)
    # --- reference model and adapters
    ref: Literal["model", "precompute"] = _opt("model", "model: a frozen copy of the initial policy scores every "
                                                        "batch; precompute: one pass before training, cached in "
                                                        "output_dir, then no reference model in memory",
                                               bookkeeping=True)
    lora_r: int = _opt(0, "LoRA rank (PEFT) for every linear layer; 0 trains all weights. The reference is then "
                          "the base model with adapters disabled")
    lora_alpha: float | None = _opt(None, "LoRA alpha (default: 2 * lora_r)")
    fsdp: bool = _opt(False, "shard the model with FSDP2 (fully_shard); needs torchrun", bookkeeping=True)
    # --- bookkeeping
    logging_steps: int = _opt(1, "optimizer steps between metrics.jsonl lines", bookkeeping=True)
    report_to: Literal["none", "tensorboard"] = _opt("none", "also write the metrics as TensorBoard events into "
                                                             "output_dir/runs (tags train/... and eval/..., as "
                                                             "transformers' Trainer writes them)", bookkeeping=True)
    eval_steps: int = _opt(0, "optimizer steps between evaluations (0: only at the end)", bookkeeping=True)
    save_steps: int = _opt(0, "optimizer steps between checkpoints (0: none during the run). The last step's "
                              "checkpoint is always written (after final/), and one when the run is interrupted",
                           bookkeeping=True)
    save_total_limit: int | None = _opt(None, "keep at most this many checkpoints of this run, >= 1, oldest deleted "
                                              "(default: keep all)", bookkeeping=True)
    resume: bool = _opt(False, "continue from the newest complete checkpoint in output_dir (a finished run keeps "
                               "one of its last step: raise --max-steps or --epochs to train it further); refused "
                               "when that checkpoint was trained with options that change what a step computes",
                        bookkeeping=True)
    seed: int = _opt(0, "seed of model init (tiny), data order, weak-negative pairing and dropout")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto: cuda when available", bookkeeping=True)
    # --- the tiny model
    tiny_hidden_size: int = _opt(64, "hidden size of --model tiny (a multiple of 16)")
    tiny_layers: int = _opt(2, "layers of --model tiny")
    tiny_vocab_size: int = _opt(512, "BPE vocabulary of --model tiny's tokenizer")

    @property
    def held_out_fraction(self) -> float:
        """The share of --dataset held out for evaluation."""
        if self.eval_fraction is not None:
            return self.eval_fraction
        return 0.0 if self.eval_dataset else 0.05

    @property
    def packed_row_tokens(self) -> int:
        """Most tokens in a packed or prefix-shared row (--padding-free, --prefix-sharing):
        --max-packed-length, or its default."""
        return self.max_packed_length or PACKED_ROW_LENGTHS * self.max_length

    @property
    def adapter_alpha(self) -> float | None:
        """LoRA's alpha: --lora-alpha, or its default 2 x --lora-r (None without LoRA)."""
        return (self.lora_alpha or 2.0 * self.lora_r) if self.lora_r else None

    def training_options(self) -> dict[str, Any]:
        """The options that change what is trained (all but the bookkeeping ones) as training
        reads them: a default derived from other options resolved (DERIVED_DEFAULTS: a bookkeeping
        option such as --eval-dataset may move it) and local paths made absolute. Two runs with
        equal training_options train the same thing, however their options were written."""
        resolved = {"eval_fraction": self.held_out_fraction, "lora_alpha": self.adapter_alpha}
        options = {}
        for f in dataclasses.fields(self):
            if not f.metadata["bookkeeping"]:
                value = resolved[f.name] if f.name in resolved else getattr(self, f.name)
                if f.name in ("model", "dataset") and Path(value).expanduser().exists():
                    value = str(Path(value).expanduser().resolve())
                options[f.name] = value
        return options

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def validate(self) -> None:
        """Every check that needs no model or data: values, combinations that cannot be meant,
        devices, torchrun, local paths. Values are first converted to their fields' types (as
        flags are: "5e-6" becomes 5e-06). Raises ConfigError naming the first bad option."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, convert(f.name, getattr(self, f.name), _flag(f.name)))
        self._check_values()
        self._check_combinations()
        self._check_environment()

    def _check_values(self) -> None:
        for f in dataclasses.fields(self):
            if f.metadata["required"] and not getattr(self, f.name):
                raise ConfigError(f"{_flag(f.name)} is required (on the command line or in the --config file)")
        for name in ("batch_size", "grad_accum", "max_length", "max_prompt_length", "logging_steps",
                     "tiny_hidden_size", "tiny_layers", "tiny_vocab_size"):
            _check(self, name, getattr(self, name) >= 1, ">= 1")
        for name in ("lora_r", "eval_steps", "save_steps"):
            _check(self, name, getattr(self, name) >= 0, ">= 0")
        for name in ("max_steps", "save_total_limit"):
            _check(self, name, getattr(self, name) is None or getattr(self, name) >= 1, ">= 1",
                   "leave it out to keep every checkpoint" if name == "save_total_limit" else "")
        for name in ("beta", "lr", "epochs"):
            _check(self, name, math.isfinite(getattr(self, name)) and getattr(self, name) > 0, "a finite number > 0")
        for name in ("sft_weight", "weight_decay", "max_grad_norm"):
            _check(self, name, math.isfinite(getattr(self, name)) and getattr(self, name) >= 0,
                   "a finite number >= 0")
        _check(self, "lora_alpha", self.lora_alpha is None or (math.isfinite(self.lora_alpha) and self.lora_alpha > 0),
               "a finite number > 0")
        _check(self, "warmup_ratio", 0 <= self.warmup_ratio <= 1, "in [0, 1] (a share of the steps)")
        _check(self, "label_smoothing", 0 <= self.label_smoothing < 0.5, "in [0, 0.5)")
        _check(self, "eval_fraction", self.eval_fraction is None or 0 <= self.eval_fraction < 1, "in [0, 1)")
        check_epa_options({name: getattr(self, name) for name in EPA_OPTIONS}, epa=self.loss == "epa",
                          padding_free=self.padding_free, max_length=self.max_length, spelling=FLAGS,
                          error=ConfigError)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be smaller than --max-length "
                              f"({self.max_length}): the answers need room")
        if self.model == "tiny" and not _tiny_heads_fit(self.tiny_hidden_size):
            raise ConfigError(f"--tiny-hidden-size must be a multiple of 16 whose attention heads (hidden / 16) "
                              f"split into key-value groups; got {self.tiny_hidden_size} (try 32, 64, 128)")

    def _check_combinations(self) -> None:
        """Options that have no effect in the run asked for are refused, not ignored."""
        defaults = TrainConfig.__dataclass_fields__
        if self.loss == "epa":
            for name in ("label_smoothing", "dpo_loss_type"):
                if getattr(self, name) != defaults[name].default:
                    raise ConfigError(f"{_flag(name)} applies to --loss dpo only; EPA has no such option")
        elif self.label_smoothing and self.dpo_loss_type not in ("sigmoid", "robust"):
            raise ConfigError(f"--label-smoothing applies to --dpo-loss-type sigmoid or robust only; got "
                              f"{self.dpo_loss_type}")
        if self.model != "tiny":
            for name in ("tiny_hidden_size", "tiny_layers", "tiny_vocab_size"):
                if getattr(self, name) != defaults[name].default:
                    raise ConfigError(f"{_flag(name)} applies to --model tiny only")
        if self.lora_alpha is not None and not self.lora_r:
            raise ConfigError("--lora-alpha needs --lora-r (the LoRA rank)")
        if self.fsdp and self.lora_r:
            raise ConfigError("--fsdp with --lora-r is not supported: LoRA adapters are small enough for plain data "
                              "parallel (torchrun without --fsdp)")
        if self.eval_dataset and self.eval_fraction:
            raise ConfigError("--eval-fraction holds out part of --dataset for evaluation and --eval-dataset gives the "
                              "evaluation data: give one of them")
        if self.eval_steps and not (self.eval_dataset or self.held_out_fraction):
            raise ConfigError("--eval-steps needs evaluation data: --eval-fraction > 0 or --eval-dataset")
        if self.resume and self.overwrite_output_dir:
            raise ConfigError("--resume continues the run in --output-dir and --overwrite-output-dir deletes it: "
                              "give one of them")

    def _check_environment(self) -> None:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda, but no CUDA device is available here (torch.cuda.is_available() is "
                              "False); use --device cpu, or auto")
        if self.fsdp and "WORLD_SIZE" not in os.environ:
            raise ConfigError("--fsdp needs torchrun: torchrun --nproc-per-node N -m epa_ext.train ... --fsdp")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
        from .data import check_source

        check_model_source(self.model)
        check_source(self.dataset, "--dataset")
        if self.eval_dataset:
            check_source(self.eval_dataset, "--eval-dataset")
        if self.config and not Path(self.config).is_file():
            raise ConfigError(f"--config {self.config}: no such file")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check(cfg: TrainConfig, name: str, ok: bool, allowed: str, hint: str = "") -> None:
    if not ok:
        raise ConfigError(f"{_flag(name)} must be {allowed}; got {getattr(cfg, name)}" + (f" ({hint})" if hint else ""))


def tiny_attention_heads(hidden_size: int) -> tuple[int, int]:
    """(attention heads, key-value heads) of the tiny model of this hidden size."""
    return max(hidden_size // 16, 1), max(hidden_size // 32, 1)


def check_model_source(model: str) -> None:
    """--model without loading it: 'tiny', a model directory, or a hub id that can be had.
    Raises ConfigError saying what to do instead."""
    if model == "tiny":
        return
    if hub.looks_local(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--model {model}: no such directory; give a local model directory (with "
                              f"config.json), a hub id, or tiny")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {model}: not a transformers model directory (it has no config.json)")
        return
    if hub.offline() and not hub.model_in_cache(model):
        raise ConfigError(f"--model {model}: a hub id, but HF_HUB_OFFLINE is set and it is not in the local cache; "
                          f"download it where there is network, or give a local model directory")


def _tiny_heads_fit(hidden_size: int) -> bool:
    heads, kv_heads = tiny_attention_heads(hidden_size)
    return hidden_size % heads == 0 and heads % kv_heads == 0 and hidden_size % 16 == 0


# --- conversion of flag and YAML values ----------------------------------------------------------


def _kind(hint: Any) -> tuple[Any, bool]:
    """(the field's type or Literal, whether None is allowed)."""
    args = get_args(hint)
    if get_origin(hint) is Literal or type(None) not in args:
        return hint, False
    return next(a for a in args if a is not type(None)), True


_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(get_type_hints(TrainConfig))
    return _HINTS


def convert(name: str, value: Any, where: str) -> Any:
    """value (a command-line string, or what YAML read) as field name's type. Numbers may be
    written in scientific notation ("5e-6", which YAML reads as a string; "1e3" steps); an
    integer field takes integers only (3, "3", 3.0, "1e3"), never 1.5. Raises ConfigError naming
    where (the flag, or "file: key") and what is allowed."""
    kind, optional = _kind(_hints()[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required (null is not allowed)")
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        if value not in choices:
            raise ConfigError(f"{where}: invalid value {value!r}; allowed: {', '.join(choices)}")
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true or false; got {value!r}")
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string; got {value!r}")
        return value
    number = _number(value)
    if number is None:
        raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}; got {value!r}")
    if kind is int:
        if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
            raise ConfigError(f"{where}: expected an integer; got {value!r}")
        return int(number)
    return float(number)


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    return None


# --- the command line and --config ---------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line instead of argparse's usage block (the usage of 50 flags hides the message)."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.metadata["required"]:
        return text + " (required)"
    if f.default is None or f.default is False or "default" in text:
        return text
    return f"{text} (default: {f.default})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="epa-train", description="Align a causal LM with EPA or DPO on epa_ext's fused kernels.")
    for f in dataclasses.fields(TrainConfig):
        kind, _ = _kind(_hints()[f.name])
        if kind is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=_help(f))
        else:
            metavar = ("{" + ",".join(get_args(kind)) + "}" if get_origin(kind) is Literal
                       else {int: "N", float: "X"}.get(kind, f.name.upper()))
            parser.add_argument(_flag(f.name), default=argparse.SUPPRESS, metavar=metavar, help=_help(f))
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file of --config, then the flags given on the command line;
    validated. Raises ConfigError (argparse's own errors exit with one line, status 2)."""
    given = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    values: dict[str, Any] = {}
    if "config" in given:
        values.update(load_yaml(given["config"]))
    values.update({name: convert(name, value, _flag(name)) for name, value in given.items()})
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def load_yaml(path: str) -> dict[str, Any]:
    """The options of a YAML file, converted as their flags are. Raises ConfigError for a missing
    or unreadable file, YAML that is no mapping, an unknown key or a bad value."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"--config {path}: not UTF-8 text ({error.reason})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid YAML{where} ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values; got a "
                          f"{type(data).__name__}")
    known = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "config"]
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise ConfigError(f"--config {path}: unknown option {key!r}{hint}")
        values[name] = convert(name, value, f"{path}: {key}")
    return values
