"""Models for epa-train: loading a causal LM (or building the tiny one), its reference, and the
module that turns a batch into sequence log-probs and the loss through epa_ext's fused linear
path, so the batch's [rows, T, V] logits are never formed."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..fused import fused_linear_dpo_loss, fused_linear_epa_loss
from ..linear import linear_sequence_logps


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on texts (offline), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_model(vocab_size: int, hidden_size: int, layers: int, max_positions: int, seed: int):
    """A small randomly initialized Llama-architecture causal LM (tied embeddings), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=max(hidden_size // 16, 1),
                         num_key_value_heads=max(hidden_size // 32, 1), max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(causal_lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the transformer body that returns last_hidden_state, the lm_head Linear)."""
    base = unwrap(causal_lm)
    return base.base_model, base.get_output_embeddings()


def score_hidden(causal_lm: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Final hidden states [R, T, H] and the lm_head's weight and bias, in one dtype (autocast's,
    when active) so the fused linear op can take them."""
    decoder, head = decoder_and_head(causal_lm)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return hidden, weight, bias


@torch.no_grad()
def reference_logps(causal_lm: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
    """[R] summed sequence log-probs under a model that is not trained (no graph is kept); the fused
    losses average them themselves where the loss needs it (IPO)."""
    hidden, weight, bias = score_hidden(causal_lm, input_ids, attention_mask)
    return linear_sequence_logps(hidden, weight, labels, bias=bias).float()


class PreferenceLoss(nn.Module):
    """The policy and its loss in one module, so DDP/FSDP see every parameter used in forward
    (the lm_head's weight is read by the fused linear loss, not by a forward call of its own).

    forward(input_ids [C*B, T], attention_mask, labels, ref_logps [C*B], candidate_mask [B, C])
    returns (loss, policy_seq_logps [C*B]).
    """

    def __init__(self, policy: nn.Module, *, loss: str, beta: float, dpo_loss_type: str, label_smoothing: float,
                 num_strong: int, weak_weight: float):
        super().__init__()
        self.policy = policy
        self.loss, self.beta, self.dpo_loss_type = loss, beta, dpo_loss_type
        self.label_smoothing, self.num_strong, self.weak_weight = label_smoothing, num_strong, weak_weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, ref_logps: Tensor,
                candidate_mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden, weight, bias = score_hidden(self.policy, input_ids, attention_mask)
        if self.loss == "dpo":
            return fused_linear_dpo_loss(hidden, weight, labels, ref_logps, bias=bias, beta=self.beta,
                                         loss_type=self.dpo_loss_type, label_smoothing=self.label_smoothing)
        return fused_linear_epa_loss(hidden, weight, labels, ref_logps, bias=bias,
                                     num_candidates=candidate_mask.shape[1], beta=self.beta,
                                     num_strong=self.num_strong, weak_weight=self.weak_weight,
                                     mask=candidate_mask)


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(unwrap(model)).eval()
    reference.requires_grad_(False)
    return reference
