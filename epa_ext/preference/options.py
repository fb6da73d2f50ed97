"""EPA's options, declared once: their defaults, their help and their one validator, shared by
epa-train's TrainConfig (flags such as ``--num-weak``) and the TRL integration's EPAConfig (fields
such as ``num_weak``). The same mistake gets the same words in both; only the option's spelling
and the way each interface selects EPA (``--loss epa`` / ``loss_type='epa'``) differ
(``Spelling``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

# --max-packed-length's default in units of --max-length (bench/bench_real_data.py --mode rows)
PACKED_ROW_LENGTHS = 2
# Which answer of another example a weak negative borrows (candidates.weak_negative_sources).
WEAK_SOURCES = ("any", "rejected")
WEAK_CORRECTIONS = ("none", "importance")
PREFIX_SHARING = ("auto", "on", "off")
# --prefix-sharing auto shares a batch's prompts when the decoder tokens it saves reach this ratio,
# C(P + A) / (P + sum A) over the batch's groups (bench/bench_real_data.py measures the break-even).
MIN_SHARED_TOKEN_RATIO = 1.3


@dataclass(frozen=True)
class EPAOption:
    """One EPA option: its default and the help both interfaces show."""

    default: Any
    help: str


EPA_OPTIONS: dict[str, EPAOption] = {
    "num_strong": EPAOption(None, "EPA strong negatives per prompt (rejected answers; default: the most any training "
                                  "example has, fewer are masked)"),
    "num_weak": EPAOption(0, "EPA weak negatives per prompt: answers of other examples scored under this prompt "
                             "(which data they help on: docs/losses.md, \"Which EPA setting for which data\")"),
    "weak_weight": EPAOption(1.0, "weight alpha >= 0 of each weak negative in EPA's partition sum"),
    "weak_correction": EPAOption(
        "none", "importance: add the log importance weight log pi_ref(y|x) - log q(y) to each weak negative's "
                "score, with q the data's answer mixture, estimated per answer from its own prompt and S - 1 others "
                "(docs/losses.md). none: weak negatives as they are"),
    "weak_correction_prompts": EPAOption(8, "S of the importance correction: each weak answer's q is estimated from "
                                            "its own prompt and S - 1 others (S + 1 reference scorings per weak "
                                            "negative)"),
    "weak_source": EPAOption(
        "any", "which answer of another example a weak negative borrows: any: its chosen or its first rejected "
               "answer (drawn by the seed); rejected: its first rejected answer only (the reference's samples where "
               "the rejected answers are drawn from it independently of the choice; docs/losses.md)"),
    "prefix_sharing": EPAOption(
        "off", "each prompt through the decoder once for all its candidates (prefix-shared rows, policy and "
               "reference; sdpa or eager attention, checked on the model before training). on: always, refused "
               "where it cannot be exact; auto: where the probe passes and a batch's decoder tokens fall by "
               f">= {MIN_SHARED_TOKEN_RATIO}x (else padding-free or padded, said once); off: never"),
    "max_packed_length": EPAOption(None, "with padding-free batches: most tokens in a packed row, >= the maximum "
                                         f"length (default: {PACKED_ROW_LENGTHS} x the maximum length)"),
}


@dataclass(frozen=True)
class Spelling:
    """How one interface writes an option's name and the choice of EPA in a message."""

    option: Callable[[str], str]
    epa: str
    padding_free: str


FLAGS = Spelling(lambda name: "--" + name.replace("_", "-"), "--loss epa", "--padding-free")
FIELDS = Spelling(lambda name: name, "loss_type='epa'", "padding_free=True")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_epa_options(values: dict[str, Any], *, epa: bool, padding_free: bool, max_length: int | None,
                      spelling: Spelling, error: type[ValueError] = ValueError) -> None:
    """Checks EPA's options (values: the EPA_OPTIONS names given, missing ones at their
    defaults): types (TypeError), values and combinations that cannot be meant (``error``, a
    ValueError), each naming the option as ``spelling`` writes it.

    epa: whether the run trains EPA (else its options must keep their defaults); padding_free:
    whether batches are packed; max_length: the longest prompt + answer (None: not bounded).
    """
    options = {name: values.get(name, option.default) for name, option in EPA_OPTIONS.items()}
    name = spelling.option

    def refuse(option: str, allowed: str, hint: str = "") -> None:
        raise error(f"{name(option)} must be {allowed}; got {options[option]}" + (f" ({hint})" if hint else ""))

    for option in ("num_weak", "weak_correction_prompts"):
        if not _is_int(options[option]):
            raise TypeError(f"{name(option)} must be an int; got {type(options[option]).__name__}")
    for option in ("num_strong", "max_packed_length"):
        if options[option] is not None and not _is_int(options[option]):
            raise TypeError(f"{name(option)} must be an int or None; got {type(options[option]).__name__}")
    if not _is_real(options["weak_weight"]):
        raise TypeError(f"{name('weak_weight')} must be a real number; got {type(options['weak_weight']).__name__}")
    for option in ("weak_correction", "weak_source", "prefix_sharing"):
        if not isinstance(options[option], str):
            raise TypeError(f"{name(option)} must be a str; got {type(options[option]).__name__}")

    if options["num_weak"] < 0:
        refuse("num_weak", ">= 0")
    if options["num_strong"] is not None and options["num_strong"] < 1:
        refuse("num_strong", ">= 1", "or left out: every rejected answer")
    if not (math.isfinite(options["weak_weight"]) and options["weak_weight"] >= 0):
        refuse("weak_weight", "a finite number >= 0")
    if options["weak_correction"] not in WEAK_CORRECTIONS:
        refuse("weak_correction", " or ".join(repr(c) for c in WEAK_CORRECTIONS))
    if options["weak_correction_prompts"] < 2:
        refuse("weak_correction_prompts", ">= 2", "the answer's own prompt and at least one other")
    if options["weak_source"] not in WEAK_SOURCES:
        refuse("weak_source", "one of " + ", ".join(repr(s) for s in WEAK_SOURCES))
    if options["prefix_sharing"] not in PREFIX_SHARING:
        refuse("prefix_sharing", "one of " + ", ".join(repr(s) for s in PREFIX_SHARING))
    bound = options["max_packed_length"]
    if bound is not None:
        if not padding_free and options["prefix_sharing"] == "off":
            raise error(f"{name('max_packed_length')} applies to {spelling.padding_free} or "
                        f"{name('prefix_sharing')} only")
        if bound < (max_length or 1):
            refuse("max_packed_length", f">= {name('max_length')} ({max_length})",
                   "a sequence is never split across packed rows")

    if not epa:
        for option, meant in (("num_weak", "weak negatives"), ("weak_weight", "weak negatives"),
                              ("weak_correction", "weak negatives"), ("weak_correction_prompts", "weak negatives"),
                              ("weak_source", "weak negatives"), ("num_strong", "several rejected answers")):
            if options[option] != EPA_OPTIONS[option].default and not (option == "num_strong" and options[option] == 1):
                raise error(f"{name(option)} applies to {spelling.epa} only (DPO takes one rejected answer and no "
                            f"{meant}); use {spelling.epa}")
        return
    if options["weak_correction"] != "none" and not options["num_weak"]:
        raise error(f"{name('weak_correction')} corrects weak negatives: it needs {name('num_weak')} > 0")
    if options["weak_source"] != EPA_OPTIONS["weak_source"].default and not options["num_weak"]:
        raise error(f"{name('weak_source')} says where weak negatives come from: it needs {name('num_weak')} > 0")
    if options["weak_correction"] == "none" and \
            options["weak_correction_prompts"] != EPA_OPTIONS["weak_correction_prompts"].default:
        raise error(f"{name('weak_correction_prompts')} applies to {name('weak_correction')} importance only")


def check_weak_batch(num_weak: int, batch_size: int, what: str) -> None:
    """Weak negatives borrowed from the other rows of a batch need num_weak + 1 rows in it."""
    if num_weak > batch_size - 1:
        raise ValueError(
            f"num_weak = {num_weak} weak negatives per prompt are borrowed from the other rows of the batch, so they "
            f"need {what} >= num_weak + 1 = {num_weak + 1}; got {batch_size}: lower num_weak or raise {what}"
        )
