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
from typing import NoReturn, TypeVar

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


# The probe's bounds (``_probe``), relative. The transform after the lm_head, both sides in fp32 from the
# head's same output: fp32 rounding of a few elementwise ops and a log-softmax (measured: 0 on every
# architecture of python_tests/test_models.py, in fp32, bf16 and fp16), where a forward that scales
# its logits by 1.01 differs by 7.5e-4 (its tiny Llama, in each precision). End to end: fp32 rounding
# only (~1e-6 of the log-probs' size); bf16/fp16 models: the head's logits and the fused path's are
# each rounded to that dtype, and may round differently (other matmul shapes, split reductions).
_TRANSFORM_RTOL = 1e-5
_END_TO_END_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4}
_END_TO_END_RTOL_HALF = 5e-2


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
    try:
        transform = LogitTransform(
            hidden_scale=float(_HIDDEN_SCALE[name](causal_lm)) if name in _HIDDEN_SCALE else 1.0,
            logit_scale=float(_LOGIT_SCALE[name](causal_lm)) if name in _LOGIT_SCALE else 1.0,
            softcap=_SOFTCAP[name](causal_lm) if name in _SOFTCAP else None)
    except ZeroDivisionError:  # Granite's and MiniCPM3's forwards divide by config.logits_scaling
        raise ValueError(f"{name} divides its logits by a config value that is 0 (config.logits_scaling = "
                         f"{getattr(causal_lm.config, 'logits_scaling', '?')}): its forward would give inf or NaN "
                         "logits; set it to the model's real value") from None
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
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor) or head.weight.dim() != 2:
        raise ValueError(f"{name} has no output embedding (lm_head) with a [V, H] weight: the fused path needs a "
                         "transformers causal LM (get_output_embeddings()) whose logits come from hidden @ "
                         "lm_head.weight.T; pass the transformers model itself, not a module wrapping it")
    if not _takes_keyword(type(causal_lm).forward, "logits_to_keep"):
        raise ValueError(f"{name}.forward takes no logits_to_keep: the fused path runs the model's forward for the "
                         "hidden states with logits_to_keep so that it never forms all logits")
    transform = logit_transform(causal_lm)
    _probe(causal_lm, transform)
    return transform


def _takes_keyword(function: Callable, keyword: str) -> bool:
    """Whether function accepts keyword: by name, or through **kwargs (a subclass whose forward
    passes everything on to its parent's; the probe then checks what it does with it)."""
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@torch.no_grad()
def _probe(causal_lm: nn.Module, transform: LogitTransform) -> None:
    """Scores a short sequence through the model's own forward and through the fused path.

    Two comparisons. The model's forward runs with its lm_head's output widened to fp32 (a forward
    hook), so whatever the forward does to the logits after the head runs in fp32 on the head's
    own values, in every precision: its logits must have the log-softmax of the transform applied
    to those values, to fp32 rounding (_TRANSFORM_RTOL). Both sides come from the same head output,
    so no rounding of the model's dtype separates them, and a logit transform the table does not
    know is refused in bf16 and fp16 as in fp32. Then the fused path's log-probs against the
    model's own, end to end (the hidden states, the head's weight and bias, the folded scales):
    _END_TO_END_RTOL, for bf16/fp16 as wide as the head and the fused path's matmul rounding their
    logits to that dtype differently needs."""
    from .linear import linear_token_logps

    head = causal_lm.get_output_embeddings()
    vocab, device = head.weight.shape[0], head.weight.device
    steps = 6
    input_ids = (torch.arange(1, steps + 1, device=device) * 7919 % vocab)[None]
    labels = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    head_outputs: list[Tensor] = []

    def widen(_module, _args, output):
        head_outputs.append(output)
        return output.float() if isinstance(output, Tensor) else output

    was_training = causal_lm.training
    causal_lm.eval()
    handle = head.register_forward_hook(widen)
    try:
        logits = causal_lm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits
    finally:
        handle.remove()
    try:
        ours, _ = through_model(causal_lm, transform,
                                lambda head: linear_token_logps(head.hidden, head.weight, labels, **head.as_kwargs()),
                                input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        causal_lm.train(was_training)
    (head_output,) = head_outputs  # through_model has refused any other number of head calls
    if not isinstance(head_output, Tensor) or head_output.shape != logits.shape:
        _refuse(causal_lm, transform, f"its logits {tuple(logits.shape)} are not its lm_head's output "
                                      f"({tuple(getattr(head_output, 'shape', ()))}) transformed elementwise")
    own_all = torch.log_softmax(logits.float(), dim=-1)
    expected = transform.logit_scale * head_output.float()
    if transform.softcap is not None:
        expected = transform.softcap * torch.tanh(expected / transform.softcap)
    expected_all = torch.log_softmax(expected, dim=-1)
    scale = max(float(expected_all.abs().max()), float(expected.abs().max()), 1.0)
    error = float((own_all - expected_all).abs().max()) / scale
    # a forward that returns its logits in bf16/fp16 (a cast after the transform) rounds them once more
    tolerance = _TRANSFORM_RTOL if logits.dtype in (torch.float32, torch.float64) else torch.finfo(logits.dtype).eps
    if not error <= tolerance:
        _refuse(causal_lm, transform, f"the log-softmax of its lm_head's output through that form differs from its "
                                      f"own by {error:.2g} (relative to their largest)")
    own = own_all.gather(-1, labels[..., None])[..., 0]
    error = float((own - ours).abs().max() / max(float(own.abs().max()), 1.0))
    if not error <= _END_TO_END_RTOL.get(head.weight.dtype, _END_TO_END_RTOL_HALF):
        _refuse(causal_lm, transform, f"the log-probs of a probe sequence differ by {error:.2g} (relative)")


def _refuse(causal_lm: nn.Module, transform: LogitTransform, difference: str) -> NoReturn:
    """The probe's ValueError: the model's class, the form the fused path computes, what differs."""
    name = type(causal_lm).__name__
    raise ValueError(f"{name}: its own logits are not log-softmax-equal to scale * (hidden @ lm_head.weight.T + "
                     f"bias) with a softcap (the form the fused path computes, {transform}): {difference}. Its "
                     "forward transforms the logits in a way epa_ext does not know; use a trainer that forms the "
                     "model's own logits")
