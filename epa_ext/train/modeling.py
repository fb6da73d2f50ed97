"""Models for epa-train: the tokenizer and the policy (loaded, or the tiny one built), pi_ref
(the reference model), LoRA and checkpointing, and what the model decides of the batches' layout (prefix sharing, an MoE
router loss). What turns a batch into the loss is the preference core's
(``epa_ext.preference.loss``)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..causal_lm import router_aux, unwrap
from ..preference.options import MIN_SHARED_TOKEN_RATIO
from ..preference.prefix import check_prefix_sharing, shared_attention
from . import hub
from .config import ConfigError, TrainConfig, tiny_attention_heads

# --- the tiny model ------------------------------------------------------------------------------


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on texts (offline), as a transformers fast tokenizer.
    Its default encoding puts the BOS token in front, as training does to every prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_model(vocab_size: int, hidden_size: int, layers: int, max_positions: int, seed: int):
    """A small randomly initialized Llama-architecture causal LM (tied embeddings), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv_heads = tiny_attention_heads(hidden_size)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


# --- where a pretrained model comes from ---------------------------------------------------------


def pretrained_kwargs(model: str) -> dict[str, Any]:
    """from_pretrained keywords for --model: local_files_only when the hub cannot be reached but
    the model is cached (transformers would otherwise retry for most of a minute). Raises
    ConfigError at once when it can be neither reached nor found in the cache."""
    if hub.looks_local(model) or hub.offline():
        return {}
    problem = hub.unreachable()
    if problem is None:
        return {}
    if hub.model_in_cache(model):
        return {"local_files_only": True}
    raise ConfigError(f"--model {model}: a hub id, but {problem}, and it is not in the local cache; hub ids need "
                      f"the network: give a local model directory instead")


def _from_pretrained(loader, model: str, **kwargs):
    try:
        return loader.from_pretrained(model, **pretrained_kwargs(model), **kwargs)
    except OSError as error:  # a hub id that does not exist, a directory without weights ...
        raise ConfigError(f"--model {model}: cannot be loaded ({str(error).splitlines()[0]})") from None


# --- tokenizer and models ------------------------------------------------------------------------


def load_tokenizer(cfg: TrainConfig, texts: Iterable[str], resume_dir: Path | None):
    """The tokenizer of --model (trained on texts for tiny; the checkpoint's on resume), with a
    pad token, and a default encoding that puts BOS in front as training does
    (``match_training_encoding``)."""
    from transformers import AutoTokenizer

    if resume_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(resume_dir)
    elif cfg.model == "tiny":
        tokenizer = train_tiny_tokenizer(texts, cfg.tiny_vocab_size)
    else:
        tokenizer = _from_pretrained(AutoTokenizer, cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not match_training_encoding(tokenizer):
        print(f"epa-train: note: the default encoding of this tokenizer does not put BOS in front as training does; "
              f"encode prompts as [{tokenizer.bos_token_id}] + tokenizer(prompt, add_special_tokens=False)",
              file=sys.stderr)
    return tokenizer


def match_training_encoding(tokenizer) -> bool:
    """Training puts the BOS token in front of every prompt (``batching.tokenize``). When the
    tokenizer's default encoding does not (GPT-2 style tokenizers), it is switched to do so
    (``add_bos_token``), so that ``tokenizer(prompt)`` of the saved tokenizer gives what training
    fed the model. Tokenizers without a BOS token, or whose encoding already starts with it, are
    left as they are. Returns whether the default encoding now matches training."""
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a")["input_ids"][:1] == [bos]:
        return True
    if isinstance(getattr(type(tokenizer), "add_bos_token", None), property):
        tokenizer.add_bos_token = True
    return tokenizer("a")["input_ids"][:1] == [bos]


def load_initial_model(cfg: TrainConfig, tokenizer):
    from transformers import AutoModelForCausalLM

    if cfg.model == "tiny":
        return build_tiny_model(len(tokenizer), cfg.tiny_hidden_size, cfg.tiny_layers, cfg.max_length + 8, cfg.seed)
    return _from_pretrained(AutoModelForCausalLM, cfg.model, dtype=torch.float32)


def load_policy(cfg: TrainConfig, tokenizer, resume_dir: Path | None) -> tuple[nn.Module, nn.Module | None]:
    """(policy, reference). The reference is the initial model, frozen; with LoRA it is None: the
    policy with its adapters disabled is the reference."""
    from transformers import AutoModelForCausalLM

    initial = load_initial_model(cfg, tokenizer)
    if cfg.lora_r:
        return wrap_lora(initial, cfg, resume_dir), None
    reference = frozen_copy(initial)
    policy = AutoModelForCausalLM.from_pretrained(resume_dir, dtype=torch.float32) if resume_dir else initial
    return policy, reference


def wrap_lora(model: nn.Module, cfg: TrainConfig, resume_dir: Path | None) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_dir is not None:
        return PeftModel.from_pretrained(model, resume_dir, is_trainable=True)
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.adapter_alpha, lora_dropout=0.0,
                        target_modules="all-linear")
    return get_peft_model(model, config)


def frozen_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(unwrap(model)).eval()
    reference.requires_grad_(False)
    return reference


def enable_gradient_checkpointing(policy: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpointing, which
    gives the same gradients). The lm_head is not checkpointed: the fused loss keeps no logits."""
    model = unwrap(policy)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


# --- how the policy takes a batch -------------------------------------------------------------------


def shared_layout(cfg: TrainConfig, policy: nn.Module, transform, *, is_main: bool) -> dict:
    """The Layout fields of --prefix-sharing on / auto: the model's attention for the shared rows'
    masks, if the probe finds them exact (``prefix.check_prefix_sharing``), and the token ratio a
    batch must reach (auto). on refuses a model that fails the probe; auto says once why it does
    not share and trains as without the option (is_main: the process that says it)."""
    try:
        check_prefix_sharing(policy, transform, router_logits=router_aux_coef(policy) > 0)
    except ValueError as error:
        if cfg.prefix_sharing == "on":
            raise ConfigError(f"--prefix-sharing on: {error}") from None
        if is_main:
            print(f"epa-train: --prefix-sharing auto: not sharing prompts: {error}", file=sys.stderr)
        return {}
    return {"shared_attention": shared_attention(policy),
            "min_shared_ratio": MIN_SHARED_TOKEN_RATIO if cfg.prefix_sharing == "auto" else 0.0}


def router_aux_coef(policy: nn.Module) -> float:
    """The coefficient of an MoE model's router load-balancing loss when its config asks for router
    logits (output_router_logits, as transformers' own training forward adds it), else 0."""
    has_router, coef = router_aux(policy)
    return coef if has_router and unwrap(policy).config.get_text_config().output_router_logits else 0.0
