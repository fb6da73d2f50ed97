"""The fused path on every causal-LM architecture transformers builds here from a config
(epa_ext.causal_lm): the preference core's PreferenceLoss against the model's own logits (log_softmax of
``model(...).logits``), for the sequence log-probs (right padding, under LoRA and gradient
checkpointing too) and the gradient of one DPO step; logit transforms (Cohere's scale, Granite's
divisor, Gemma-2/3's softcap, ...) set to values that bite; MoE router losses against
transformers' own; models that cannot be computed exactly are refused. EPATrainer on the same
adapter: test_trl.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from numerics import assert_paths_agree

from epa_ext import IGNORE_INDEX, causal_lm, eager
from epa_ext.preference.loss import LossSpec, PreferenceLoss
from epa_ext.train.modeling import enable_gradient_checkpointing

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
# model_type -> config fields of its own (None: leave the config's default). The transforms are set
# far from their defaults, so that leaving one out moves the log-probs well beyond fp32 rounding.
ARCHITECTURES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {}, "phi": {}, "phi3": {}, "stablelm": {},
    "olmo2": {}, "starcoder2": {}, "mixtral": {}, "qwen2_moe": {}, "qwen3_moe": {}, "olmoe": {},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4), "gpt_neox": {}, "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "bloom": dict(n_layer=2, n_head=4), "falcon": dict(head_dim=None), "gptj": dict(n_embd=32, n_layer=2, n_head=4,
                                                                                  rotary_dim=4),
    "cohere": dict(logit_scale=0.5), "cohere2": dict(logit_scale=0.5), "cohere2_moe": dict(logit_scale=0.5),
    "granite": dict(logits_scaling=4.0), "granitemoe": dict(logits_scaling=4.0),
    "hyperclovax": dict(logits_scaling=3.0),
    # small Mamba mixers: the default state and chunk sizes take seconds per step on the CPU
    "falcon_h1": dict(lm_head_multiplier=0.3, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=8, mamba_chunk_size=4,
                      mamba_n_groups=1, mamba_d_ssm=32),
    "gemma2": dict(final_logit_softcapping=0.3), "gemma3_text": dict(final_logit_softcapping=0.3),
    "gemma4_text": dict(final_logit_softcapping=0.3), "vaultgemma": dict(final_logit_softcapping=0.3),
    "nanochat": dict(final_logit_softcapping=0.3), "recurrent_gemma": dict(logits_soft_cap=0.3),
}
TRANSFORMED = {"cohere", "cohere2", "cohere2_moe", "granite", "granitemoe", "hyperclovax", "falcon_h1", "gemma2",
               "gemma3_text", "gemma4_text", "vaultgemma", "nanochat", "recurrent_gemma"}


def build(model_type: str, **overrides):
    """A tiny randomly initialised model of this architecture, fp32, without dropout."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    fields = {k: v for k, v in {**SMALL, **ARCHITECTURES[model_type], **overrides}.items() if v is not None}
    config = AutoConfig.for_model(model_type, **fields)
    for name, value in vars(config).items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config)


def pairs(device="cpu"):
    """2 DPO pairs, [chosen; rejected] rows right-padded to different lengths; labels score the answers."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (4, 12), generator=generator)
    lengths = torch.tensor([12, 9, 11, 7])
    attention_mask = (torch.arange(12) < lengths[:, None]).long()
    labels = input_ids.roll(-1, 1).masked_fill(torch.arange(12) < 4, IGNORE_INDEX)
    labels = labels.masked_fill(torch.arange(12) >= lengths[:, None] - 1, IGNORE_INDEX)
    ref = -torch.rand(4, generator=generator) * 30
    return input_ids.to(device), attention_mask.to(device), labels.to(device), ref.to(device)


def own_loss(model, input_ids, attention_mask, labels, ref):
    """(DPO loss, sequence log-probs) from the model's own logits, in plain torch."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    return eager.fused_dpo_loss(logits, labels, ref)


def fused_loss(model, input_ids, attention_mask, labels, ref):
    module = PreferenceLoss(model, LossSpec("dpo", 0.1), transform=causal_lm.check(model))
    loss, seq, *_ = module(input_ids, attention_mask, labels, ref, torch.ones(2, 2, dtype=torch.bool))
    return loss, seq


def one_decoder_weight(model) -> torch.Tensor:
    """A weight of the first decoder layer (its largest one)."""
    backbone, _ = causal_lm.backbone_and_head(model)
    layer = next(m for name, m in backbone.named_modules() if name.endswith(("layers.0", "h.0", "layers.0.mixer")))
    return max((p for p in layer.parameters() if p.requires_grad), key=lambda p: p.numel())


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_log_probs_and_gradients_are_the_models_own(model_type):
    model = build(model_type).eval()
    batch = pairs()
    head = model.get_output_embeddings().weight
    decoder_weight = one_decoder_weight(model)
    results = []
    for compute in (own_loss, fused_loss):
        model.zero_grad(set_to_none=True)
        loss, seq = compute(model, *batch)
        loss.backward()
        results.append((loss.detach(), seq.detach(), head.grad.clone(), decoder_weight.grad.clone()))
    (own, own_seq, *own_grads), (ours, seq, *grads) = results
    assert_paths_agree(seq, own_seq, what=f"{model_type} sequence log-probs")
    assert_paths_agree(ours, own, what=f"{model_type} loss")
    for name, grad, expected in zip(("lm_head", "decoder weight"), grads, own_grads):
        assert_paths_agree(grad, expected, what=f"{model_type} d({name})")
    if model_type in TRANSFORMED:  # the transform bites: leaving it out would be far off
        with torch.no_grad():
            plain, _ = causal_lm.through_model(
                model, causal_lm.LogitTransform(),
                lambda head: eager.linear_sequence_logps(head.hidden, head.weight, batch[2], head.bias),
                input_ids=batch[0], attention_mask=batch[1])
        assert (plain - own_seq).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "granite", "mixtral"])
def test_under_lora_and_gradient_checkpointing(model_type):
    """PEFT's wrapper (adapters on every linear layer, B = 0 at start: the model's own log-probs)
    and checkpointed decoder layers in training mode: the same log-probs and lm_head-adapter
    gradients as the model's own logits give."""
    from peft import LoraConfig, get_peft_model

    model = build(model_type)
    enable_gradient_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0)).train()
    batch = pairs()
    adapters = [p for name, p in model.named_parameters() if p.requires_grad and "lora_A" in name]
    results = []
    for compute in (own_loss, fused_loss):
        model.zero_grad(set_to_none=True)
        loss, seq = compute(model, *batch)
        grads = torch.autograd.grad(loss, adapters, allow_unused=True, materialize_grads=True)
        results.append((seq.detach(), torch.cat([g.flatten() for g in grads])))
    assert_paths_agree(results[1][0], results[0][0], what=f"{model_type} LoRA + checkpointing log-probs")
    assert_paths_agree(results[1][1], results[0][1], what=f"{model_type} LoRA + checkpointing gradients")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_router_loss_is_transformers_own(model_type):
    """With output_router_logits the loss includes router_aux_loss_coef times the model's own
    load-balancing loss (as transformers' forward and TRL add it), with its gradient."""
    model = build(model_type, output_router_logits=True, router_aux_loss_coef=0.5).eval()
    input_ids, attention_mask, labels, ref = pairs()
    expected = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).aux_loss
    assert expected is not None and expected > 0
    module = PreferenceLoss(model, LossSpec("dpo", 0.1), transform=causal_lm.check(model), router_aux_coef=0.5)
    loss, _, _, aux = module(input_ids, attention_mask, labels, ref, torch.ones(2, 2, dtype=torch.bool))
    assert_paths_agree(aux, expected, what="router loss")
    plain = PreferenceLoss(model, LossSpec("dpo", 0.1))(input_ids, attention_mask, labels, ref,
                                                        torch.ones(2, 2, dtype=torch.bool))[0]
    assert_paths_agree(loss, plain + 0.5 * expected, what="loss with the router loss")
    router = next(p for name, p in model.named_parameters() if "gate" in name and "experts" not in name)
    assert torch.autograd.grad(loss, [router])[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("scale", [3.0, 1.03, 1.01])
def test_a_transform_the_table_does_not_know_is_refused(scale, dtype):
    """A model whose forward changes its logits in a way no table entry says (here: a subclass of
    Llama that scales them) fails the probe, naming the class, before any step; in bf16 and fp16
    as in fp32 (the probe's bound was once 5e-2 there, which a scale of 1.03 passed, to train with
    log-probs 0.56 nats off)."""
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
            output = super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                                     **kwargs)
            output.logits = output.logits * scale
            return output

    model = ScaledLlama(build("llama").config).to(dtype)
    with pytest.raises(ValueError, match=r"ScaledLlama: its own logits are not log-softmax-equal to scale \* "
                                         r"\(hidden @ lm_head.weight.T \+ bias\) with a softcap"):
        causal_lm.check(model)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_architecture_passes_the_probe_in_half_precision(model_type):
    """The probe's bounds leave bf16 and fp16 models their rounding: every architecture here, its
    transform set far from the default, is accepted in both (and in fp32 by the tests above)."""
    for dtype in (torch.bfloat16, torch.float16):
        assert causal_lm.check(build(model_type).to(dtype)) == causal_lm.logit_transform(build(model_type))


def test_refused_and_unfit_models_name_what_they_do():
    from transformers import LlamaConfig, LlamaModel

    with pytest.raises(ValueError, match="LlamaModel has no output embedding"):
        causal_lm.check(LlamaModel(LlamaConfig(**{k: v for k, v in SMALL.items()})))
    model = build("llama")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(causal_lm.REFUSED, "LlamaForCausalLM", "does something")
        with pytest.raises(ValueError, match="LlamaForCausalLM does something, which epa_ext's fused log-probs do "
                                             "not compute"):
            causal_lm.check(model)
    gemma = build("gemma2", final_logit_softcapping=float("inf"))
    with pytest.raises(ValueError, match="Gemma2ForCausalLM has a logit softcap of inf"):
        causal_lm.check(gemma)


def test_supported_models_table_is_this_test():
    """docs/models.md lists exactly the architectures tested here."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    listed = {line.split("`")[1] for line in text.splitlines() if line.startswith("| `")}
    assert listed == set(ARCHITECTURES)


def test_unfit_models_get_one_clear_error_not_a_crash():
    """Issue 37, round 3: a scale of 0 that Granite divides by, a module that merely wraps a decoder
    and a head, each a ValueError naming what to do (they were ZeroDivisionError and AttributeError);
    and a pass-through subclass whose forward takes **kwargs is accepted (it was refused as taking
    no logits_to_keep), its log-probs the model's own."""
    from torch import nn

    with pytest.raises(ValueError, match=r"GraniteForCausalLM divides its logits by a config value that is 0 "
                                         r"\(config.logits_scaling = 0"):
        causal_lm.check(build("granite", logits_scaling=0.0))

    class Wrapper(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.decoder, self.head = model.model, model.lm_head

        def forward(self, input_ids):
            return self.head(self.decoder(input_ids).last_hidden_state)

    with pytest.raises(ValueError, match="Wrapper has no output embedding .* pass the transformers model itself"):
        causal_lm.check(Wrapper(build("llama")))

    from transformers import LlamaForCausalLM

    class PassThrough(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = PassThrough(build("llama").config)
    assert causal_lm.check(model) == causal_lm.LogitTransform()
