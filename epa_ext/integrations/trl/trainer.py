"""EPATrainer: TRL 1.16's DPOTrainer whose log-probs and loss are the preference core's
(``epa_ext.preference``: candidate-major batches, padded or packed rows, the fused DPO/EPA
losses, the reference's log-probs, the importance weights); only the overrides TRL's trainer
needs are here (data preparation, the collator, reference precomputation, compute_loss)."""

from __future__ import annotations

import contextlib
import warnings

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from datasets.fingerprint import Hasher
from torch import Tensor, nn
from transformers import ProcessorMixin
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import global_then_local_main_first, use_adapter

from ... import causal_lm
from ..._kernel_contract import IGNORE_INDEX
from ...logps import completion_labels
from ...preference.loss import (LossSpec, fused_dpo_spec, pairwise_preference_loss, pairwise_reference_logps,
                                preference_loss, token_statistics)
from ...preference.pairwise import PairwiseSpec
from ...preference.options import MIN_SHARED_TOKEN_RATIO, PACKED_ROW_LENGTHS, check_weak_batch
from ...preference.packing import check_packed_attention
from ...preference.prefix import check_prefix_sharing, share, shared_attention, shared_token_ratio
from ...preference.scoring import packed_for, through_batch
from ...preference.weak_correction import estimated_log_q
from .config import EPAConfig, check_config, check_sharding, pairwise_spec
from .data import EPADataCollator, has_answer_lists, model_inputs, named_datasets, prepare_answer_lists
from .metrics import log_batch_metrics, log_weak_weights


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
        self._loss_type = next((t for t in args.loss_type if t != "sft"), "sft")
        # TRL's w * loss + w_sft * NLL as w * (loss + sft_weight * NLL) on the fused path (w > 0 there; _loss_spec)
        self._loss_weight = float(weights[self._loss_type])
        self._sft_weight = float(weights.get("sft", 0.0)) / self._loss_weight if self._loss_weight else 0.0
        # the loss's specs, read once (TRL's loss fields do not change while it trains): TRL's loss
        # types as the core's PairwiseSpec, and the fused DPO spec where that computes it exactly
        self._pairwise = None if self._loss_type == "epa" else pairwise_spec(args)
        self._fused_dpo = None if self._pairwise is None else fused_dpo_spec(self._pairwise)
        self._num_weak = getattr(args, "num_weak", 0)
        self._weak_weight = float(getattr(args, "weak_weight", 1.0))
        self._num_strong = getattr(args, "num_strong", None)
        self._token_metrics = getattr(args, "token_metrics", False)
        corrected = getattr(args, "weak_correction", "none") == "importance"
        self._weak_correction_prompts = getattr(args, "weak_correction_prompts", 8) if corrected else 0
        if corrected and not isinstance(train_dataset, Dataset):
            raise ValueError("weak_correction='importance' weighs the batch's prompts by the training set's size N "
                             "(q = the mean over its N prompts), which an IterableDataset does not have: pass a "
                             "Dataset")
        self._num_examples = len(train_dataset) if corrected else 0
        if isinstance(processing_class, ProcessorMixin):
            raise TypeError("EPATrainer takes text models with a tokenizer as processing_class; vision-language "
                            "processors are not supported: use trl.DPOTrainer")
        if self._loss_type == "epa" and data_collator is not None:
            raise ValueError("loss_type='epa' builds its own candidate-major batches (EPADataCollator); leave "
                             "data_collator None")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        for name, dataset in named_datasets(train_dataset, eval_dataset):
            self._check_preference_data(dataset, name)
        if eval_dataset is not None:
            check_weak_batch(self._num_weak, args.per_device_eval_batch_size, "per_device_eval_batch_size")
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
        # TRL precomputes reference log-probs inside its __init__, before the probe below: unshared
        self._shared_attention = None
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
        check_sharding(self.is_deepspeed_enabled,
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
        self._shared_attention = self._probe_prefix_sharing(getattr(args, "prefix_sharing", "off"))
        if self._is_vlm:
            raise TypeError("EPATrainer takes text models with a tokenizer; this model's processing class is a "
                            "vision-language processor: use trl.DPOTrainer")
        self._check_short_last_batch(self.train_dataset, args.per_device_train_batch_size, args, "training set")
        for name, dataset in named_datasets(None, self.eval_dataset):
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
        if "rejected" in first and has_answer_lists(first) and self._loss_type != "epa":
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
        if "rejected" in first and has_answer_lists(first):
            dataset = prepare_answer_lists(dataset, processing_class, args, dataset_name, self._tokenizer.eos_token)
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
        # ld_alpha changes the stored sums (LD-DPO's, as TRL stores them)
        self._precompute_model_hash = Hasher.hash((model_hash, "epa_ext", self._loss_type, self._num_strong,
                                                   self.args.ld_alpha))
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

    def _reference_logps(self, scorer: nn.Module, adapter_context, model_kwargs: dict, labels: Tensor,
                         groups: tuple[Tensor, int] | None = None) -> Tensor:
        """[R] summed reference log-probs of the rows of model_kwargs / labels (no graph; groups:
        ``_layout``'s); with ld_alpha (a pair batch) LD-DPO's weighted sums, as TRL computes them."""
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), adapter_context:
            return pairwise_reference_logps(scorer, causal_lm.logit_transform(scorer), labels=labels,
                                            ld_alpha=self.args.ld_alpha, **self._layout(scorer, model_kwargs, groups))

    def _probe_prefix_sharing(self, mode: str):
        """prefix_sharing "on" / "auto": the model's attention for prefix-shared rows
        (``prefix.shared_attention``) where the probe finds them exact on the model and the
        reference; "on" refuses a model that fails it, "auto" warns once and does not share."""
        if mode == "off":
            return None
        try:
            for name, scorer in (("model", self.model), ("ref_model", self.ref_model)):
                if scorer is not None:
                    check_prefix_sharing(scorer, causal_lm.logit_transform(scorer),
                                         router_logits=self.aux_loss_enabled and name == "model")
        except ValueError as error:
            if mode == "on":
                raise ValueError(f"prefix_sharing='on': {name}: {error}") from None
            warnings.warn(f"prefix_sharing='auto': not sharing prompts: {name}: {error}", stacklevel=3)
            return None
        return shared_attention(self.model)

    def _groups(self, inputs: dict) -> tuple[Tensor, int] | None:
        """(prompt lengths [B], C) of a whole candidate-major batch, for prefix sharing: each
        prompt's tokens before its chosen answer's first completion token."""
        if self._shared_attention is None:
            return None
        candidate_mask = inputs.get("candidate_mask")
        num_candidates = 2 if candidate_mask is None else candidate_mask.shape[1]
        batch = inputs["input_ids"].shape[0] // num_candidates
        before_answer = inputs["completion_mask"][:batch].cumsum(-1) == 0
        return (before_answer & inputs["attention_mask"][:batch].bool()).sum(-1), num_candidates

    def _layout(self, model: nn.Module, model_kwargs: dict, groups: tuple[Tensor, int] | None = None) -> dict:
        """through_batch's input_ids, attention_mask and packed of collated rows: with groups
        (``_groups``: a whole candidate-major batch) and prefix_sharing, the prompt-shared rows
        where the batch's token ratio makes it worth it ("auto": MIN_SHARED_TOKEN_RATIO); else, with
        padding_free, the sequences packed into rows (``scoring.packed_for``); else None."""
        extra = sorted(set(model_kwargs) - {"input_ids", "attention_mask"})
        if extra:  # a text model's collated batch has no other model input
            raise ValueError(f"EPATrainer scores input_ids and attention_mask; this batch also has {extra}"
                             + (": use padding_free=False" if self.padding_free else ""))
        input_ids, attention_mask = model_kwargs["input_ids"], model_kwargs["attention_mask"]
        packed = None
        bound = getattr(self.args, "max_packed_length", None) or PACKED_ROW_LENGTHS * (self.args.max_length
                                                                                        or input_ids.shape[1])
        if groups is not None:
            prompt_lengths, num_candidates = groups
            minimum = MIN_SHARED_TOKEN_RATIO if self.args.prefix_sharing == "auto" else 0.0
            if shared_token_ratio(attention_mask, prompt_lengths, num_candidates) >= minimum:
                packed = share(input_ids, attention_mask, prompt_lengths, num_candidates, bound,
                               self._tokenizer.pad_token_id or 0, attention=self._shared_attention)
        if packed is None and self.padding_free:
            packed = packed_for(model, input_ids, attention_mask, bound, self._tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "packed": packed}

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one collated batch, for TRL's precomputation: ([B], [B]) for DPO
        loss types, ([B], [B, K]) for EPA (0 for absent answers). Sums over each answer's tokens,
        as TRL stores them (IPO's length averaging happens in the loss; with ld_alpha LD-DPO's
        weighted sums, as TRL 1.16 stores those)."""
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        scorer, adapter_context = self._reference_scorer(model)
        with self.accelerator.autocast():
            ref = self._reference_logps(scorer, adapter_context, model_inputs(inputs), labels, self._groups(inputs))
        if "candidate_mask" not in inputs:
            return ref.chunk(2, dim=0)
        present = inputs["candidate_mask"]
        batch = present.shape[0]
        return ref[:batch], ref[batch:].view(-1, batch).T.masked_fill(~present[:, 1:], 0.0)

    def _all_reference_logps(self, inputs: dict, model_kwargs: dict, labels: Tensor) -> Tensor:
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
        rest = {k: v[start:] if isinstance(v, Tensor) and v.shape[:1] == (rows,) else v
                for k, v in model_kwargs.items()}
        scorer, adapter_context = self._reference_scorer()
        groups = self._groups(inputs) if start == 0 else None  # only a whole batch has its groups
        return torch.cat([known, self._reference_logps(scorer, adapter_context, rest, labels[start:], groups)])

    @torch.no_grad()
    def _weak_log_weights(self, inputs: dict, ref: Tensor, candidate_mask: Tensor) -> Tensor:
        """[B, C] log importance weights: 0 on the chosen and strong columns, log mu(y~|x_b) -
        log q^(y~) on the weak ones (epa_ext.preference.weak_correction's estimate, with the batch's
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
        labels = completion_labels(input_ids, completion_mask)
        model_kwargs = model_inputs(inputs)
        ref = self._all_reference_logps(inputs, model_kwargs, labels)
        log_weights = self._weak_log_weights(inputs, ref, candidate_mask) if "weak_source_index" in inputs else None
        spec = self._loss_spec(completion_mask)
        fused = isinstance(spec, LossSpec)

        def loss_and_statistics(head: causal_lm.HeadInputs):
            """In the lm_head's forward hook, where its weight is whole (causal_lm.through_model)."""
            if not fused:
                loss, policy = pairwise_preference_loss(head, labels, ref, spec, completion_mask.sum(-1))
                return loss, policy.detach(), token_statistics(head, labels, full=self._token_metrics)
            loss, policy = preference_loss(head, labels, ref, candidate_mask, spec, log_weights)
            if spec.loss == "dpo" and spec.dpo_loss_type == "ipo":  # TRL logs sums; IPO's loss took them averaged
                policy = policy * (labels != IGNORE_INDEX).sum(-1)
            return loss, policy.detach(), token_statistics(head, labels, full=self._token_metrics)

        (loss, policy, statistics), aux_loss = through_batch(
            model, causal_lm.logit_transform(model), loss_and_statistics,
            **self._layout(model, model_kwargs, self._groups(inputs)),
            router_logits=self.aux_loss_enabled)
        if fused:  # pairwise_preference_loss weighs its terms itself
            loss = loss * self._loss_weight
        store, gather = self._metrics[mode], self.accelerator.gather
        if self.aux_loss_enabled:  # as TRL 1.16's DPOTrainer adds and logs it
            loss = loss + self.router_aux_loss_coef * aux_loss
            store["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        store["num_tokens"] = [self._total_train_tokens]
        log_batch_metrics(store, gather, statistics, labels, policy, ref, candidate_mask, beta=self.beta,
                          num_strong=self._num_strong if self._loss_type == "epa" else 1)
        if log_weights is not None:
            log_weak_weights(store, gather, log_weights, self._num_strong)
        if return_outputs:
            warnings.warn("`return_outputs=True` (logits for compute_metrics) is deprecated in TRL and costs an extra "
                          "forward pass that forms the logits", FutureWarning, stacklevel=2)
            with torch.no_grad():
                return loss, model(**model_kwargs)
        return loss

    def _loss_spec(self, completion_mask: Tensor) -> LossSpec | PairwiseSpec:
        """The core's spec of this trainer's loss: EPA's LossSpec (w * (loss + sft_weight * NLL),
        TRL's w * loss + w_sft * NLL); for TRL's loss types the fused DPO LossSpec where it computes
        the loss exactly (``preference.loss.fused_dpo_spec``: one of sigmoid / robust / hinge / ipo,
        optionally with sft, weighted by _loss_weight), else the PairwiseSpec of the DPOConfig
        (``pairwise_preference_loss``: every other type, mixture, f-divergence, LD-DPO, WPO).
        IPO on the fused path averages over the scored tokens, TRL over the unshifted
        completion_mask, which counts one more where the prompt is empty: such a batch takes the
        pairwise path, which divides by TRL's count."""
        if self._loss_type == "epa":
            return LossSpec("epa", self.beta, num_strong=self._num_strong, weak_weight=self._weak_weight,
                            sft_weight=self._sft_weight)
        fused = self._fused_dpo
        if fused is None or (fused[0].dpo_loss_type == "ipo" and bool(completion_mask[:, 0].any())):
            return self._pairwise
        return fused[0]
