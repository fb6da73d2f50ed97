"""TRL's DPOTrainer on epa_ext's fused-linear losses, and EPA for TRL users: change one import.

    # from trl import DPOConfig, DPOTrainer
    from epa_ext.integrations.trl import EPAConfig as DPOConfig, EPATrainer as DPOTrainer

    args = DPOConfig(output_dir="out", loss_type="sigmoid", beta=0.1)          # TRL's DPO, same numbers
    args = DPOConfig(output_dir="out", loss_type="epa", num_weak=2, weak_weight=0.5)   # EPA
    DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok).train()

``EPATrainer`` is TRL's ``DPOTrainer`` with the loss computed by epa_ext: the decoder's final hidden
states and the lm_head weight go into ``fused_linear_dpo_loss`` / ``fused_linear_epa_loss``, so the
batch's [rows, T, V] logits are never formed, and the reference log-probs come from
``linear_sequence_logps`` (or from TRL's precomputed columns). Everything else (data preparation,
optimizer, scheduler, PEFT, gradient accumulation, mixed precision, logging, checkpoints) is TRL's
and transformers' own. Supported loss types: "sigmoid", "robust", "hinge", "ipo" (the numbers of
TRL 1.16's DPOTrainer with the same config) and "epa", each optionally with TRL's "sft" term (RPO;
epa_ext's ``sft_weight``). DPOConfig fields the subclass cannot honour raise before anything is
loaded (docs/trl.md lists every field).

EPA (``loss_type="epa"``): candidate 0 of a prompt is its chosen answer, candidates 1..K its
rejected answers (strong negatives; ``rejected`` may be a list of answers, K is the largest count
in the training set, or ``num_strong``), then ``num_weak`` = M weak negatives: answers of other
rows of the same batch (their chosen or first rejected answer, picked by epa-train's
``weak_negative_sources`` from the seed and the row positions), scored under this row's prompt.
Loss per prompt: logsumexp_j(beta h_j + omega_j) - beta h_0 (omega = 0 strong, log weak_weight weak).

Metrics use TRL's names (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
logps/chosen, logps/rejected, logits/chosen, logits/rejected, num_tokens; entropy and
mean_token_accuracy with ``token_metrics=True``, as they need one more pass over the vocabulary),
plus rewards/weak for EPA's weak negatives. With several strong negatives, "rejected" metrics
average over them and margins/accuracies over (chosen, strong negative) pairs.

This module depends on DPOTrainer internals of TRL 1.16 (``_prepare_dataset``,
``compute_ref_log_probs``, ``_precompute_ref_logps``, ``_precompute_model_hash``, ``_metrics``,
``_total_train_tokens``); importing it with another TRL raises ImportError naming the supported
versions.

Padding-free batches (``padding_free=True``, which TRL 1.16 turns off with a warning): each
batch's sequences are packed into rows without padding (at most ``max_packed_length`` tokens each),
position ids restarting at every sequence so that attention stays within it, the policy and the
reference run on the packed rows and their hidden states are gathered back into the padded layout
for the fused losses: the same log-probs and losses as padded batches, to rounding. Attention
implementations that do not keep packed sequences apart are refused (epa_ext.train.packing).
"""

from __future__ import annotations

import contextlib
import numbers
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

try:
    import trl
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("epa_ext.integrations.trl needs TRL: pip install 'epa_ext[trl]'") from error

from packaging.version import Version

SUPPORTED_TRL_VERSIONS = ">=1.16,<1.17"
if not Version("1.16") <= Version(Version(trl.__version__).base_version) < Version("1.17"):
    raise ImportError(
        f"epa_ext.integrations.trl supports TRL {SUPPORTED_TRL_VERSIONS} (it overrides DPOTrainer internals "
        f"that change between releases); found trl {trl.__version__}. Install a supported one: "
        "pip install 'epa_ext[trl]'"
    )

from accelerate.utils import is_peft_model  # noqa: E402  (after the version check)
from datasets import Dataset, IterableDataset  # noqa: E402
from datasets.fingerprint import Hasher  # noqa: E402
from transformers import ProcessorMixin  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.data_utils import _tokenize, common_prefix_length, extract_prompt, is_conversational  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402
from trl.trainer.utils import global_then_local_main_first, pad, use_adapter  # noqa: E402

from ..fused import fused_linear_dpo_loss, fused_linear_epa_loss  # noqa: E402
from ..linear import linear_sequence_logps  # noqa: E402
from ..logps import IGNORE_INDEX, completion_labels  # noqa: E402
from ..losses import DPO_LOSS_TYPES, preference_metrics  # noqa: E402
from ..train.batching import WEAK_SOURCES, weak_negative_sources  # noqa: E402
from ..train.config import PACKED_ROW_LENGTHS  # noqa: E402
from ..train.packing import (attn_implementation, check_packed_attention, pack, row_bound,  # noqa: E402
                             through_packed_model)
from ..train.weak_correction import estimated_log_q, other_prompts  # noqa: E402
from .. import causal_lm  # noqa: E402

__all__ = ["EPAConfig", "EPADataCollator", "EPATrainer", "SUPPORTED_LOSS_TYPES", "SUPPORTED_TRL_VERSIONS"]

SUPPORTED_LOSS_TYPES = (*DPO_LOSS_TYPES, "epa")
"""Preference loss types EPATrainer computes (one per run, optionally with "sft")."""

# Keys of a collated batch that are not model inputs.
_NON_MODEL_KEYS = frozenset({"completion_mask", "candidate_mask", "ref_chosen_logps", "ref_rejected_logps",
                             "weak_prompts_input_ids", "weak_prompts_attention_mask", "weak_prompts_completion_mask",
                             "weak_source_index"})


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_config(args: DPOConfig) -> None:
    """Raises ValueError / TypeError naming the first DPOConfig or EPAConfig field EPATrainer
    cannot honour; warns where it follows TRL in ignoring a field. A plain DPOConfig is checked
    with EPA's fields at their defaults."""
    loss_types = list(args.loss_type)
    preference = [t for t in loss_types if t != "sft"]
    if len(preference) != 1 or preference[0] not in SUPPORTED_LOSS_TYPES or len(loss_types) - len(preference) > 1:
        raise ValueError(
            f"loss_type must be one of {list(SUPPORTED_LOSS_TYPES)}, optionally with 'sft' (RPO: loss_type=[..., "
            f"'sft'], loss_weights=[1.0, alpha]); got {loss_types}. TRL's other loss types and combinations are "
            "not implemented by epa_ext: use trl.DPOTrainer for them"
        )
    loss_type = preference[0]
    weights = args.loss_weights or [1.0] * len(loss_types)
    if not all(_is_real(w) and 0 <= w < float("inf") for w in weights) or weights[loss_types.index(loss_type)] <= 0:
        raise ValueError(f"loss_weights must be finite numbers >= 0, the one of {loss_type!r} > 0; got "
                         f"{args.loss_weights}")
    if args.f_divergence_type != "reverse_kl":
        raise ValueError(f"f_divergence_type must be 'reverse_kl' (epa_ext implements DPO's reverse KL only); got "
                         f"{args.f_divergence_type!r}")
    if args.ld_alpha is not None:
        raise ValueError(f"ld_alpha (LD-DPO's weighting of the tokens beyond the shared length) is not implemented "
                         f"by epa_ext; got {args.ld_alpha}: leave it None, or use trl.DPOTrainer")
    if args.use_weighting:
        raise ValueError("use_weighting=True (WPO weights from the policy's per-token probabilities) is not "
                         "implemented by epa_ext: leave it False, or use trl.DPOTrainer")
    _check_sharding(bool(args.deepspeed), (args.fsdp_config or {}).get("version") if args.fsdp else None)
    smoothing = args.label_smoothing
    if loss_type == "robust" and not 0.0 <= smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust'; got {smoothing}")
    if loss_type == "epa" and smoothing:
        raise ValueError(f"label_smoothing does not apply to loss_type='epa'; got {smoothing}")
    if loss_type in ("sigmoid", "hinge", "ipo") and smoothing:
        warnings.warn(
            f"label_smoothing={smoothing} is ignored for loss_type={loss_type!r}, as TRL 1.16's DPOTrainer ignores "
            "it (TRL applies it to 'robust' and EXO only). epa_ext's own dpo_loss and epa-train apply conservative "
            "DPO (cDPO) for 'sigmoid' with label_smoothing > 0; with TRL, use loss_type='robust' for noisy labels",
            stacklevel=3,
        )
    num_weak = getattr(args, "num_weak", 0)
    weak_weight = getattr(args, "weak_weight", 1.0)
    num_strong = getattr(args, "num_strong", None)
    if not isinstance(num_weak, int) or isinstance(num_weak, bool):
        raise TypeError(f"num_weak must be an int; got {type(num_weak).__name__}")
    if num_strong is not None and (not isinstance(num_strong, int) or isinstance(num_strong, bool)):
        raise TypeError(f"num_strong must be an int or None; got {type(num_strong).__name__}")
    if not _is_real(weak_weight):
        raise TypeError(f"weak_weight must be a real number; got {type(weak_weight).__name__}")
    if loss_type != "epa" and (num_weak or num_strong is not None):
        raise ValueError(f"num_weak and num_strong apply to loss_type='epa'; got loss_type={loss_type!r} with "
                         f"num_weak={num_weak}, num_strong={num_strong}")
    if num_weak < 0:
        raise ValueError(f"num_weak must be >= 0; got {num_weak}")
    if num_strong is not None and num_strong < 1:
        raise ValueError(f"num_strong must be >= 1 or None (all rejected answers); got {num_strong}")
    if not weak_weight >= 0 or weak_weight == float("inf"):
        raise ValueError(f"weak_weight must be a finite number >= 0; got {weak_weight}")
    correction = getattr(args, "weak_correction", "none")
    prompts = getattr(args, "weak_correction_prompts", 8)
    if correction not in ("none", "importance"):
        raise ValueError(f"weak_correction must be 'none' or 'importance'; got {correction!r}")
    if not isinstance(prompts, int) or isinstance(prompts, bool):
        raise TypeError(f"weak_correction_prompts must be an int; got {type(prompts).__name__}")
    if correction == "importance" and not num_weak:
        raise ValueError("weak_correction='importance' corrects weak negatives: it needs loss_type='epa' with "
                         "num_weak > 0")
    if prompts < 2:
        raise ValueError(f"weak_correction_prompts must be >= 2 (the answer's own prompt and at least one other); "
                         f"got {prompts}")
    weak_source = getattr(args, "weak_source", "any")
    if not isinstance(weak_source, str):
        raise TypeError(f"weak_source must be a str; got {type(weak_source).__name__}")
    if weak_source not in WEAK_SOURCES:
        raise ValueError(f"weak_source must be one of {WEAK_SOURCES}; got {weak_source!r}")
    _check_weak_batch(num_weak, args.per_device_train_batch_size, "per_device_train_batch_size")
    max_packed_length = getattr(args, "max_packed_length", None)
    if max_packed_length is not None:
        if not isinstance(max_packed_length, int) or isinstance(max_packed_length, bool):
            raise TypeError(f"max_packed_length must be an int or None; got {type(max_packed_length).__name__}")
        if not args.padding_free:
            raise ValueError(f"max_packed_length applies to padding_free=True; got {max_packed_length} with "
                             "padding_free=False")
        if max_packed_length < (args.max_length or 1):
            raise ValueError(f"max_packed_length must be >= max_length ({args.max_length}), as a sequence is never "
                             f"split across packed rows; got {max_packed_length}")


def _check_sharding(deepspeed: bool, fsdp_version: int | None) -> None:
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


def _check_weak_batch(num_weak: int, batch_size: int, what: str) -> None:
    if num_weak > batch_size - 1:
        raise ValueError(
            f"num_weak = {num_weak} weak negatives per prompt are borrowed from the other rows of the batch, so they "
            f"need {what} >= num_weak + 1 = {num_weak + 1}; got {batch_size}: lower num_weak or raise {what}"
        )


@dataclass
class EPAConfig(DPOConfig):
    r"""TRL's DPOConfig with EPA's fields; ``loss_type`` also takes ``"epa"``.

    Parameters (besides DPOConfig's):
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
            sequences packed into rows without padding (module docstring), for attention
            implementations sdpa, eager, flex_attention, flash_attention_2/3.
        max_packed_length (`int`, *optional*): with padding_free, the most tokens in a packed row,
            >= max_length (attention's cost grows with its square). None: 2 x max_length (with
            max_length None: 2 x the batch's longest sequence); flash attention packs one row.
    """

    num_weak: int = field(default=0, metadata={"help": "EPA: weak negatives per prompt, from other rows of the batch."})
    weak_weight: float = field(default=1.0, metadata={"help": "EPA: weight alpha >= 0 of each weak negative."})
    num_strong: int | None = field(
        default=None,
        metadata={"help": "EPA: strong negatives (rejected answers) per prompt; None: the most any training row has."},
    )
    weak_correction: str = field(
        default="none",
        metadata={"help": "EPA: 'importance' weights each weak negative by pi_ref(y|x) / q(y) (docs/losses.md)."},
    )
    weak_correction_prompts: int = field(
        default=8, metadata={"help": "EPA: prompts S of the per-answer estimate of q (S - 1 from the batch)."})
    weak_source: str = field(
        default="any", metadata={"help": "EPA: weak negatives borrow another row's chosen or first rejected answer "
                                         "('any') or only its first rejected one ('rejected')."})
    token_metrics: bool = field(
        default=False,
        metadata={"help": "Log entropy and mean_token_accuracy (one more no-grad lm_head pass per step)."},
    )
    max_packed_length: int | None = field(
        default=None,
        metadata={"help": "With padding_free: most tokens in a packed row (default: 2 x max_length)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_config(self)


def _has_answer_lists(example: dict) -> bool:
    """True when ``rejected`` holds several answers (a list of strings or of message lists)."""
    rejected = example["rejected"]
    return isinstance(rejected, list) and (not rejected or isinstance(rejected[0], (str, list)))


@dataclass
class EPADataCollator(DataCollatorForPreference):
    """Candidate-major batches for EPA from rows with ``prompt_ids``, ``chosen_ids`` and
    ``rejected_ids`` (a list of token lists).

    For B rows and C = 1 + K + M candidates, row ``c * B + b`` of ``input_ids`` [C*B, T] is
    prompt b followed by candidate c: c = 0 the chosen answer, 1..K the rejected answers (absent
    ones are the bare prompt, False in ``candidate_mask``), K+1..K+M weak negatives: the chosen
    (k = 0) or first rejected (k = 1; the chosen one if the row has none) answer of row j != b of
    this batch, for ``(j, k) = weak_negative_sources(B, M, seed, weak_source)[b]``. Each sequence
    is truncated and padded as TRL's DataCollatorForPreference does. Returns input_ids, attention_mask,
    completion_mask [C*B, T], candidate_mask [B, C] and, when the rows carry precomputed reference
    log-probs, ref_chosen_logps [B] and ref_rejected_logps [B, K] (0 for absent answers).

    With weak_correction_prompts = S > 0 (weak_correction="importance"), also the sequences that
    score each weak answer under S - 1 other prompts of the batch (rows other than its own, drawn
    from the seed and the row positions): weak_prompts_{input_ids,attention_mask,completion_mask}
    [B*M*(S-1), T'] in (b, m, s) order, and weak_source_index [B, M]: where the weak answer's
    own sequence (row j's chosen or first rejected answer) is in the candidate-major rows.
    """

    num_strong: int = 1
    num_weak: int = 0
    seed: int = 0
    weak_correction_prompts: int = 0
    weak_source: str = "any"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch, num_strong = len(examples), self.num_strong
        _check_weak_batch(self.num_weak, batch, "every batch (its number of rows)")
        rejected = [example["rejected_ids"][:num_strong] for example in examples]
        candidates = [[example["chosen_ids"], *answers, *[None] * (num_strong - len(answers))]
                      for example, answers in zip(examples, rejected)]
        weak_sources = weak_negative_sources(batch, self.num_weak, self.seed, self.weak_source) if self.num_weak else []
        for b, sources in enumerate(weak_sources):
            candidates[b] += [rejected[j][0] if k == 1 and rejected[j] else examples[j]["chosen_ids"]
                              for j, k in sources]
        num_candidates = len(candidates[0])
        sequences, masks = [], []
        for c in range(num_candidates):
            for example, answers in zip(examples, candidates):
                answer = answers[c] or []
                sequences.append(example["prompt_ids"] + answer)
                masks.append([0] * len(example["prompt_ids"]) + [1] * len(answer))
        output = {**self._padded(sequences, masks),
                  "candidate_mask": torch.tensor([[answer is not None for answer in answers] for answers in candidates])}
        if self.weak_correction_prompts and weak_sources:
            rows, masks, own = [], [], []
            for b, sources in enumerate(weak_sources):
                for m, (j, k) in enumerate(sources):
                    answer = candidates[b][1 + num_strong + m]
                    own.append((1 if k == 1 and rejected[j] else 0) * batch + j)
                    rng = random.Random(f"weak-correction/{self.seed}/{b}/{m}")
                    for other in other_prompts(batch, j, self.weak_correction_prompts - 1, rng):
                        rows.append(examples[other]["prompt_ids"] + answer)
                        masks.append([0] * len(examples[other]["prompt_ids"]) + [1] * len(answer))
            output.update({f"weak_prompts_{key}": value for key, value in self._padded(rows, masks).items()})
            output["weak_source_index"] = torch.tensor(own).view(batch, self.num_weak)
        if "ref_chosen_logps" in examples[0]:
            output["ref_chosen_logps"] = torch.tensor([example["ref_chosen_logps"] for example in examples])
            output["ref_rejected_logps"] = torch.tensor(
                [(list(example["ref_rejected_logps"]) + [0.0] * num_strong)[:num_strong] for example in examples])
        return output

    def _padded(self, sequences: list[list[int]], masks: list[list[int]]) -> dict[str, Tensor]:
        """input_ids, attention_mask, completion_mask of (prompt + answer) sequences and their
        answer masks, truncated and right-padded as TRL's DataCollatorForPreference does."""
        if self.max_length is not None:
            keep = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            sequences, masks = [s[keep] for s in sequences], [m[keep] for m in masks]

        def padded(rows: list[list[int]], value: int) -> Tensor:
            return pad([torch.tensor(r, dtype=torch.long) for r in rows], padding_value=value, padding_side="right",
                       pad_to_multiple_of=self.pad_to_multiple_of)

        return {"input_ids": padded(sequences, self.pad_token_id),
                "attention_mask": padded([[1] * len(s) for s in sequences], 0), "completion_mask": padded(masks, 0)}


class EPATrainer(DPOTrainer):
    """TRL's DPOTrainer whose loss and log-probs come from epa_ext's fused-linear path; takes the
    same arguments. ``args`` is an EPAConfig (a plain DPOConfig works too, checked the same way).

    Raises (before any model is loaded or trained): ValueError for a loss type or field epa_ext
    does not implement, data without rejected answers, a model whose log-probs the fused path
    cannot compute exactly (``epa_ext.causal_lm.check``), or weak negatives a batch cannot
    supply; TypeError for a vision processor. Logit softcaps (Gemma-2/3) and scales (Cohere,
    Granite, ...) are computed exactly; an MoE model's router loss is added as TRL adds it.
    """

    _tag_names = ["trl", "dpo", "epa_ext"]

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = EPAConfig(f"{name.split('/')[-1]}-EPA")
        if not isinstance(args, DPOConfig):
            raise TypeError(f"args must be an EPAConfig (or a trl.DPOConfig); got {type(args).__name__}")
        if not isinstance(args, EPAConfig):  # an EPAConfig was checked when it was made
            check_config(args)
        weights = dict(zip(args.loss_type, args.loss_weights or [1.0] * len(args.loss_type)))
        self._loss_type = next(t for t in args.loss_type if t != "sft")
        # TRL's w * loss + w_sft * NLL as w * (loss + sft_weight * NLL)
        self._loss_weight = float(weights[self._loss_type])
        self._sft_weight = float(weights.get("sft", 0.0)) / self._loss_weight
        self._num_weak = getattr(args, "num_weak", 0)
        self._weak_weight = float(getattr(args, "weak_weight", 1.0))
        self._num_strong = getattr(args, "num_strong", None)
        self._token_metrics = getattr(args, "token_metrics", False)
        corrected = getattr(args, "weak_correction", "none") == "importance"
        self._weak_correction_prompts = getattr(args, "weak_correction_prompts", 8) if corrected else 0
        if corrected and not isinstance(train_dataset, Dataset):
            raise ValueError("weak_correction='importance' weighs the batch's prompts by the training set's size N "
                             "(q = the mean over its N prompts), which an IterableDataset does not have: pass a Dataset")
        self._num_examples = len(train_dataset) if corrected else 0
        if isinstance(processing_class, ProcessorMixin):
            raise TypeError("EPATrainer takes text models with a tokenizer as processing_class; vision-language "
                            "processors are not supported: use trl.DPOTrainer")
        if self._loss_type == "epa" and data_collator is not None:
            raise ValueError("loss_type='epa' builds its own candidate-major batches (EPADataCollator); leave "
                             "data_collator None")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        for name, dataset in _named_datasets(train_dataset, eval_dataset):
            self._check_preference_data(dataset, name)
        if eval_dataset is not None:
            _check_weak_batch(self._num_weak, args.per_device_eval_batch_size, "per_device_eval_batch_size")
        if not isinstance(model, str):
            causal_lm.check(model)
        if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
            raise ValueError("prompt-learning PEFT methods (prefix/prompt tuning) prepend virtual tokens that "
                             "EPATrainer does not account for: use LoRA-style adapters, or trl.DPOTrainer")
        if args.precompute_ref_log_probs and self._num_weak and ref_model is None and peft_config is None \
                and not (not isinstance(model, str) and is_peft_model(model)):
            raise ValueError(
                "precompute_ref_log_probs=True with num_weak > 0: weak negatives are paired within each batch, so "
                "their reference log-probs are computed during training, which needs a reference then; with full "
                "fine-tuning and precomputed log-probs there is none. Pass ref_model, train a PEFT adapter (the "
                "reference is the model with adapters disabled), or set precompute_ref_log_probs=False"
            )
        padding_free = args.padding_free
        args.padding_free = False  # TRL's DPOTrainer would warn that it turns it off; this subclass honours it
        try:
            super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                             train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                             compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                             quantization_config=quantization_config, peft_config=peft_config)
        finally:
            args.padding_free = padding_free
        causal_lm.check(self.model)
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)  # `accelerate launch`'s own config
        _check_sharding(self.is_deepspeed_enabled,
                        getattr(fsdp_plugin, "fsdp_version", 1) if self.is_fsdp_enabled else None)
        self.padding_free = padding_free
        if padding_free:
            for name, scorer in (("model", self.model), ("ref_model", self.ref_model)):
                if scorer is not None:
                    try:
                        check_packed_attention(scorer, causal_lm.logit_transform(scorer), max_length=args.max_length,
                                               max_row_tokens=getattr(args, "max_packed_length", None),
                                               router_logits=self.aux_loss_enabled and name == "model")
                    except ValueError as error:
                        raise ValueError(f"padding_free=True: {name}: {error}") from None
        if self._is_vlm:
            raise TypeError("EPATrainer takes text models with a tokenizer; this model's processing class is a "
                            "vision-language processor: use trl.DPOTrainer")
        self._check_short_last_batch(self.train_dataset, args.per_device_train_batch_size, args, "training set")
        for name, dataset in _named_datasets(None, self.eval_dataset):
            self._check_short_last_batch(dataset, args.per_device_eval_batch_size, args, name)
        self._use_epa_collator()

    # --- data --------------------------------------------------------------------------------------

    def _check_preference_data(self, dataset: Dataset | IterableDataset, name: str) -> None:
        first = next(iter(dataset))
        if "image" in first or "images" in first:
            raise ValueError(f"{name} holds images; EPATrainer trains text models only: use trl.DPOTrainer")
        missing = [column for column in ("chosen", "rejected") if column not in first]
        if "prompt_ids" not in first and missing:
            raise ValueError(
                f"{name} has no {' or '.join(repr(m) for m in missing)} column (columns: {sorted(first)}): preference "
                "training needs a chosen and at least one rejected answer per prompt (columns prompt/chosen/rejected, "
                "or chosen/rejected with the prompt implicit in both)"
            )
        if "rejected" in first and _has_answer_lists(first) and self._loss_type != "epa":
            raise ValueError(
                f"{name}'s 'rejected' holds a list of answers per row; loss_type={self._loss_type!r} takes one. "
                "Use loss_type='epa' (every rejected answer a strong negative), or keep one answer per row"
            )

    def _check_short_last_batch(self, dataset, batch_size: int, args: DPOConfig, name: str) -> None:
        """Weak negatives need num_weak + 1 rows in every batch, the last one included."""
        if not self._num_weak or args.dataloader_drop_last or not isinstance(dataset, Dataset):
            return
        rows = len(dataset) % (batch_size * max(args.world_size, 1))
        if 0 < rows <= self._num_weak:
            raise ValueError(
                f"the {name}'s {len(dataset)} rows leave a last batch of {rows}, too few for num_weak = "
                f"{self._num_weak} weak negatives from other rows: set dataloader_drop_last=True, or change "
                "per_device_train_batch_size"
            )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """TRL's preparation, and for loss_type="epa" rows whose ``rejected`` is a list of answers
        (tokenized the same way, every answer against the same prompt); EPA rows end with
        rejected_ids as a list of token lists."""
        first = next(iter(dataset))
        if "rejected" in first and _has_answer_lists(first):
            dataset = self._prepare_answer_lists(dataset, processing_class, args, dataset_name)
        else:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self._loss_type != "epa":
            return dataset
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        num_strong = self._num_strong

        def as_answer_lists(example):
            answers = example["rejected_ids"]
            answers = answers if answers and isinstance(answers[0], list) else [answers]
            return {"rejected_ids": answers if num_strong is None else answers[:num_strong]}

        with global_then_local_main_first():
            dataset = dataset.map(as_answer_lists, **map_kwargs)
        if dataset_name == "train" and self._num_strong is None:
            if not isinstance(dataset, Dataset):
                raise ValueError("loss_type='epa' on an IterableDataset needs num_strong (the number of rejected "
                                 "answers per prompt), as the largest one cannot be read in advance")
            self._num_strong = max(len(answers) for answers in dataset["rejected_ids"])
            if self._num_strong == 0:
                raise ValueError("the training set has no rejected answers (every 'rejected' list is empty): EPA "
                                 "needs at least one strong negative")
        return dataset

    def _prepare_answer_lists(self, dataset, processing_class, args, dataset_name):
        """TRL 1.16's ``_prepare_dataset`` (implicit prompt, EOS, tokenization, dropping rows whose
        prompt fills max_length) for rows with a list of rejected answers."""
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
        eos = self._tokenizer.eos_token

        def prepare(example):
            chosen, rejected = example["chosen"], example["rejected"]
            if "prompt" in example:
                prompt = example["prompt"]
            else:
                if not rejected:
                    raise ValueError(f"{dataset_name} has a row with an implicit prompt and no rejected answer: the "
                                     "prompt is what chosen and rejected share, so it cannot be found")
                shared = min(len(extract_prompt({"chosen": chosen, "rejected": r})["prompt"]) for r in rejected)
                prompt, chosen, rejected = chosen[:shared], chosen[shared:], [r[shared:] for r in rejected]
            conversational = is_conversational({"prompt": prompt}) if prompt else is_conversational({"chosen": chosen})
            answers = [chosen, *rejected]
            tools = example.get("tools")
            template_kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})} if conversational else {}
            if conversational:
                prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **template_kwargs)
                full = [_tokenize(processing_class, prompt + a, **template_kwargs)["input_ids"] for a in answers]
            else:
                answers = [a if a.endswith(eos) else a + eos for a in answers]
                prompt_ids = _tokenize(processing_class, prompt)
                full = [_tokenize(processing_class, prompt + a)["input_ids"] for a in answers]
            prompt_ids = prompt_ids["input_ids"]
            prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full)
            return {"prompt_ids": prompt_ids[:prompt_len], "chosen_ids": full[0][prompt_len:],
                    "rejected_ids": [ids[prompt_len:] for ids in full[1:]]}

        with global_then_local_main_first():
            dataset = dataset.map(prepare, **map_kwargs)
            if args.max_length is not None and args.truncation_mode == "keep_start":
                dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length, **map_kwargs)
        return dataset

    def _use_epa_collator(self) -> None:
        """For loss_type="epa", replaces TRL's default collator by an EPADataCollator with its
        padding and truncation settings (called before the reference log-probs are precomputed)."""
        if self._loss_type != "epa" or isinstance(self.data_collator, EPADataCollator):
            return
        base = self.data_collator
        self.data_collator = EPADataCollator(
            pad_token_id=base.pad_token_id, max_length=base.max_length, truncation_mode=base.truncation_mode,
            pad_to_multiple_of=base.pad_to_multiple_of, num_strong=self._num_strong, num_weak=self._num_weak,
            seed=self.args.seed, weak_correction_prompts=self._weak_correction_prompts,
            weak_source=getattr(self.args, "weak_source", "any"))

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precomputation through ``compute_ref_log_probs`` below, cached apart from TRL's own
        (the cache key adds epa_ext and K), without weak negatives (they depend on the batch)."""
        self._use_epa_collator()
        collator, model_hash = self.data_collator, self._precompute_model_hash
        weak = getattr(collator, "num_weak", 0)
        self._precompute_model_hash = Hasher.hash((model_hash, "epa_ext", self._loss_type, self._num_strong))
        if weak:
            collator.num_weak = 0
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = model_hash
            if weak:
                collator.num_weak = weak

    # --- log-probs -------------------------------------------------------------------------------

    def _reference_scorer(self, model: nn.Module | None = None):
        """(the model that scores the reference, the context that makes it the reference)."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = "ref" if "ref" in unwrapped.peft_config else None
            return model or self.model, use_adapter(unwrapped, adapter_name=adapter)
        return model or self.ref_model, contextlib.nullcontext()

    def _reference_logps(self, scorer: nn.Module, adapter_context, model_kwargs: dict, labels: Tensor) -> Tensor:
        """[R] summed reference log-probs of the rows of model_kwargs / labels (no graph)."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter_context:
            logps, _ = self._through_batch(
                scorer, model_kwargs,
                lambda head: linear_sequence_logps(head.hidden, head.weight, labels, **head.as_kwargs()))
            return logps.float()

    def _through_batch(self, model: nn.Module, model_kwargs: dict, consume, *, router_logits: bool = False):
        """``causal_lm.through_model`` of the padded batch, or with padding_free of its sequences
        packed into rows (``packing.pack``), consume given the hidden states in the padded layout:
        (consume's result, the router loss or None)."""
        transform = causal_lm.logit_transform(model)
        if not self.padding_free:
            return causal_lm.through_model(model, transform, consume, router_logits=router_logits, **model_kwargs)
        extra = sorted(set(model_kwargs) - {"input_ids", "attention_mask"})
        if extra:
            raise ValueError(f"padding_free=True packs input_ids and attention_mask only; this batch also has {extra}: "
                             "use padding_free=False")
        input_ids, attention_mask = model_kwargs["input_ids"], model_kwargs["attention_mask"]
        bound = getattr(self.args, "max_packed_length", None) or PACKED_ROW_LENGTHS * (self.args.max_length
                                                                                        or input_ids.shape[1])
        pad_id = self._tokenizer.pad_token_id  # fills the rows' free tails, which no real token attends
        packed = pack(input_ids, attention_mask, row_bound(attn_implementation(model), bound),
                      0 if pad_id is None else pad_id)
        return through_packed_model(model, transform, packed, consume, router_logits=router_logits), None

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one collated batch, for TRL's precomputation: ([B], [B]) for DPO
        loss types, ([B], [B, K]) for EPA (0 for absent answers). Sums over each answer's tokens,
        as TRL stores them (IPO's length averaging happens in the loss)."""
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        scorer, adapter_context = self._reference_scorer(model)
        with self.accelerator.autocast():
            ref = self._reference_logps(scorer, adapter_context, _model_inputs(inputs), labels)
        if "candidate_mask" not in inputs:
            return ref.chunk(2, dim=0)
        present = inputs["candidate_mask"]
        batch = present.shape[0]
        return ref[:batch], ref[batch:].view(-1, batch).T.masked_fill(~present[:, 1:], 0.0)

    def _all_reference_logps(self, inputs: dict, model_kwargs: dict, labels: Tensor, batch: int) -> Tensor:
        """[C*B] reference log-probs: precomputed ones from the batch, the rest (weak negatives, or
        everything without precomputation) scored now."""
        rows = labels.shape[0]
        known = labels.new_empty(0, dtype=torch.float32)
        if self.precompute_ref_logps:
            rejected = inputs["ref_rejected_logps"]
            rejected = rejected.T.reshape(-1) if rejected.dim() == 2 else rejected
            known = torch.cat([inputs["ref_chosen_logps"], rejected]).float()
            if known.numel() == rows:
                return known
        start = known.numel()
        rest = {k: v[start:] if isinstance(v, Tensor) and v.shape[:1] == (rows,) else v for k, v in model_kwargs.items()}
        scorer, adapter_context = self._reference_scorer()
        return torch.cat([known, self._reference_logps(scorer, adapter_context, rest, labels[start:])])

    @torch.no_grad()
    def _weak_log_weights(self, inputs: dict, ref: Tensor, candidate_mask: Tensor) -> Tensor:
        """[B, C] log importance weights: 0 on the chosen and strong columns, log mu(y~|x_b) -
        log q^(y~) on the weak ones (epa_ext.train.weak_correction's estimate, with the batch's
        other prompts as the S - 1 draws and N the training set's size)."""
        batch, num_candidates = candidate_mask.shape
        extra = {"input_ids": inputs["weak_prompts_input_ids"], "attention_mask": inputs["weak_prompts_attention_mask"]}
        labels = completion_labels(extra["input_ids"], inputs["weak_prompts_completion_mask"])
        scorer, adapter_context = self._reference_scorer()
        with self.accelerator.autocast():
            others = self._reference_logps(scorer, adapter_context, extra, labels)
        others = others.view(batch, self._num_weak, self._weak_correction_prompts - 1)
        by_prompt = ref.view(num_candidates, batch).T  # [B, C]
        log_q = estimated_log_q(ref[inputs["weak_source_index"]], others, self._num_examples)
        log_weights = torch.zeros_like(by_prompt)
        log_weights[:, 1 + self._num_strong:] = by_prompt[:, 1 + self._num_strong:] - log_q
        return log_weights

    # --- loss --------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss of one collated batch, and TRL's metrics (num_items_in_batch is ignored, as by
        TRL's DPOTrainer: the loss is a mean over prompts)."""
        mode = "train" if self.model.training else "eval"
        input_ids, completion_mask = inputs["input_ids"], inputs["completion_mask"]
        candidate_mask = inputs.get("candidate_mask")
        if candidate_mask is None:
            candidate_mask = torch.ones(input_ids.shape[0] // 2, 2, dtype=torch.bool, device=input_ids.device)
        batch, num_candidates = candidate_mask.shape
        labels = completion_labels(input_ids, completion_mask)
        model_kwargs = _model_inputs(inputs)
        ref = self._all_reference_logps(inputs, model_kwargs, labels, batch)
        log_weights = self._weak_log_weights(inputs, ref, candidate_mask) if "weak_source_index" in inputs else None

        def loss_and_statistics(head: causal_lm.HeadInputs):
            """In the lm_head's forward hook, where its weight is whole (causal_lm.through_model)."""
            if self._loss_type == "epa":
                loss, policy = fused_linear_epa_loss(
                    head.hidden, head.weight, labels, ref, **head.as_kwargs(), num_candidates=num_candidates,
                    beta=self.beta, num_strong=self._num_strong, weak_weight=self._weak_weight, mask=candidate_mask,
                    sft_weight=self._sft_weight, log_weights=log_weights)
            else:
                loss, policy = self._dpo_loss(head, labels, ref, completion_mask)
            return loss, policy.detach(), self._token_statistics(head, labels)

        (loss, policy, statistics), aux_loss = self._through_batch(model, model_kwargs, loss_and_statistics,
                                                                   router_logits=self.aux_loss_enabled)
        loss = loss * self._loss_weight
        if self.aux_loss_enabled:  # as TRL 1.16's DPOTrainer adds and logs it
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_metrics(mode, inputs, statistics, labels, policy, ref, candidate_mask)
        if log_weights is not None:
            weak = self.accelerator.gather(log_weights[:, 1 + self._num_strong:]).float()
            self._metrics[mode]["weak/log_weight"].append(weak.mean().item())
            self._metrics[mode]["weak/log_weight_std"].append(weak.std(unbiased=False).item())
        if return_outputs:
            warnings.warn("`return_outputs=True` (logits for compute_metrics) is deprecated in TRL and costs an extra "
                          "forward pass that forms the logits", FutureWarning, stacklevel=2)
            with torch.no_grad():
                return loss, model(**model_kwargs)
        return loss

    def _dpo_loss(self, head: causal_lm.HeadInputs, labels, ref, completion_mask) -> tuple[Tensor, Tensor]:
        """TRL's DPO loss types (and its "sft" term); IPO on log-probs averaged over each answer's
        tokens, policy and (summed) reference alike, as TRL does. Returns (loss, policy log-probs
        summed per sequence)."""
        ipo = self._loss_type == "ipo"
        if ipo and bool(completion_mask[:, 0].any()):
            raise ValueError(
                "loss_type='ipo' with an empty tokenized prompt: the first answer token has no position that "
                "predicts it, and TRL divides by a token count that includes it while epa_ext averages over the "
                "scored tokens; give every row a prompt (or a BOS token)")
        label_smoothing = self.label_smoothing if self._loss_type == "robust" else 0.0
        loss, policy = fused_linear_dpo_loss(head.hidden, head.weight, labels, ref, **head.as_kwargs(), beta=self.beta,
                                             loss_type=self._loss_type, label_smoothing=label_smoothing,
                                             sft_weight=self._sft_weight)
        return loss, policy * (labels != IGNORE_INDEX).sum(-1) if ipo else policy

    # --- metrics -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _token_statistics(self, head: causal_lm.HeadInputs, labels: Tensor) -> dict[str, Tensor]:
        """Per kept token (labels' row-major order): its mean logit over the vocabulary and, with
        token_metrics, the entropy of its distribution and whether the label is its argmax."""
        kept = labels != IGNORE_INDEX
        weight, bias = head.weight.detach(), None if head.bias is None else head.bias.detach()
        kept_hidden = head.hidden.detach()[kept]
        statistics = {"mean_logits": causal_lm.mean_logits(kept_hidden, weight, bias, head.softcap)}
        if self._token_metrics:
            statistics["entropy"], statistics["top1"] = _token_statistics(kept_hidden, weight, bias, labels[kept],
                                                                          head.softcap)
        return statistics

    def _log_metrics(self, mode: str, inputs: dict, statistics: dict[str, Tensor], labels: Tensor, policy: Tensor,
                     ref: Tensor, candidate_mask: Tensor) -> None:
        """TRL's metrics (gathered over processes), and EPA's rewards/weak."""
        batch, num_candidates = candidate_mask.shape
        num_strong = self._num_strong if self._loss_type == "epa" else 1
        gather = self.accelerator.gather
        per_prompt = {"policy": policy.view(num_candidates, batch).T, "ref": ref.view(num_candidates, batch).T}
        metrics = preference_metrics(gather(per_prompt["policy"]), gather(per_prompt["ref"]), beta=self.beta,
                                     num_strong=num_strong, mask=gather(candidate_mask))
        store = self._metrics[mode]
        candidate = (labels != IGNORE_INDEX).nonzero()[:, 0] // batch
        chosen_tokens = candidate == 0
        rejected_tokens = (candidate >= 1) & (candidate <= num_strong)
        if self._token_metrics:
            entropy = statistics["entropy"]
            store["entropy"].append(_gathered_ratio(gather, entropy.sum(), entropy.numel()))
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        store["num_tokens"] = [self._total_train_tokens]
        mean_logits = statistics["mean_logits"]
        store["logits/chosen"].append(_gathered_ratio(gather, mean_logits[chosen_tokens].sum(), chosen_tokens.sum()))
        store["logits/rejected"].append(_gathered_ratio(gather, mean_logits[rejected_tokens].sum(),
                                                        rejected_tokens.sum()))
        if self._token_metrics:
            store["mean_token_accuracy"].append(_gathered_ratio(gather, statistics["top1"][chosen_tokens].sum(),
                                                                chosen_tokens.sum()))
        for key, value in metrics.items():
            store[key].append(value.item())


def _named_datasets(train_dataset, eval_dataset):
    if train_dataset is not None:
        yield "train_dataset", train_dataset
    if isinstance(eval_dataset, dict):
        yield from ((f"eval_dataset[{key!r}]", dataset) for key, dataset in eval_dataset.items())
    elif eval_dataset is not None:
        yield "eval_dataset", eval_dataset


def _model_inputs(inputs: dict) -> dict:
    return {key: value for key, value in inputs.items() if key not in _NON_MODEL_KEYS}


def _token_statistics(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                      softcap: float | None) -> tuple[Tensor, Tensor]:
    """Per kept token: the entropy of the next-token distribution and whether the label is its
    first argmax (of the model's own logits, softcap included), in chunks of about H tokens."""
    entropies, top1 = [], []
    for start, logits in causal_lm.logit_chunks(hidden, weight, bias, softcap):
        log_probs = logits.log_softmax(-1)
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
        top1.append(logits.argmax(-1) == labels[start:start + logits.shape[0]])
    empty = hidden.new_empty(0, dtype=torch.float32)
    return (torch.cat(entropies) if entropies else empty,
            torch.cat(top1) if top1 else empty.bool())


def _gathered_ratio(gather, total: Tensor, count: Tensor | int) -> float:
    """sum over processes of total / sum of count (0 when there is nothing to count), as TRL."""
    device = total.device
    total = gather(total.float().reshape(1)).sum().item()
    count = gather(torch.as_tensor(count, device=device).float().reshape(1)).sum().item()
    return total / count if count > 0 else 0.0
