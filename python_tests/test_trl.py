"""epa_ext.integrations.trl against TRL itself: EPATrainer and TRL's DPOTrainer on the same tiny
Llama (built from a config), seed and data, on CPU; EPA's batches and numbers checked against
plain torch and epa_ext's epa_loss; configurations EPATrainer refuses."""

from __future__ import annotations

import copy
import json
import math
import os
import re

import pytest
import torch
from numerics import ADAM_SLACK, assert_trl_parity

pytest.importorskip("trl")
os.environ.setdefault("TQDM_DISABLE", "1")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

import epa_ext  # noqa: E402
from epa_ext import eager  # noqa: E402
from epa_ext.integrations.trl import EPAConfig, EPATrainer  # noqa: E402
from epa_ext.preference.candidates import weak_negative_sources  # noqa: E402
from epa_ext.train.modeling import build_tiny_model, train_tiny_tokenizer  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "plum", "rose", "jade", "mint", "sand", "navy", "lime",
         "ruby", "onyx"]
# Every metric TRL 1.16's DPOTrainer logs for a text model (and Trainer's own keys).
TRL_KEYS = {"loss", "grad_norm", "learning_rate", "entropy", "num_tokens", "logits/chosen", "logits/rejected",
            "mean_token_accuracy", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "epoch", "step"}
TOKEN_METRICS = {"entropy", "mean_token_accuracy"}
TIMINGS = ("_runtime", "_per_second")  # wall-clock keys of Trainer's evaluation logs


def standard_rows(n: int = 16, offset: int = 0) -> list[dict]:
    """Explicit prompts; answers of varied lengths so batches are padded."""
    return [{"prompt": f"Q{i + offset}: say", "chosen": " yes good" * (1 + i % 3), "rejected": " no bad" * (1 + i % 2)}
            for i in range(n)]


def implicit_rows(n: int = 16) -> list[dict]:
    return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in standard_rows(n)]


def conversational_rows(n: int = 16, implicit: bool = False) -> list[dict]:
    rows = []
    for r in standard_rows(n):
        user = [{"role": "user", "content": r["prompt"]}]
        chosen = [{"role": "assistant", "content": r["chosen"].strip()}]
        rejected = [{"role": "assistant", "content": r["rejected"].strip()}]
        rows.append({"chosen": user + chosen, "rejected": user + rejected} if implicit
                    else {"prompt": user, "chosen": chosen, "rejected": rejected})
    return rows


def pick_rows(n: int = 16, conversational: bool = False) -> list[dict]:
    """EPA data that can be learned: the chosen answer repeats the prompt's word, the 1-3
    rejected ones (a list) repeat other words; weak negatives (other rows' answers) are wrong too."""
    rows = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        others = [WORDS[(i + 1 + k) % len(WORDS)] for k in range(1 + i % 3)]
        prompt, chosen, rejected = f"pick {word}:", f" {word} {word}", [f" {w} {w}" for w in others]
        if conversational:
            user = [{"role": "user", "content": prompt}]
            rows.append({"chosen": user + [{"role": "assistant", "content": chosen.strip()}],
                         "rejected": [user + [{"role": "assistant", "content": r.strip()}] for r in rejected]})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls gain nothing from threads, and on a busy machine lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tokenizer():
    texts = [f"Q{i}: say yes good no bad <|user|><|assistant|>" for i in range(40)] + [f"pick {w}: {w}" for w in WORDS]
    tok = train_tiny_tokenizer(texts, 320)
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def config(cls, tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=4, max_steps=5,
                   logging_steps=1, learning_rate=1e-3, bf16=False, gradient_checkpointing=False, use_cpu=True,
                   report_to="none", save_strategy="no", disable_tqdm=True, max_length=64, seed=0)
    options.update(overrides)
    return cls(**options)


def train(trainer_cls, args, rows, tokenizer, *, lora: bool = False, eval_rows=None, ref_model: bool | None = None,
          model_type: str = "llama", **config_fields):
    """Trains a fresh tiny model (a Llama unless model_type says; config_fields of its config) with
    the same seed every call; returns (log history without the final summary, the trainer).
    ref_model: pass a frozen copy (default: unless LoRA or precomputed)."""
    if model_type == "llama" and not config_fields:
        model = build_tiny_model(len(tokenizer), 32, 2, 128, seed=0)
    else:
        from test_models import build

        model = build(model_type, **{"vocab_size": len(tokenizer), "max_position_embeddings": 128, **config_fields})
    if ref_model is None:
        ref_model = not lora and not args.precompute_ref_log_probs
    trainer = trainer_cls(
        model=model, ref_model=copy.deepcopy(model) if ref_model else None, args=args,
        train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "train_runtime" not in entry], trainer


def assert_same_training(ours, theirs, *, ties_at_first_step: bool = False):
    """Logged numbers, step by step, and the final weights, under TRL_PARITY; ours and theirs are
    (log, trainer) from ``train``.

    ties_at_first_step: at step 1 the policy is the reference, so every reward is 0 up to
    rounding and rewards/accuracies (the share of margins > 0) is the sign of rounding noise;
    with precomputed reference log-probs (other batches, other padding) both trainers see such
    noise, so that one number is not compared there.
    """
    assert_same_logs(ours[0], theirs[0], ties_at_first_step=ties_at_first_step)
    assert_same_weights(ours[1].model.state_dict(), theirs[1])


def assert_same_logs(our_log: list[dict], their_log: list[dict], *, ties_at_first_step: bool = False):
    assert len(our_log) == len(their_log) >= 5
    for entry, expected in zip(our_log, their_log):
        assert entry.keys() == expected.keys(), entry.keys() ^ expected.keys()
        for key, value in expected.items():
            if key.endswith(TIMINGS) or ties_at_first_step and expected["step"] == 1 and key == "rewards/accuracies":
                continue
            assert_trl_parity(entry[key], value, f"step {expected['step']} {key}")


def assert_same_weights(our_weights: dict, their_trainer):
    """Final weights against TRL's trainer's, with AdamW's allowance (numerics.ADAM_SLACK)."""
    args = their_trainer.args
    adam = ADAM_SLACK * args.max_steps * args.learning_rate if args.optim.startswith("adamw") else 0.0
    their_weights = their_trainer.model.state_dict()
    assert our_weights.keys() == their_weights.keys()
    for name, weight in our_weights.items():
        assert_trl_parity(weight, their_weights[name], f"final weight {name}", extra_atol=adam)


# --- TRL's DPO loss types: the same training ----------------------------------------------------------


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-model", "precomputed"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
def test_dpo_loss_types_train_as_trl(loss_type, precompute, tokenizer, tmp_path):
    options = dict(loss_type=loss_type, precompute_ref_log_probs=precompute, eval_strategy="steps", eval_steps=5,
                   label_smoothing=0.1 if loss_type == "robust" else 0.0)
    eval_rows = standard_rows(6, offset=100)
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, **options), standard_rows(), tokenizer, eval_rows=eval_rows)
    ours = train(EPATrainer, config(EPAConfig, tmp_path, token_metrics=True, **options), standard_rows(), tokenizer,
                 eval_rows=eval_rows)
    assert {key for entry in theirs[0] for key in entry} >= TRL_KEYS
    assert any("eval_loss" in entry for entry in ours[0])
    if precompute:
        assert ours[1].ref_model is None and "ref_chosen_logps" in ours[1].train_dataset.column_names
    assert_same_training(ours, theirs, ties_at_first_step=precompute)


@pytest.mark.parametrize("loss_type,precompute", [("sigmoid", False), ("ipo", True)])
def test_lora_trains_as_trl(loss_type, precompute, tokenizer, tmp_path):
    """PEFT LoRA: the reference is the model with its adapters disabled (TRL's convention); the
    default metrics are TRL's without the two that need a pass over the vocabulary."""
    options = dict(loss_type=loss_type, precompute_ref_log_probs=precompute)
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, **options), standard_rows(), tokenizer, lora=True)
    ours = train(EPATrainer, config(EPAConfig, tmp_path, **options), standard_rows(), tokenizer, lora=True)
    for entry in theirs[0]:
        for key in TOKEN_METRICS:
            del entry[key]
    assert ours[1].ref_model is None
    assert_same_training(ours, theirs, ties_at_first_step=precompute)


ARCHITECTURES = {  # model_type -> config fields: a logit transform that bites, an MoE router loss
    "gemma2": dict(final_logit_softcapping=0.3),
    "cohere": dict(logit_scale=0.5),
    "granite": dict(logits_scaling=4.0),
    "mixtral": dict(output_router_logits=True, router_aux_loss_coef=0.5),
}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_other_architectures_train_as_trl(model_type, tokenizer, tmp_path):
    """Logit softcaps and scales (epa_ext.causal_lm) and Mixtral's router loss (added and logged
    as aux_loss, as TRL adds it): the same training as TRL's DPOTrainer."""
    options = dict(loss_type="sigmoid")
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, **options), standard_rows(), tokenizer,
                   model_type=model_type, **ARCHITECTURES[model_type])
    ours = train(EPATrainer, config(EPAConfig, tmp_path, token_metrics=True, **options), standard_rows(), tokenizer,
                 model_type=model_type, **ARCHITECTURES[model_type])
    assert ("aux_loss" in ours[0][0]) == (model_type == "mixtral")
    # at step 1 the policy is the reference: rewards are 0 up to rounding, whose sign decides accuracies
    assert_same_training(ours, theirs, ties_at_first_step=True)


def test_gradient_accumulation_and_checkpointing_train_as_trl(tokenizer, tmp_path):
    """Two micro-batches per step, activations recomputed (TRL's default); plain SGD, so the final
    weights agree to the fp32 rule without AdamW's per-element normalization."""
    options = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
                   optim="sgd", learning_rate=0.1)
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, **options), standard_rows(), tokenizer)
    ours = train(EPATrainer, config(EPAConfig, tmp_path, token_metrics=True, **options), standard_rows(), tokenizer)
    assert_same_training(ours, theirs)


@pytest.mark.parametrize("rows", [implicit_rows, conversational_rows, lambda: conversational_rows(implicit=True)],
                         ids=["standard-implicit-prompt", "conversational", "conversational-implicit-prompt"])
def test_data_formats_train_as_trl(rows, tokenizer, tmp_path):
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path), rows(), tokenizer)
    ours = train(EPATrainer, config(EPAConfig, tmp_path, token_metrics=True), rows(), tokenizer)
    assert_same_training(ours, theirs)


@pytest.mark.parametrize("loss_type,loss_weights,precompute", [
    (["sigmoid", "sft"], [1.0, 0.5], False),   # RPO (TRL's former rpo_alpha = 0.5)
    (["sft", "ipo"], [0.3, 2.0], True),
    (["epa", "sft"], [1.0, 0.5], False),        # EPA with one rejected answer: RPO again
], ids=["rpo", "ipo-sft-weighted-precomputed", "epa-sft"])
def test_sft_term_trains_as_trl(loss_type, loss_weights, precompute, tokenizer, tmp_path):
    """TRL's "sft" loss term (the chosen answers' NLL over all their tokens, weighted) is epa_ext's
    sft_weight: w * loss + w_sft * NLL = w * (loss + (w_sft / w) * NLL)."""
    trl_types = ["sigmoid" if t == "epa" else t for t in loss_type]
    options = dict(precompute_ref_log_probs=precompute, loss_weights=loss_weights)
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, loss_type=trl_types, **options), standard_rows(), tokenizer)
    ours = train(EPATrainer, config(EPAConfig, tmp_path, loss_type=loss_type, token_metrics=True, **options),
                 standard_rows(), tokenizer)
    assert_same_training(ours, theirs, ties_at_first_step=precompute)


def test_label_smoothing_with_sigmoid_follows_trl(tokenizer, tmp_path):
    """TRL 1.16 ignores label_smoothing for loss_type='sigmoid' (epa_ext's dpo_loss would apply
    cDPO); EPATrainer follows TRL, and says so."""
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, label_smoothing=0.2), standard_rows(), tokenizer)
    with pytest.warns(UserWarning, match="label_smoothing=0.2 is ignored for loss_type='sigmoid'"):
        args = config(EPAConfig, tmp_path, label_smoothing=0.2, token_metrics=True)
    ours = train(EPATrainer, args, standard_rows(), tokenizer)
    assert_same_training(ours, theirs)


def test_synced_reference_trains_as_trl(tokenizer, tmp_path):
    """TR-DPO (sync_ref_model): TRL's callback mixes the policy into the reference model that
    EPATrainer scores with."""
    options = dict(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, **options), standard_rows(), tokenizer)
    ours = train(EPATrainer, config(EPAConfig, tmp_path, token_metrics=True, **options), standard_rows(), tokenizer)
    assert_same_training(ours, theirs)


DDP_SCRIPT = """
import json, os, sys, tempfile
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from pathlib import Path
import test_trl as T
args = T.config(T.EPAConfig, Path(tempfile.mkdtemp()), per_device_train_batch_size=2, ddp_backend="gloo",
                token_metrics=True, padding_free=True)
log, trainer = T.train(T.EPATrainer, args, T.standard_rows(), T.make_tokenizer())
assert trainer.padding_free
if os.environ["RANK"] == "0":
    json.dump(log, open({log_path!r}, "w"))
    torch.save(trainer.model.state_dict(), {weights_path!r})
"""


def test_data_parallel_trains_as_trl_on_one_process(tokenizer, tmp_path):
    """Two DDP processes (gloo) with 2 pairs each train as TRL with 4 pairs in one process: the
    policy's forward goes through the DDP wrapper (gradients are averaged) and the metrics are
    gathered over both processes. The ranks pack their pairs (padding_free=True) and TRL pads:
    packing changes nothing DDP sees (one process: test_padding_free_trains_as_padded_batches)."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    log_path, weights_path = tmp_path / "log.json", tmp_path / "weights.pt"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), log_path=str(log_path),
                                        weights_path=str(weights_path)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    their_log, their_trainer = train(DPOTrainer, config(DPOConfig, tmp_path), standard_rows(), tokenizer)
    assert_same_logs(json.loads(log_path.read_text()), their_log)
    assert_same_weights(torch.load(weights_path), their_trainer)


def test_bf16_trains_close_to_trl(tokenizer, tmp_path):
    """bf16 autocast: both trainers run the lm_head matmul in bf16 (fp32 statistics); their losses
    stay within a few bf16 ulps of each other."""
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, bf16=True), standard_rows(), tokenizer)
    ours = train(EPATrainer, config(EPAConfig, tmp_path, bf16=True), standard_rows(), tokenizer)
    eps = torch.finfo(torch.bfloat16).eps
    for entry, expected in zip(ours[0], theirs[0]):
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert math.isfinite(entry[key])
            assert abs(entry[key] - expected[key]) <= 4 * eps * max(abs(expected[key]), 1.0), (key, entry, expected)


# --- EPA -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precompute", [False, True], ids=["reference-model", "precomputed"])
def test_epa_with_one_rejected_answer_is_trl_sigmoid(precompute, tokenizer, tmp_path):
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, precompute_ref_log_probs=precompute), standard_rows(),
                   tokenizer)
    ours = train(EPATrainer, config(EPAConfig, tmp_path, loss_type="epa", precompute_ref_log_probs=precompute,
                                    token_metrics=True), standard_rows(), tokenizer)
    assert_same_training(ours, theirs, ties_at_first_step=precompute)


class RecordingEPATrainer(EPATrainer):
    """Keeps each training batch and its log-probs computed by plain torch (full logits,
    log_softmax, gather; epa_ext.eager) under the policy and the reference, before the step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            labels = epa_ext.completion_labels(inputs["input_ids"], inputs["completion_mask"])
            with torch.no_grad():
                policy = self._plain_logps(model, inputs, labels)
                if self.ref_model is None:
                    with self.model.disable_adapter():
                        ref = self._plain_logps(self.model, inputs, labels)
                else:
                    ref = self._plain_logps(self.ref_model, inputs, labels)
            self.recorded.append({"inputs": {k: v.clone() for k, v in inputs.items()}, "policy": policy, "ref": ref})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    @staticmethod
    def _plain_logps(model, inputs, labels):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return eager.sequence_logps(logits.float(), labels)


def split_rows(inputs: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt tokens, answer tokens) of every row of a collated batch."""
    rows = []
    for ids, attention, completion in zip(inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]):
        ids, completion = ids[attention.bool()].tolist(), completion[attention.bool()].tolist()
        start = completion.index(1) if 1 in completion else len(ids)
        rows.append((ids[:start], ids[start:]))
    return rows


@pytest.mark.parametrize("variant", ["standard-explicit", "conversational-implicit-lora-precomputed"])
def test_epa_batches_and_numbers_are_epa_loss_of_plain_log_probs(variant, tokenizer, tmp_path):
    """Several rejected answers (a list per row, 1 to 3: absent ones masked) and 2 weak negatives:
    every batch is laid out candidate-major with the row's prompt under each candidate, the strong
    negatives are the row's rejected answers, the weak ones answers of other rows of the batch; the
    logged loss and metrics are epa_ext.epa_loss and the reward means of log-probs computed by plain
    torch on that batch."""
    conversational = variant.startswith("conversational")
    lora = "lora" in variant
    beta, weak_weight, num_weak = 0.2, 0.5, 2
    args = config(EPAConfig, tmp_path, loss_type="epa", num_weak=num_weak, weak_weight=weak_weight, beta=beta,
                  precompute_ref_log_probs=lora, max_steps=6, token_metrics=True, eval_strategy="steps", eval_steps=6)
    rows = pick_rows(conversational=conversational)
    log, trainer = train(RecordingEPATrainer, args, rows, tokenizer, lora=lora, ref_model=not lora,
                         eval_rows=pick_rows(8, conversational=conversational))
    (evaluation,) = [entry for entry in log if "eval_loss" in entry]
    assert all(math.isfinite(evaluation[f"eval_{key}"]) for key in ("loss", "rewards/weak", "rewards/margins"))
    log = [entry for entry in log if "loss" in entry]
    prepared = trainer.train_dataset
    if not conversational:  # our tokenization of answer lists is TRL's: prompt, then prompt + answer + EOS
        for row, example in zip(rows, prepared):
            prompt_ids = tokenizer(row["prompt"])["input_ids"]
            assert example["prompt_ids"] == prompt_ids
            assert example["rejected_ids"] == [tokenizer(row["prompt"] + r + "</s>")["input_ids"][len(prompt_ids):]
                                               for r in row["rejected"]]
    answers = {(tuple(e["prompt_ids"]), tuple(e["chosen_ids"])): e for e in prepared}
    num_strong = 3
    assert len(trainer.recorded) == len(log) == 6
    for record, entry in zip(trainer.recorded, log):
        inputs = record["inputs"]
        mask = inputs["candidate_mask"]
        batch, candidates = mask.shape
        assert candidates == 1 + num_strong + num_weak
        rows_of = split_rows(inputs)
        for b in range(batch):
            prompt, chosen = rows_of[b]
            example = answers[(tuple(prompt), tuple(chosen))]
            strong = [rows_of[c * batch + b] for c in range(1, 1 + num_strong)]
            assert all(p == prompt for p, _ in strong)
            assert [a for (_, a), present in zip(strong, mask[b, 1:1 + num_strong]) if present] == example["rejected_ids"]
            assert mask[b, 1:1 + num_strong].sum() == len(example["rejected_ids"])
            sources = weak_negative_sources(batch, num_weak, args.seed)[b]
            assert len({j for j, _ in sources}) == num_weak and b not in {j for j, _ in sources}
            for c, (j, k) in enumerate(sources, start=1 + num_strong):
                assert rows_of[c * batch + b] == (prompt, rows_of[k * batch + j][1]), "row j's chosen or first rejected"
        policy = record["policy"].view(candidates, batch).T
        ref = record["ref"].view(candidates, batch).T
        loss = epa_ext.epa_loss(policy, ref, beta=beta, num_strong=num_strong, weak_weight=weak_weight, mask=mask)
        rewards = beta * (policy - ref)
        strong_mask = mask[:, 1:1 + num_strong].float()
        expected = {
            "loss": loss,
            "rewards/chosen": rewards[:, 0].mean(),
            "rewards/rejected": (rewards[:, 1:1 + num_strong] * strong_mask).sum() / strong_mask.sum(),
            "rewards/margins": ((rewards[:, :1] - rewards[:, 1:1 + num_strong]) * strong_mask).sum() / strong_mask.sum(),
            "rewards/weak": rewards[:, 1 + num_strong:].mean(),
            "logps/chosen": policy[:, 0].mean(),
            "logps/rejected": (policy[:, 1:1 + num_strong] * strong_mask).sum() / strong_mask.sum(),
        }
        for key, value in expected.items():
            assert_trl_parity(entry[key], value, f"step {entry['step']} {key}")
        assert entry.keys() >= TRL_KEYS


def test_weak_correction_is_the_estimate_on_plain_log_probs(tokenizer, tmp_path):
    """weak_correction='importance' (S = 3): each weak answer is also scored under S - 1 prompts of
    other rows of the batch than its own; the logged loss is epa_loss with log-weights
    log mu(y~|x_b) - log q^(y~) (epa_ext.preference.weak_correction's estimate, N = the training set's
    size) on plain-torch reference log-probs of those sequences, and weak/log_weight their mean."""
    from epa_ext.preference.weak_correction import estimated_log_q

    beta, num_weak, prompts = 0.2, 2, 3
    args = config(EPAConfig, tmp_path, loss_type="epa", num_weak=num_weak, beta=beta, max_steps=3,
                  weak_correction="importance", weak_correction_prompts=prompts)
    rows = pick_rows()
    log, trainer = train(RecordingEPATrainer, args, rows, tokenizer)
    log = [entry for entry in log if "loss" in entry]
    for record, entry in zip(trainer.recorded, log):
        inputs, mask = record["inputs"], record["inputs"]["candidate_mask"]
        batch, candidates = mask.shape
        num_strong = candidates - 1 - num_weak
        rows_of, extra_rows = split_rows(inputs), split_rows({k.removeprefix("weak_prompts_"): v for k, v in
                                                              inputs.items() if k.startswith("weak_prompts_")})
        extra = {"input_ids": inputs["weak_prompts_input_ids"], "attention_mask": inputs["weak_prompts_attention_mask"],
                 "completion_mask": inputs["weak_prompts_completion_mask"]}
        with torch.no_grad():
            others = RecordingEPATrainer._plain_logps(trainer.ref_model, extra, epa_ext.completion_labels(
                extra["input_ids"], extra["completion_mask"])).view(batch, num_weak, prompts - 1)
        sources = weak_negative_sources(batch, num_weak, args.seed)
        for b in range(batch):
            for m, (j, _) in enumerate(sources[b]):
                weak_answer = rows_of[(1 + num_strong + m) * batch + b][1]
                assert rows_of[inputs["weak_source_index"][b, m]][1] == weak_answer  # its own sequence
                for s in range(prompts - 1):
                    prompt, answer = extra_rows[(b * num_weak + m) * (prompts - 1) + s]
                    assert answer == weak_answer and prompt != rows_of[j][0]
        ref = record["ref"]
        by_prompt = ref.view(candidates, batch).T
        log_weights = torch.zeros_like(by_prompt)
        log_weights[:, 1 + num_strong:] = by_prompt[:, 1 + num_strong:] - estimated_log_q(
            ref[inputs["weak_source_index"]], others, len(rows))
        loss = epa_ext.epa_loss(record["policy"].view(candidates, batch).T, by_prompt, beta=beta,
                                num_strong=num_strong, mask=mask, log_weights=log_weights)
        assert_trl_parity(entry["loss"], loss, f"step {entry['step']} loss")
        assert_trl_parity(entry["weak/log_weight"], log_weights[:, 1 + num_strong:].mean(), "weak/log_weight")


def test_epa_loss_falls_where_it_must(tokenizer, tmp_path):
    """The chosen answer repeats the prompt's word, every negative (strong or weak) another word:
    EPA's loss falls from about log(1 + K + M) to a fraction of it in 20 steps."""
    args = config(EPAConfig, tmp_path, loss_type="epa", num_weak=2, max_steps=20, per_device_train_batch_size=8,
                  learning_rate=3e-3, warmup_steps=4, beta=2.0)
    log, _ = train(EPATrainer, args, pick_rows(), tokenizer)
    losses = [entry["loss"] for entry in log]
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, losses
    assert log[-1]["rewards/margins"] > 0 and log[-1]["rewards/chosen"] > log[-1]["rewards/weak"]


# --- padding-free batches ----------------------------------------------------------------------------


@pytest.mark.parametrize("options,max_packed_length,lora", [
    (dict(loss_type="sigmoid"), 64, False),
    (dict(loss_type="epa", num_weak=1, precompute_ref_log_probs=True, gradient_checkpointing=True), None, False),
    (dict(loss_type="sigmoid", precompute_ref_log_probs=True), None, True),
], ids=["dpo-reference-model-bounded-rows", "epa-weak-precomputed-checkpointing", "dpo-lora-precomputed"])
def test_padding_free_trains_as_padded_batches(options, max_packed_length, lora, tokenizer, tmp_path, monkeypatch):
    """padding_free=True (which TRL 1.16 turns off): the policy and the reference score packed
    rows (at most max_packed_length tokens, by default 2 x max_length = 128; at 64, several per
    batch), and the logged numbers and final weights are those of padded batches."""
    import epa_ext.preference.scoring as scoring

    packed_rows = []
    pack = scoring.pack
    monkeypatch.setattr(scoring, "pack", lambda *a, **k: packed_rows.append(pack(*a, **k)) or packed_rows[-1])
    rows = pick_rows() if options["loss_type"] == "epa" else standard_rows()
    ref_model = True if options.get("num_weak") else None  # weak negatives are scored during training
    padded = train(EPATrainer, config(EPAConfig, tmp_path / "padded", **options), rows, tokenizer, lora=lora,
                   ref_model=ref_model)
    assert not packed_rows
    args = config(EPAConfig, tmp_path / "packed", padding_free=True, max_packed_length=max_packed_length, **options)
    packed = train(EPATrainer, args, rows, tokenizer, lora=lora, ref_model=ref_model)
    assert packed[1].padding_free and packed[1].args.padding_free
    assert packed_rows and all(p.input_ids.shape[1] <= (max_packed_length or 128) for p in packed_rows)
    assert any(p.input_ids.shape[0] > 1 for p in packed_rows) or not max_packed_length
    assert_same_training(packed, padded)


def test_padding_free_keeps_the_rope_scaling_of_padded_batches(tokenizer, tmp_path, monkeypatch):
    """A Llama with dynamic-NTK RoPE from an original context of 38 positions, which the padded
    batches stay within (chosen sequences of 36 tokens, rejected ones of 8). Packed into rows of
    72, first fit puts the chosen ones two to a row and the four rejected ones into a third row,
    whose free tail of 40 tokens is longer than the padded batch: numbered on to the row's end, as
    before, it moved every packed sequence to the scaled frequencies (step 1's grad_norm off, mean
    losses 0.1762 and 0.1722). The logged numbers and final weights are the padded run's."""
    import epa_ext.preference.scoring as scoring

    packed_rows = []  # (attention mask, packed rows) of every packed batch
    pack = scoring.pack
    monkeypatch.setattr(scoring, "pack", lambda *a, **k: packed_rows.append((a[1], pack(*a, **k)))
                        or packed_rows[-1][1])
    rows = [{"prompt": f"Q{i}: say", "chosen": " yes good" * 14 + " yes", "rejected": " no"} for i in range(10, 26)]
    model = dict(max_position_embeddings=38, rope_scaling=dict(rope_type="dynamic", factor=4.0), initializer_range=0.3)
    padded = train(EPATrainer, config(EPAConfig, tmp_path / "padded"), rows, tokenizer, **model)
    packed = train(EPATrainer, config(EPAConfig, tmp_path / "packed", padding_free=True, max_packed_length=72), rows,
                   tokenizer, **model)

    def longest_tail(attention_mask, packed_batch) -> int:
        rows, width = packed_batch.input_ids.shape
        fills = torch.bincount(packed_batch.index[attention_mask.bool()] // width, minlength=rows)
        return width - int(fills.min())

    assert any(longest_tail(mask, p) > mask.shape[1] for mask, p in packed_rows)
    assert_same_training(packed, padded)


def test_padding_free_options_are_checked(tokenizer, tmp_path):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with pytest.raises(ValueError, match="max_packed_length applies to padding_free=True or prefix_sharing only"):
        config(EPAConfig, tmp_path, max_packed_length=128)
    with pytest.raises(ValueError, match=r"max_packed_length must be >= max_length \(64\)"):
        config(EPAConfig, tmp_path, padding_free=True, max_packed_length=32)
    with pytest.raises(TypeError, match="max_packed_length must be an int or None; got float"):
        config(EPAConfig, tmp_path, padding_free=True, max_packed_length=100.0)
    AttentionInterface.register("my_sdpa", sdpa_attention_forward)
    model = build_tiny_model(len(tokenizer), 32, 2, 128, seed=0)
    model.set_attn_implementation("my_sdpa")
    with pytest.raises(ValueError, match="padding_free=True: model: LlamaForCausalLM uses attn_implementation="
                                         "'my_sdpa', which does not keep packed sequences apart"):
        EPATrainer(model=model, ref_model=copy.deepcopy(model), args=config(EPAConfig, tmp_path, padding_free=True),
                   train_dataset=Dataset.from_list(standard_rows()), processing_class=tokenizer)
    from test_models import build

    mixtral = build("mixtral", vocab_size=len(tokenizer), max_position_embeddings=128, output_router_logits=True,
                    router_aux_loss_coef=0.5)
    with pytest.raises(ValueError, match="padding_free=True: model: padding-free batches cannot give an MoE model's "
                                         "router load-balancing loss"):
        EPATrainer(model=mixtral, ref_model=copy.deepcopy(mixtral), args=config(EPAConfig, tmp_path,
                   padding_free=True), train_dataset=Dataset.from_list(standard_rows()), processing_class=tokenizer)


# --- refused up front --------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(loss_type="exo_pair"), "Label smoothing must be greater than 0.0 when using 'exo_pair' loss"),
    (dict(loss_type=["sigmoid", "kto"]), "loss_type must be one of ['sigmoid', 'hinge', 'ipo', 'exo_pair'"),
    (dict(loss_type=["epa", "bco_pair"]), "loss_type 'epa' takes at most one 'sft' beside it"),
    (dict(loss_type=["epa", "sft", "sft"]), "loss_type 'epa' takes at most one 'sft' beside it"),
    (dict(loss_type=["epa", "sft"], loss_weights=[0.0, 1.0]), "loss_weights must be finite numbers >= 0, the one of "
                                                                "'epa' > 0"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, math.inf]), "loss_weights must be finite numbers"),
    (dict(loss_type="epa", num_weak=4), "need per_device_train_batch_size >= num_weak + 1 = 5; got 4"),
    (dict(loss_type="sigmoid", num_weak=1), "num_weak applies to loss_type='epa' only"),
    (dict(loss_type="epa", num_weak=-1), "num_weak must be >= 0"),
    (dict(loss_type="epa", weak_weight=-0.5), "weak_weight must be a finite number >= 0"),
    (dict(loss_type="epa", f_divergence_type="js_divergence"), "f_divergence_type must be 'reverse_kl' for "
                                                                 "loss_type='epa'"),
    (dict(loss_type=["sigmoid", "bco_pair"], f_divergence_type="js_divergence"),
     "`f_divergence_type='js_divergence'` is only supported for the following loss types"),
    (dict(loss_type="epa", ld_alpha=0.5), "ld_alpha does not apply to loss_type='epa'"),
    (dict(loss_type="epa", use_weighting=True), "use_weighting=True (WPO's per-pair weights) does not apply to "
                                                "loss_type='epa'"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting (WPO) is not implemented for 'aot' or 'aot_unpaired'"),
    (dict(loss_type=["sigmoid", "sft"], use_weighting=True), "use_weighting (WPO) with the 'sft' loss type fails "
                                                             "inside TRL 1.16's DPOTrainer"),
    (dict(loss_type="robust", label_smoothing=0.5), r"label_smoothing must lie in \[0, 0.5\)"),
    (dict(loss_type="epa", label_smoothing=0.1), "label_smoothing does not apply to loss_type='epa'"),
    (dict(loss_type="epa", weak_correction="exact"), "weak_correction must be 'none' or 'importance'"),
    (dict(loss_type="epa", weak_correction="importance"), "weak_correction corrects weak negatives: it needs num_weak > 0"),
    (dict(loss_type="epa", num_weak=1, weak_correction="importance", weak_correction_prompts=1),
     r"weak_correction_prompts must be >= 2"),
])
def test_unsupported_configurations_are_refused_by_the_config(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message) if "\\" not in message else message):
        config(EPAConfig, tmp_path, **overrides)


def test_a_plain_dpo_config_is_checked_the_same_way(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="Label smoothing must be greater than 0.0 when using 'exo_pair'"):
        EPATrainer(model=build_tiny_model(len(tokenizer), 32, 2, 128, seed=0), args=config(
            DPOConfig, tmp_path, loss_type="exo_pair"), train_dataset=Dataset.from_list(standard_rows()),
            processing_class=tokenizer)


def _model_with_an_unknown_logit_transform(tokenizer):
    """A Llama whose forward scales its logits, which no table entry of epa_ext.causal_lm says."""
    from transformers import LlamaForCausalLM

    class ScaledLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
            output = super().forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                                     **kwargs)
            output.logits = output.logits * 3.0
            return output

    return ScaledLlama(build_tiny_model(len(tokenizer), 32, 2, 128, seed=0).config)


@pytest.mark.parametrize("case,message", [
    ("no-rejected", "train_dataset has no 'rejected' column"),
    ("list-for-dpo", "'rejected' holds a list of answers per row; loss_type='sigmoid' takes one"),
    ("short-last-batch", "leave a last batch of 1, too few for num_weak = 1"),
    ("precomputed-weak-without-reference", "precompute_ref_log_probs=True with num_weak > 0"),
    ("unknown-logit-transform", "ScaledLlama: its own logits are not log-softmax-equal to scale * (hidden @ "
                                "lm_head.weight.T + bias) with a softcap"),
    ("eval-batch-too-small", "need per_device_eval_batch_size >= num_weak + 1 = 3; got 2"),
    ("iterable-without-num-strong", "loss_type='epa' on an IterableDataset needs num_strong"),
])
def test_unsupported_setups_are_refused_before_training(case, message, tokenizer, tmp_path):
    rows, options, model, eval_rows = standard_rows(), {}, None, None
    if case == "no-rejected":
        rows = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in rows]
    elif case == "list-for-dpo":
        rows = pick_rows()
    elif case == "short-last-batch":
        rows, options = pick_rows(17), dict(loss_type="epa", num_weak=1)
    elif case == "precomputed-weak-without-reference":
        options = dict(loss_type="epa", num_weak=1, precompute_ref_log_probs=True)
    elif case == "unknown-logit-transform":
        model = _model_with_an_unknown_logit_transform(tokenizer)
    elif case == "eval-batch-too-small":
        options, eval_rows = dict(loss_type="epa", num_weak=2, per_device_eval_batch_size=2), standard_rows(4)
    elif case == "iterable-without-num-strong":
        rows, options = pick_rows(), dict(loss_type="epa")
    model = model or build_tiny_model(len(tokenizer), 32, 2, 128, seed=0)
    ref_model = None if case == "precomputed-weak-without-reference" else copy.deepcopy(model)
    dataset = Dataset.from_list(rows)
    with pytest.raises(ValueError, match=re.escape(message)):
        EPATrainer(model=model, ref_model=ref_model, args=config(EPAConfig, tmp_path, **options),
                   train_dataset=dataset.to_iterable_dataset() if case.startswith("iterable") else dataset,
                   eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tokenizer)


def test_import_needs_a_supported_trl(monkeypatch):
    """The integration overrides DPOTrainer internals of TRL 1.16 and says so for other versions."""
    import importlib
    import sys

    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    monkeypatch.delitem(sys.modules, "epa_ext.integrations.trl")
    with pytest.raises(ImportError, match=re.escape("supports TRL >=1.16,<1.17") + ".*found trl 1.17.0"):
        importlib.import_module("epa_ext.integrations.trl")


def test_weak_source_rejected_borrows_rejected_answers_only(tokenizer, tmp_path):
    """EPAConfig(weak_source="rejected") reaches the trainer's collator: every weak negative is the
    first rejected answer of another row of the batch (row j of weak_negative_sources(..,
    "rejected")), where the default borrows chosen answers too; an unknown source is refused."""
    rows = pick_rows()
    collated = {}
    for source in ("any", "rejected"):
        args = config(EPAConfig, tmp_path / source, loss_type="epa", num_weak=3, weak_source=source)
        model = build_tiny_model(len(tokenizer), 32, 2, 128, seed=0)
        trainer = EPATrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        examples = [trainer.train_dataset[i] for i in range(8)]
        inputs = trainer.data_collator(examples)
        batch, candidates = inputs["candidate_mask"].shape
        rows_of = split_rows(inputs)
        weak = []
        for b, sources in enumerate(weak_negative_sources(batch, 3, args.seed, source)):
            for c, (j, k) in enumerate(sources, start=candidates - 3):
                prompt, answer = rows_of[c * batch + b]
                assert prompt == examples[b]["prompt_ids"] and j != b
                assert answer == (examples[j]["rejected_ids"][0] if k == 1 else examples[j]["chosen_ids"])
                weak.append(k)
        collated[source] = weak
    assert set(collated["rejected"]) == {1} and set(collated["any"]) == {0, 1}
    with pytest.raises(ValueError, match="weak_source must be one of"):
        config(EPAConfig, tmp_path, loss_type="epa", num_weak=1, weak_source="chosen")
    with pytest.raises(TypeError, match="weak_source must be a str"):
        config(EPAConfig, tmp_path, loss_type="epa", num_weak=1, weak_source=1)


# --- every TRL 1.16 loss type, mixture and option: the same training ------------------------------------------


def assert_same_short_training(ours, theirs, *, ties_at_first_step: bool = False):
    """assert_same_training for runs of fewer than 5 steps: every logged number, step by step, and
    the final weights, under TRL_PARITY."""
    assert len(ours[0]) == len(theirs[0]) == ours[1].args.max_steps
    for entry, expected in zip(ours[0], theirs[0]):
        assert entry.keys() == expected.keys(), entry.keys() ^ expected.keys()
        for key, value in expected.items():
            if not (ties_at_first_step and expected["step"] == 1 and key == "rewards/accuracies"):
                assert_trl_parity(entry[key], value, f"step {expected['step']} {key}")
    assert_same_weights(ours[1].model.state_dict(), theirs[1])


# Configurations the fused DPO loss cannot express: EPATrainer computes per-token log-probs in the
# lm_head's hook (linear_token_logps) and preference.pairwise's loss.
PAIRWISE_CASES = {
    **{f"alone-{t}": dict(loss_type=t) for t in ("exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                                                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
                                                 "sigmoid_norm", "sigmoid", "robust", "hinge", "ipo")},
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "mixture-repeated-zero-weight": dict(loss_type=["hinge", "apo_zero", "sigmoid", "sigmoid"],
                                         loss_weights=[0.3, 1.0, 0.0, 0.5]),
    "sft-preference-weight-zero": dict(loss_type=["sigmoid", "sft"], loss_weights=[0.0, 1.0]),
    "forward-kl": dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    "js-divergence-ipo": dict(loss_type="ipo", f_divergence_type="js_divergence"),
    "alpha-divergence": dict(loss_type=["discopop", "sft"], f_divergence_type="alpha_divergence",
                             f_alpha_divergence_coef=0.3),
    "ld-alpha": dict(loss_type=["sigmoid", "sft"], ld_alpha=0.4),
    "ld-alpha-precomputed": dict(loss_type="sigmoid_norm", ld_alpha=0.4, precompute_ref_log_probs=True),
    "use-weighting": dict(loss_type=["sigmoid", "bco_pair"], use_weighting=True),
    "use-weighting-ld-alpha-precomputed": dict(loss_type="ipo", use_weighting=True, ld_alpha=0.0,
                                               precompute_ref_log_probs=True),
    "label-smoothing-exo": dict(loss_type="exo_pair", label_smoothing=0.2),
    "label-smoothing-aot": dict(loss_type=["aot", "robust"], label_smoothing=0.3),
}
# exo_pair needs label_smoothing > 0 (EXO's epsilon), in TRL as here
for _case in PAIRWISE_CASES.values():
    if _case["loss_type"] == "exo_pair":
        _case.setdefault("label_smoothing", 1e-3)


@pytest.mark.parametrize("case", PAIRWISE_CASES)
def test_every_trl_loss_trains_as_trl(case, tokenizer, tmp_path):
    """Two steps of EPATrainer and DPOTrainer on the same data: every logged number and the final
    weights. Step 2 starts off the reference, so the losses' slopes away from zero are compared too."""
    options = dict(max_steps=2, beta=0.5, **PAIRWISE_CASES[case])
    precompute = options.get("precompute_ref_log_probs", False)
    theirs = train(DPOTrainer, config(DPOConfig, tmp_path, **options), standard_rows(), tokenizer)
    ours = train(EPATrainer, config(EPAConfig, tmp_path, token_metrics=True, **options), standard_rows(), tokenizer)
    assert all(math.isfinite(entry["loss"]) for entry in ours[0])
    assert_same_short_training(ours, theirs, ties_at_first_step=precompute)


def test_fused_path_is_kept_where_exact(tokenizer, tmp_path):
    """sigmoid / robust / hinge / ipo, optionally with one 'sft', stay on the fused DPO loss; the
    rest takes the pairwise path (and ipo where an empty prompt makes TRL's count differ)."""
    from epa_ext.preference.loss import LossSpec
    from epa_ext.preference.pairwise import PairwiseSpec

    def spec_of(**options):
        model = build_tiny_model(len(tokenizer), 32, 2, 128, seed=0)
        trainer = EPATrainer(model=model, ref_model=copy.deepcopy(model), args=config(EPAConfig, tmp_path, **options),
                             train_dataset=Dataset.from_list(standard_rows()), processing_class=tokenizer)
        return lambda completion_mask: trainer._loss_spec(completion_mask)

    prompted = torch.tensor([[0, 1], [0, 1]])
    assert isinstance(spec_of(loss_type=["ipo", "sft"], loss_weights=[2.0, 0.5])(prompted), LossSpec)
    assert isinstance(spec_of(loss_type="ipo")(torch.tensor([[1, 1], [0, 1]])), PairwiseSpec)
    for options in (dict(loss_type=["sigmoid", "hinge"]), dict(loss_type="sigmoid", ld_alpha=0.5),
                    dict(loss_type="sigmoid", use_weighting=True),
                    dict(loss_type="hinge", f_divergence_type="forward_kl"),
                    dict(loss_type=["sigmoid", "sft"], loss_weights=[0.0, 1.0])):
        assert isinstance(spec_of(**options)(prompted), PairwiseSpec), options
