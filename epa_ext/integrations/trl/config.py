"""EPAConfig (TRL's DPOConfig with EPA's fields) and the one check of a DPOConfig or EPAConfig
that EPATrainer runs before anything is loaded. EPA's own fields, their defaults, help and checks
are the preference core's option table (``epa_ext.preference.options``), shared with epa-train."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig

from ...preference.options import EPA_OPTIONS, FIELDS, check_epa_options, check_weak_batch
from ...preference.pairwise import LABEL_SMOOTHING_LOSS_TYPES, LOSS_TYPES, PairwiseSpec

SUPPORTED_LOSS_TYPES = (*LOSS_TYPES, "epa")
"""Loss types EPATrainer computes: every type of TRL 1.16's DPOTrainer, alone or mixed with
loss_weights as TRL mixes them, and "epa" (alone or with "sft")."""


def pairwise_spec(args: DPOConfig) -> PairwiseSpec:
    """The DPOConfig's loss fields as the core's PairwiseSpec, checked as TRL 1.16 checks them
    (ValueError / TypeError; its NotImplementedError as a ValueError subclass)."""
    return PairwiseSpec(loss_types=tuple(args.loss_type), loss_weights=args.loss_weights, beta=args.beta,
                        label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
                        f_alpha_divergence_coef=args.f_alpha_divergence_coef, ld_alpha=args.ld_alpha,
                        use_weighting=args.use_weighting, discopop_tau=args.discopop_tau)


def check_config(args: DPOConfig) -> None:
    """Raises ValueError / TypeError naming the first DPOConfig or EPAConfig field EPATrainer
    cannot honour; warns where it follows TRL in ignoring a field. A plain DPOConfig is checked
    with EPA's fields at their defaults. TRL's loss types and options are refused exactly where
    TRL 1.16 refuses them (``pairwise_spec``), and where training would divide by zero or by
    infinity (robust's label_smoothing 0.5, non-finite loss_weights)."""
    loss_types = list(args.loss_type)
    unknown = [t for t in loss_types if t not in SUPPORTED_LOSS_TYPES]
    if unknown:
        raise ValueError(f"loss_type must be one of {list(SUPPORTED_LOSS_TYPES)} (or a list of them, weighted by "
                         f"loss_weights); got {unknown} in {loss_types}")
    smoothing = args.label_smoothing
    if "robust" in loss_types and not 0.0 <= smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust' (its loss divides by "
                         f"1 - 2 * label_smoothing); got {smoothing}")
    epa = "epa" in loss_types
    if epa:
        _check_epa_loss(args, loss_types)
    else:
        pairwise_spec(args)
        if not all(_is_real(w) and math.isfinite(w) for w in args.loss_weights or []):
            raise ValueError(f"loss_weights must be finite numbers (one per loss type); got {args.loss_weights}")
    check_sharding(bool(args.deepspeed), (args.fsdp_config or {}).get("version") if args.fsdp else None)
    if smoothing and not epa and not LABEL_SMOOTHING_LOSS_TYPES & set(loss_types):
        named = repr(loss_types[0]) if len(loss_types) == 1 else loss_types
        warnings.warn(
            f"label_smoothing={smoothing} is ignored for loss_type={named}, as TRL 1.16's DPOTrainer ignores it "
            f"(TRL applies it to {sorted(LABEL_SMOOTHING_LOSS_TYPES)} only). epa_ext's own dpo_loss and epa-train "
            "apply conservative DPO (cDPO) for 'sigmoid' with label_smoothing > 0; with TRL, use "
            "loss_type='robust' for noisy labels",
            stacklevel=3,
        )
    options = {name: getattr(args, name, option.default) for name, option in EPA_OPTIONS.items()}
    check_epa_options(options, epa=epa, padding_free=args.padding_free, max_length=args.max_length,
                      spelling=FIELDS)
    check_weak_batch(options["num_weak"], args.per_device_train_batch_size, "per_device_train_batch_size")


def _check_epa_loss(args: DPOConfig, loss_types: list[str]) -> None:
    """loss_type "epa" alone or with one "sft" (RPO's NLL term); TRL's pair options refused."""
    if loss_types.count("epa") > 1 or any(t not in ("epa", "sft") for t in loss_types) or loss_types.count("sft") > 1:
        raise ValueError(
            f"loss_type 'epa' takes at most one 'sft' beside it (loss_type=['epa', 'sft'], loss_weights=[1.0, "
            f"alpha]); got {loss_types}. A pairwise term (e.g. 'bco_pair') needs one rejected answer per prompt, "
            "where EPA scores K strong and M weak negatives: choosing one of them (the first strong one?) would "
            "make the term depend on the order of the answers, and no TRL loss defines it to check it against. "
            "Train the pairwise loss with one rejected answer per row, or EPA with 'sft'")
    weights = args.loss_weights or [1.0] * len(loss_types)
    if not all(_is_real(w) and 0 <= w < float("inf") for w in weights) or weights[loss_types.index("epa")] <= 0:
        raise ValueError(f"loss_weights must be finite numbers >= 0, the one of 'epa' > 0; got {args.loss_weights}")
    if args.f_divergence_type != "reverse_kl":
        raise ValueError(f"f_divergence_type must be 'reverse_kl' for loss_type='epa' (f-DPO's scores cancel "
                         f"log Z(x) only in a chosen-minus-rejected difference, not in EPA's partition sum over "
                         f"K + M negatives); got {args.f_divergence_type!r}")
    if args.ld_alpha is not None:
        raise ValueError(f"ld_alpha does not apply to loss_type='epa': LD-DPO weighs the tokens beyond the shared "
                         f"length of one chosen/rejected pair, and EPA scores K + M negatives per prompt; got "
                         f"{args.ld_alpha}: leave it None")
    if args.use_weighting:
        raise ValueError("use_weighting=True (WPO's per-pair weights) does not apply to loss_type='epa', whose "
                         "terms are per prompt over K + M negatives, not per pair: leave it False")
    if args.label_smoothing:
        raise ValueError(f"label_smoothing does not apply to loss_type='epa'; got {args.label_smoothing}")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sharding(deepspeed: bool, fsdp_version: int | None) -> None:
    """FSDP2 (FSDP's fully_shard; accelerate's fsdp_version 2) is supported: the loss runs inside
    the model's forward, in the lm_head's forward hook, where FSDP2 holds the head's parameters
    whole (epa_ext.causal_lm.through_model), and is tested against one process and against
    DPOTrainer. The other sharded set-ups are refused before anything is loaded."""
    if deepspeed:
        raise ValueError("DeepSpeed is not supported by EPATrainer: ZeRO-3 partitions the lm_head's weight, which "
                         "DeepSpeed releases before the fused loss (run in the lm_head's forward hook) reads it, and "
                         "ZeRO-1/2 are untested; use FSDP2 (fsdp_version: 2), DDP, or trl.DPOTrainer")
    if fsdp_version is not None and fsdp_version != 2:
        raise ValueError(f"FSDP version {fsdp_version} is not supported by EPATrainer (untested with the fused loss); "
                         "use FSDP2: fsdp_version: 2 in accelerate's config (or fsdp_config={'fsdp_version': 2})")


def _epa_field(name: str) -> Any:
    """A dataclass field of EPAConfig from the core's option table."""
    return field(default=EPA_OPTIONS[name].default, metadata={"help": "EPA: " + EPA_OPTIONS[name].help})


@dataclass
class EPAConfig(DPOConfig):
    r"""TRL's DPOConfig with EPA's fields; ``loss_type`` also takes ``"epa"``.

    Parameters (besides DPOConfig's; their help is epa-train's, ``epa_ext.preference.options``):
        num_weak (`int`, defaults to `0`): M weak negatives per prompt for loss_type="epa",
            answers of other rows of the batch scored under this prompt (needs
            per_device_train_batch_size >= M + 1).
        weak_weight (`float`, defaults to `1.0`): alpha >= 0, each weak negative's weight in EPA's
            partition sum.
        num_strong (`int`, *optional*): K strong negatives per prompt for loss_type="epa": the
            first K rejected answers of each row (rows with fewer are padded and masked). None:
            the largest number of rejected answers of a training row.
        weak_correction (`str`, defaults to `"none"`): `"importance"` adds each weak negative's
            log importance weight log pi_ref(y|x) - log q(y) to its score, with q the answers'
            mixture over prompts estimated per weak answer from its own prompt (exactly) and
            weak_correction_prompts - 1 other prompts of the batch, scored by the reference
            (docs/losses.md; epa-train's --weak-correction importance, within a batch).
        weak_correction_prompts (`int`, defaults to `8`): S of that estimate (S - 1 extra
            reference scorings per weak negative and step).
        weak_source (`str`, defaults to `"any"`): which answer of another row a weak negative
            borrows: `"any"` its chosen or first rejected answer, `"rejected"` its first rejected
            answer only (epa-train's --weak-source).
        token_metrics (`bool`, defaults to `False`): also log TRL's entropy and
            mean_token_accuracy, which need the full softmax: one more no-grad pass of the lm_head
            over the answer tokens per step.
        padding_free (`bool`, defaults to `False`): DPOConfig's field, honoured: the batch's
            sequences packed into rows without padding (epa_ext.integrations.trl), for attention
            implementations sdpa, eager, flex_attention, flash_attention_2/3.
        prefix_sharing (`str`, defaults to `"off"`): `"on"`: each prompt through the decoder once
            for all its candidates (prefix-shared rows, policy and reference; sdpa or eager
            attention; refused where the probe on the model finds it not exact); `"auto"`: where the
            probe passes and a batch's decoder tokens fall by >= 1.3x, else as without it (warned
            once); `"off"`: never (epa-train's --prefix-sharing).
        max_packed_length (`int`, *optional*): with padding_free or prefix_sharing, the most tokens
            in a packed or shared row, >= max_length (attention's cost grows with its square).
            None: 2 x max_length (with max_length None: 2 x the batch's longest sequence); flash
            attention packs one row.
    """

    num_weak: int = _epa_field("num_weak")
    weak_weight: float = _epa_field("weak_weight")
    num_strong: int | None = _epa_field("num_strong")
    weak_correction: str = _epa_field("weak_correction")
    weak_correction_prompts: int = _epa_field("weak_correction_prompts")
    weak_source: str = _epa_field("weak_source")
    token_metrics: bool = field(
        default=False,
        metadata={"help": "Log entropy and mean_token_accuracy (one more no-grad lm_head pass per step)."},
    )
    prefix_sharing: str = _epa_field("prefix_sharing")
    max_packed_length: int | None = _epa_field("max_packed_length")

    def __post_init__(self):
        super().__post_init__()
        check_config(self)
