"""What epa_ext's fused-linear losses need from a Hugging Face causal LM, for epa-train and the TRL
integration alike: the backbone's final hidden states, the lm_head's weight and bias, and what the
model's forward does between them and its logits, or a ValueError, before any step, naming the model
class and what it does that the fused path cannot compute.

Every transformers causal LM computes its logits as

    logits = logit_scale * (hidden_scale * h) W^T (+ b)        then, with a softcap c,  c * tanh(logits / c)

with the factors below, read off each class's ``forward`` in transformers' modeling_*.py (Cohere's
``logits * self.logit_scale``, Granite's ``logits / config.logits_scaling``, Gemma-2/3's
``final_logit_softcapping``, ...), or is refused (``REFUSED``). The scales are folded into the
hidden states and the bias (differentiable: the gradients reach both), the softcap goes to the
kernels. ``check`` then scores a short probe sequence both ways, through the model's own forward
and through this path, so a model whose logits are something else (a class not read here, remote
code) is refused instead of trained silently wrong.

Mixture-of-experts models: with ``config.output_router_logits`` the model's own forward returns
its router load-balancing loss (``outputs.aux_loss``); ``through_model`` returns it with the loss, and the trainers add ``router_aux_loss_coef`` times it to the loss, as TRL does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

# CausalLM class -> the factor its forward multiplies the logits by.
_LOGIT_SCALE: dict[str, Callable[[nn.Module], float]] = {
    **dict.fromkeys(("CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM"),
                    lambda m: m.logit_scale),
    **dict.fromkeys(("GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM",
                     "GraniteMoeSWAForCausalLM", "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM"),
                    lambda m: 1.0 / m.config.logits_scaling),
    "FalconH1ForCausalLM": lambda m: m.model.lm_head_multiplier,
    "HyperCLOVAXForCausalLM": lambda m: m.config.logits_scaling,
}
# CausalLM class -> the factor its forward multiplies the final hidden states by before the head.
_HIDDEN_SCALE: dict[str, Callable[[nn.Module], float]] = {
    "MiniCPM3ForCausalLM": lambda m: 1.0 / m.config.logits_scaling,
}
# CausalLM class -> its logit softcap (None: none).
_SOFTCAP: dict[str, Callable[[nn.Module], float | None]] = {
    **dict.fromkeys(("Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma4ForCausalLM",
                     "Gemma4UnifiedForCausalLM", "VaultGemmaForCausalLM", "BeamForCausalLM", "NanoChatForCausalLM"),
                    lambda m: m.config.final_logit_softcapping),
    "RecurrentGemmaForCausalLM": lambda m: m.config.logits_soft_cap,
    **dict.fromkeys(("Inkling2ForCausalLM", "Inkling2LoopForCausalLM"), lambda m: m.logit_softcap.softcap),
}
# CausalLM class -> what its forward does that the fused path does not compute.
REFUSED: dict[str, str] = {
    "InklingForCausalLM": "drops the logits of padded vocabulary entries (config.unpadded_vocab_size)",
    "ModernBertDecoderForCausalLM": "puts a prediction head (dense, activation, norm) between the backbone and the "
                                    "decoder projection",
    "ClvpForCausalLM": "normalizes the hidden states between the backbone and the lm_head",
    **dict.fromkeys(("Gemma4AssistantForCausalLM", "Gemma4UnifiedAssistantForCausalLM"),
                    "is a drafting head (ordered embeddings, projected states), not a language model to align"),
    **dict.fromkeys(("MusicgenForCausalLM", "MusicgenMelodyForCausalLM", "BarkCausalModel",
                     "CsmDepthDecoderForCausalLM"), "predicts audio codebooks with several heads"),
    "ProphetNetForCausalLM": "predicts n-gram streams",
    **dict.fromkeys(("BertLMHeadModel", "BigBirdForCausalLM", "CamembertForCausalLM", "Data2VecTextForCausalLM",
                     "ErnieForCausalLM", "MegatronBertForCausalLM", "RemBertForCausalLM", "RobertaForCausalLM",
                     "RobertaPreLayerNormForCausalLM", "RoCBertForCausalLM", "RoFormerForCausalLM",
                     "XLMRobertaForCausalLM", "XLMRobertaXLForCausalLM", "XmodForCausalLM", "ElectraForCausalLM"),
                    "puts a prediction head (dense, activation, norm) between its encoder and the decoder projection"),
}


def unwrap(model: nn.Module, *, keep_adapters: bool = False) -> nn.Module:
    """The transformers model inside DDP / accelerate wrappers and (unless keep_adapters) the PEFT
    wrapper. keep_adapters keeps the PEFT model, which saves the adapters and can disable them."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if not keep_adapters and hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


@dataclass(frozen=True)
class LogitTransform:
    """logits = logit_scale * (hidden_scale * h) W^T (+ b), then softcap (None: none)."""

    hidden_scale: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None


def logit_transform(model: nn.Module) -> LogitTransform:
    """The transform of this model's class, as its forward computes it. Raises ValueError for a
    refused class or a transform whose value the fused path cannot take (a non-finite scale)."""
    causal_lm = unwrap(model)
    name = type(causal_lm).__name__
    if name in REFUSED:
        raise ValueError(f"{name} {REFUSED[name]}, which epa_ext's fused log-probs do not compute: use a trainer "
                         "that forms the model's own logits (e.g. trl.DPOTrainer)")
    transform = LogitTransform(
        hidden_scale=float(_HIDDEN_SCALE[name](causal_lm)) if name in _HIDDEN_SCALE else 1.0,
        logit_scale=float(_LOGIT_SCALE[name](causal_lm)) if name in _LOGIT_SCALE else 1.0,
        softcap=_SOFTCAP[name](causal_lm) if name in _SOFTCAP else None)
    scale = transform.hidden_scale * transform.logit_scale
    if not (torch.isfinite(torch.tensor(scale)) and scale != 0):
        raise ValueError(f"{name} scales its logits by {scale} (config), which is not a finite non-zero number")
    if transform.softcap is not None and not 0 < float(transform.softcap) < float("inf"):
        raise ValueError(f"{name} has a logit softcap of {transform.softcap}; it must be a finite number > 0")
    return transform


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the transformer body whose output is the final hidden state, the lm_head). The decoder
    (``get_decoder``), not always the base model: OPT's forward calls its base model's decoder."""
    causal_lm = unwrap(model)
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    return decoder if isinstance(decoder, nn.Module) else causal_lm.base_model, causal_lm.get_output_embeddings()


@dataclass
class HeadInputs:
    """What fused_linear_*_loss and linear_sequence_logps take: hidden [R, T, H] (scales folded in),
    weight [V, H], bias [V] or None (logit scale folded in), softcap."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    softcap: float | None

    def as_kwargs(self) -> dict:
        return {"bias": self.bias, "softcap": self.softcap}


def head_inputs(hidden: Tensor, head: nn.Module, transform: LogitTransform) -> HeadInputs:
    """hidden, head.weight and head.bias in one dtype (autocast's when active, else the weight's),
    with the transform's scales folded into the hidden states and the bias."""
    weight, bias = head.weight, head.bias
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    scale = transform.hidden_scale * transform.logit_scale
    if scale != 1.0:
        hidden = hidden * scale
    if bias is not None and transform.logit_scale != 1.0:
        bias = bias * transform.logit_scale
    return HeadInputs(hidden, weight, bias, transform.softcap)


def through_model(model: nn.Module, transform: LogitTransform, consume: Callable[[HeadInputs], T], *,
                  router_logits: bool = False, **model_kwargs) -> tuple[T, Tensor | None]:
    """(consume(the batch's HeadInputs), the router load-balancing loss or None).

    The model's own forward runs (so DDP, FSDP and PEFT wrappers see the call), its head on one
    position only (logits_to_keep as a one-element index, which no backbone slices by); a forward
    hook on the backbone takes its last_hidden_state, and consume runs in a forward hook of the
    lm_head: inside the model's forward, where FSDP holds the head's parameters gathered whole (it
    may reshard them once the forward returns). The batch's [R, T, V] logits are never formed.
    router_logits: ask an MoE model for its router loss (outputs.aux_loss)."""
    backbone, head = backbone_and_head(model)
    captured, results = [], []

    def keep_hidden(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    def run_consume(module, _args, _output):
        (hidden,) = captured
        results.append(consume(head_inputs(hidden, module, transform)))

    if router_logits:
        model_kwargs["output_router_logits"] = True
    handles = [backbone.register_forward_hook(keep_hidden), head.register_forward_hook(run_consume)]
    try:
        device = model_kwargs["input_ids"].device
        outputs = model(**model_kwargs, use_cache=False, logits_to_keep=torch.zeros(1, dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    if len(results) != 1:
        raise ValueError(f"{type(unwrap(model)).__name__}'s forward called its backbone {len(captured)} and its lm_head "
                         f"{len(results)} time(s); the fused path needs exactly one call of each")
    return results[0], getattr(outputs, "aux_loss", None) if router_logits else None


def logit_chunks(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None):
    """(start, the fp32 logits of rows start.. of hidden [N, H], softcapped) in chunks of H rows,
    so a chunk's [H, V] logits take the memory of the lm_head: for metrics, without a graph."""
    rows = max(hidden.shape[-1], 1)
    for start in range(0, hidden.shape[0], rows):
        logits = (hidden[start:start + rows] @ weight.T).float()
        if bias is not None:
            logits += bias.float()
        yield start, logits if softcap is None else softcap * torch.tanh(logits / softcap)


@torch.no_grad()
def mean_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """[N] fp32: each row's mean logit over the vocabulary, the logits the model's forward gives
    (TRL's logits/chosen and logits/rejected). Without a softcap, the mean over v of h . w_v + b_v
    is h . mean_v(w_v) + mean_v(b_v): no logits formed; with one, in chunks (logit_chunks)."""
    hidden, weight = hidden.detach(), weight.detach()
    bias = None if bias is None else bias.detach()
    if softcap is not None:
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        for start, logits in logit_chunks(hidden, weight, bias, softcap):
            out[start:start + logits.shape[0]] = logits.mean(-1)
        return out
    means = hidden.float() @ weight.float().mean(0)
    return means + bias.float().mean() if bias is not None else means


def router_aux(model: nn.Module) -> tuple[bool, float]:
    """(whether the model computes a router load-balancing loss when asked, its coefficient in the
    config): a Mixture-of-Experts config has output_router_logits and router_aux_loss_coef."""
    config = unwrap(model).config.get_text_config()
    return hasattr(config, "output_router_logits"), float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def check(model: nn.Module) -> LogitTransform:
    """The model's LogitTransform, after checking that the fused path gives the model's own
    log-probs. Raises ValueError naming the class and what does not fit: no lm_head with a weight,
    a forward without logits_to_keep, prompt-learning adapters, a refused class, or log-probs of a
    probe sequence that differ from log_softmax of the model's own logits."""
    causal_lm = unwrap(model)
    name = type(causal_lm).__name__
    peft_configs = getattr(unwrap(model, keep_adapters=True), "peft_config", {}) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in peft_configs.values()):
        raise ValueError("prompt-learning PEFT methods (prefix/prompt tuning) prepend virtual tokens that the fused "
                         "path does not account for: use LoRA-style adapters")
    head = causal_lm.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor) or head.weight.dim() != 2:
        raise ValueError(f"{name} has no output embedding (lm_head) with a [V, H] weight: the fused path needs a "
                         "causal LM whose logits come from hidden @ lm_head.weight.T")
    if "logits_to_keep" not in inspect.signature(type(causal_lm).forward).parameters:
        raise ValueError(f"{name}.forward takes no logits_to_keep: the fused path runs the model's forward for the "
                         "hidden states with logits_to_keep so that it never forms all logits")
    transform = logit_transform(causal_lm)
    _probe(causal_lm, transform)
    return transform


@torch.no_grad()
def _probe(causal_lm: nn.Module, transform: LogitTransform) -> None:
    """Scores a short sequence through the model's own forward and through the fused path."""
    from .linear import linear_token_logps

    head = causal_lm.get_output_embeddings()
    vocab, device = head.weight.shape[0], head.weight.device
    steps = 6
    input_ids = (torch.arange(1, steps + 1, device=device) * 7919 % vocab)[None]
    labels = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        logits = causal_lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits
        own = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None])[..., 0]
        ours, _ = through_model(causal_lm, transform,
                                lambda head: linear_token_logps(head.hidden, head.weight, labels, **head.as_kwargs()),
                                input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        causal_lm.train(was_training)
    # fp32: rounding only (~1e-6 of the log-probs' size); bf16/fp16 models: their own logits are rounded
    tolerance = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 5e-2
    error = float((own - ours).abs().max() / max(float(own.abs().max()), 1.0))
    if not error <= tolerance:
        name = type(causal_lm).__name__
        raise ValueError(f"{name}: its own logits are not log-softmax-equal to scale * (hidden @ lm_head.weight.T + "
                         f"bias) with a softcap (the form the fused path computes, {transform}): the log-probs of a "
                         f"probe sequence differ by {error:.2g} (relative). Its forward transforms the logits in a way "
                         "epa_ext does not know; use a trainer that forms the model's own logits")
