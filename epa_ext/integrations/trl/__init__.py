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
rows of the same batch (their chosen or first rejected answer, picked by the core's
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
implementations that do not keep packed sequences apart are refused (epa_ext.preference.packing).

The package: ``config`` (EPAConfig and its check), ``data`` (rows with several rejected answers,
the candidate-major collator), ``trainer`` (EPATrainer: only the overrides), ``metrics`` (TRL's
metric names). The batches, layouts, scoring and losses are the preference core's
(``epa_ext.preference``), shared with epa-train; nothing here imports ``epa_ext.train``.
"""

from __future__ import annotations

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

from .config import SUPPORTED_LOSS_TYPES, EPAConfig, check_config  # noqa: E402  (after the version check)
from .data import EPADataCollator  # noqa: E402
from .trainer import EPATrainer  # noqa: E402

__all__ = ["EPAConfig", "EPADataCollator", "EPATrainer", "SUPPORTED_LOSS_TYPES", "SUPPORTED_TRL_VERSIONS",
           "check_config"]
