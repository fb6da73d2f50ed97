"""Every setting of the known-reward experiment, and `epa-demo`'s flags built from them.

- ``TaskSpec``: the task (alphabet, lengths, the reward's scale); ``ReferenceSpec``: the SFT
  reference policy; ``NegativesGrid`` and ``PracticalGrid``: what the two sweeps vary.
- ``Method``: a training objective (DPO, or EPA with K strong and M weak negatives), named
  ``dpo`` or ``epa_kK`` / ``epa_kK_mM``.
- ``ExperimentConfig``: one experiment (methods x seeds, and everything they share).
- ``build_parser`` / ``config_from_flags``: one flag per field, nested specs prefixed with their
  field's name (``--reference-steps``, ``--task-alphabet-size``, ``--negatives-num-weak``); each
  field's help text is its flag's help, so ``epa-demo --help`` documents every setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import string
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints


def option(default: Any, help: str) -> Any:
    """A config field with its flag's help text (a list default is copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TaskSpec:
    alphabet_size: int = option(12, "letters of the alphabet (prompts and answers are drawn from them)")
    prompt_length: int = option(4, "distinct letters per prompt")
    answer_length: int = option(6, "letters per answer (then </s>)")
    copy_prob: float = option(0.5, "base distribution: chance that an answer letter is copied from the prompt "
                                   "(otherwise any letter)")
    in_prompt_reward: float = option(0.5, "r* per answer letter: + this if the letter occurs in the prompt, - if not")
    letter_value_scale: float = option(0.5, "r* per answer letter: plus a fixed seeded value in [-scale, scale] "
                                            "per letter")
    seed: int = option(0, "seed of the letter values, the reference's initialization and the held-out prompts "
                          "(the task itself, not a training seed)")

    def __post_init__(self):
        if not 1 <= self.prompt_length <= self.alphabet_size <= len(string.ascii_lowercase):
            raise ValueError(f"need 1 <= --task-prompt-length <= --task-alphabet-size <= 26; got "
                             f"{self.prompt_length}, {self.alphabet_size}")
        if self.answer_length < 1 or not 0 <= self.copy_prob <= 1:
            raise ValueError(f"need --task-answer-length >= 1 and --task-copy-prob in [0, 1]; got "
                             f"{self.answer_length}, {self.copy_prob}")


@dataclass(frozen=True)
class ReferenceSpec:
    hidden_size: int = option(64, "hidden size of the reference's tiny Llama")
    layers: int = option(2, "decoder layers of the reference")
    # 400 steps left the reference's letters 0.03 short of the base's copy rate and 1.6 % of its
    # answers malformed; 800 gets within 0.01 nats per letter of the base's entropy.
    steps: int = option(800, "SFT steps of the reference on the base distribution")
    batch_size: int = option(128, "prompts per SFT step")
    lr: float = option(3e-3, "peak SFT learning rate (AdamW, cosine)")


@dataclass(frozen=True)
class NegativesGrid:
    """``--sweep negatives``: EPA with K strong negatives and each M weak ones; then each K at a
    few M; DPO as the baseline."""

    num_weak: list[int] = option([0, 1, 2, 4, 8, 16], "weak negatives M of the M sweep")
    num_strong: int = option(3, "strong negatives K of the M sweep")
    strong_values: list[int] = option([1, 2, 3], "strong negatives K of the K sweep")
    strong_at_weak: list[int] = option([0, 8], "the M at which the K sweep runs")


@dataclass(frozen=True)
class PracticalGrid:
    """``--sweep practical``: DPO, DPO + SFT (TRL's RPO) and EPA at each weak weight, with and
    without the SFT term, on the default reference and on a longer-trained one."""

    method: str = option("epa_k3_m4", "the EPA method whose weak weight and SFT term are varied")
    weak_weights: list[float] = option([0.25, 0.5, 1.0], "weak weights alpha tried")
    sft_weight: float = option(1.0, "weight of the SFT term (NLL of the chosen answers, as TRL's rpo_alpha) "
                                    "in the +SFT settings")
    long_reference_steps: int = option(3200, "SFT steps of the longer reference")
    long_reference_weak_weights: list[float] = option([1.0], "weak weights of the EPA settings repeated on the "
                                                             "longer reference (with and without SFT)")


@dataclass(frozen=True)
class WeakCorrectionGrid:
    """``--sweep weak-correction``: EPA with K strong negatives and each M weak ones, under each
    weak-correction variant (M = 0 has no weak negatives to correct: run once)."""

    num_strong: int = option(3, "strong negatives K")
    num_weak: list[int] = option([0, 1, 2, 4, 8, 16], "weak negatives M")
    variants: list[str] = option(["none", "exact", "estimated"], "weak-correction variants (see --weak-correction)")


@dataclass(frozen=True)
class IpmGrid:
    """``--sweep ipm`` (issue 36; its plan: docs/known_reward/sweeps/README.md, "ipm sweep"): on
    --data-model ipm data, DPO, then EPA with each K strong negatives at M = 0 and at each M > 0
    weak ones under each weak-correction variant (EPA K = 1 M = 0 is DPO's loss: left out)."""

    strong_values: list[int] = option([1, 3], "strong negatives K")
    num_weak: list[int] = option([0, 1, 4, 16, 64, 256], "weak negatives M")
    variants: list[str] = option(["none", "exact", "estimated"], "weak-correction variants (see --weak-correction)")


WEAK_CORRECTIONS = ("none", "exact", "estimated")


@dataclass(frozen=True)
class Method:
    """An objective: DPO, or EPA with num_strong (K) and num_weak (M) negatives."""

    name: str
    loss: Literal["dpo", "epa"]
    num_strong: int
    num_weak: int

    @property
    def label(self) -> str:
        return "DPO" if self.loss == "dpo" else f"EPA K={self.num_strong} M={self.num_weak}"


_EPA_NAME = re.compile(r"^epa_k(\d+)(?:_m(\d+))?$")


def parse_method(name: str) -> Method:
    """``dpo``, or ``epa_kK`` (M = 0) / ``epa_kK_mM`` with K >= 1 and M >= 0."""
    if name == "dpo":
        return Method(name, "dpo", 1, 0)
    match = _EPA_NAME.match(name)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown method {name!r}: use dpo, epa_kK or epa_kK_mM (K >= 1 strong, M >= 0 weak "
                         f"negatives), e.g. epa_k3_m4")
    return Method(name, "epa", int(match.group(1)), int(match.group(2) or 0))


DEFAULT_METHODS = ["dpo", "epa_k1", "epa_k3", "epa_k1_m4", "epa_k3_m4"]
# Every metric of metrics.evaluate_policy that is summarized as mean ± std over seeds.
METRICS = ("reward", "reward_well_formed", "malformed", "kl", "accuracy", "rho", "slope1_error", "slope")


@dataclass
class ExperimentConfig:
    output_dir: str = option("epa-demo-run", "where everything is written, and reused by a rerun with the "
                                             "same settings")
    seeds: list[int] = option([0, 1, 2], "training seeds (each has its own preference data)")
    methods: list[str] = option(list(DEFAULT_METHODS), "methods to train: dpo, epa_kK or epa_kK_mM (K strong, "
                                                       "M weak negatives)")
    # --- training, the same for every method
    steps: int = option(200, "optimizer steps per method and seed")
    batch_size: int = option(16, "prompts per step")
    lr: float = option(3e-4, "peak learning rate (AdamW, 10 % warm-up)")
    scheduler: Literal["cosine", "linear", "constant"] = option("cosine", "learning-rate decay after warm-up")
    beta: float = option(1.0, "β of r_θ = β·log(π/π_ref)")
    weak_weight: float = option(1.0, "weight α of each weak negative in EPA's partition sum")
    weak_correction: Literal["none", "exact", "estimated"] = option(
        "none", "importance weights of the weak negatives, log π_ref(y|x) - log q(y): none; estimated (epa-train's "
                "--weak-correction importance, q estimated per answer); exact (the same with the task's exact q, "
                "the base distribution marginalised over all prompts)")
    weak_correction_prompts: int = option(8, "S of the estimated correction (epa-train's --weak-correction-prompts)")
    weak_source: Literal["any", "rejected"] = option(
        "any", "where weak negatives are borrowed from (epa-train's --weak-source): any: another example's chosen or "
               "first rejected answer; rejected: its first rejected answer only (on --data-model ipm a base sample, "
               "whose law is exactly the q of --weak-correction exact)")
    sft_weight: float = option(0.0, "weight of the SFT term: the chosen answers' NLL per token added to the loss "
                                    "(DPO + SFT is TRL's RPO)")
    # --- data
    data_model: Literal["pool", "ipm"] = option(
        "pool", "how preference rows are drawn: pool: the chosen answer by softmax(r*/τ) among --candidates reference "
                "samples, the others rejected; ipm: the chosen answer exactly from base·exp(r*/τ)/Z over all answers "
                "(the energy-based model), --candidates - 1 rejected ones from the base independently of it")
    temperature: float = option(1.0, "τ of the preference draw: the chosen answer ∝ exp(r*/τ)")
    train_prompts: int = option(2000, "preference rows per seed")
    candidates: int = option(4, "reference answers per training prompt (the chosen one and its strong negatives)")
    # --- evaluation
    eval_prompts: int = option(256, "held-out prompts")
    eval_candidates: int = option(8, "reference answers per held-out prompt scored for ρ, ε̂, slope and accuracy")
    policy_samples: int = option(8, "answers sampled from each trained policy per held-out prompt (true reward, "
                                    "malformed share, KL)")
    eval_every: int = option(0, "also evaluate a checkpoint every this many steps (curves over steps; 0: only "
                                "the final policy)")
    # --- the task, the reference and the sweeps' grids
    task: TaskSpec = option(TaskSpec(), "the task")
    reference: ReferenceSpec = option(ReferenceSpec(), "the reference policy")
    negatives: NegativesGrid = option(NegativesGrid(), "--sweep negatives")
    practical: PracticalGrid = option(PracticalGrid(), "--sweep practical")
    weak_correction_grid: WeakCorrectionGrid = option(WeakCorrectionGrid(), "--sweep weak-correction")
    ipm_grid: IpmGrid = option(IpmGrid(), "--sweep ipm")
    # --- how it runs (results do not depend on these)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: cuda when available")
    workers: int | None = option(None, "training processes at once (default: one per core on CPU, at most 8; "
                                       "1 on CUDA)")
    threads: int | None = option(None, "torch threads per training process (default: the cores divided among "
                                       "the workers; 1 is fastest on a busy machine)")
    progress: bool = option(True, "progress bars and one line per finished run")

    def validate(self) -> None:
        """Raises ValueError naming the first bad flag."""
        if not self.seeds or not self.methods:
            raise ValueError("need at least one seed (--seeds) and one method (--methods)")
        methods = [parse_method(name) for name in (*self.methods, self.practical.method)]
        most_strong = max(m.num_strong for m in methods)
        if self.candidates < 1 + most_strong:
            raise ValueError(f"--candidates {self.candidates} is too few for {most_strong} strong negatives plus "
                             f"the chosen answer")
        for name in ("steps", "batch_size", "train_prompts", "eval_prompts", "policy_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.eval_candidates < 2:
            raise ValueError(f"--eval-candidates must be >= 2 (correlations need two); got {self.eval_candidates}")
        if self.beta <= 0 or self.temperature <= 0:
            raise ValueError("--beta and --temperature must be > 0")
        if self.weak_weight <= 0 or any(w <= 0 for w in self.practical.weak_weights):
            raise ValueError("--weak-weight and --practical-weak-weights must be > 0")
        if self.sft_weight < 0 or self.practical.sft_weight < 0:
            raise ValueError("--sft-weight and --practical-sft-weight must be >= 0")
        if self.data_model not in ("pool", "ipm") or self.weak_source not in ("any", "rejected"):
            raise ValueError(f"--data-model must be pool or ipm and --weak-source any or rejected; got "
                             f"{self.data_model!r}, {self.weak_source!r}")
        if self.weak_correction_prompts < 2:
            raise ValueError(f"--weak-correction-prompts must be >= 2; got {self.weak_correction_prompts}")
        bad = [v for v in self.weak_correction_grid.variants if v not in WEAK_CORRECTIONS]
        if bad or any(m < 0 for m in self.weak_correction_grid.num_weak) or self.weak_correction_grid.num_strong < 1:
            raise ValueError(f"--weak-correction-grid-variants must be among {WEAK_CORRECTIONS} (got {bad}), "
                             "--weak-correction-grid-num-weak >= 0 and --weak-correction-grid-num-strong >= 1")
        bad = [v for v in self.ipm_grid.variants if v not in WEAK_CORRECTIONS]
        if bad or any(m < 0 for m in self.ipm_grid.num_weak) or any(k < 1 for k in self.ipm_grid.strong_values):
            raise ValueError(f"--ipm-grid-variants must be among {WEAK_CORRECTIONS} (got {bad}), "
                             "--ipm-grid-num-weak >= 0 and --ipm-grid-strong-values >= 1")
        if self.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0; got {self.eval_every}")
        for name in ("workers", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1; got {getattr(self, name)}")
        if self.reference.steps < 1 or self.practical.long_reference_steps < 1:
            raise ValueError("--reference-steps and --practical-long-reference-steps must be >= 1")
        if any(m < 0 for m in (*self.negatives.num_weak, *self.negatives.strong_at_weak)) or \
                any(k < 1 for k in (self.negatives.num_strong, *self.negatives.strong_values)):
            raise ValueError("--negatives-num-weak and --negatives-strong-at-weak must be >= 0, "
                             "--negatives-num-strong and --negatives-strong-values >= 1")


# --- flags ------------------------------------------------------------------------------------


def _argument(hint: Any) -> dict[str, Any]:
    """argparse keywords for a field of type hint (int, float, str, bool, Literal, X | None, list[X])."""
    if get_origin(hint) is Literal:
        return {"type": str, "choices": list(get_args(hint))}
    if get_origin(hint) is list:
        return {"type": get_args(hint)[0], "nargs": "+"}
    optional = [a for a in get_args(hint) if a is not type(None)]
    if optional:
        return _argument(optional[0])
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": hint}


def _fields(cls, prefix: str = ""):
    """(dest, flag, field, type hint) of every leaf field, nested dataclasses flattened."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _fields(hints[f.name], f"{prefix}{f.name}__")
        else:
            yield prefix + f.name, "--" + (prefix + f.name).replace("__", "-").replace("_", "-"), f, hints[f.name]


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ExperimentConfig field; only the flags given appear in the parsed namespace."""
    defaults = ExperimentConfig()
    groups = {}
    for dest, flag, f, hint in _fields(ExperimentConfig):
        section = dest.split("__")[0] if "__" in dest else None
        if section not in groups:
            groups[section] = parser if section is None else parser.add_argument_group(
                f"{section} ({ExperimentConfig.__dataclass_fields__[section].metadata['help']})")
        default = defaults
        for part in dest.split("__"):
            default = getattr(default, part)
        shown = "" if default is None else \
            f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
        keywords = _argument(hint)
        if "action" not in keywords and "choices" not in keywords:
            keywords["metavar"] = f.name.upper()
        groups[section].add_argument(flag, dest=dest, default=argparse.SUPPRESS, **keywords,
                                     help=f"{f.metadata['help']}{shown}".replace("%", "%%"))


def config_from_flags(given: dict[str, Any], base: ExperimentConfig | None = None) -> ExperimentConfig:
    """base (default: ExperimentConfig()) with the given flags (dest -> value, as add_config_flags
    names them) applied."""
    base = base or ExperimentConfig()
    top = {k: v for k, v in given.items() if "__" not in k}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in given.items():
        if "__" in key:
            section, name = key.split("__", 1)
            nested.setdefault(section, {})[name] = value
    for section, values in nested.items():
        top[section] = dataclasses.replace(getattr(base, section), **values)
    return dataclasses.replace(base, **top)
