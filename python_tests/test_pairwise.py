"""epa_ext.preference.pairwise against TRL 1.16's DPOTrainer itself: one tiny Llama (built from a
config, fp32, CPU), one trainer, one collated batch; for every loss type, mixture and option, TRL's
``_compute_loss`` against ``pairwise_loss`` fed with per-token log-probs computed in plain torch
from the same model's logits (loss and, for representative cases, the parameters' gradients);
TRL's refusals against the spec's."""

from __future__ import annotations

import contextlib
import copy
import math
import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TQDM_DISABLE", "1")

from accelerate.state import AcceleratorState, GradientState, PartialState  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from test_trl import one_thread  # noqa: E402, F401  (test_trl's autouse fixture: one thread here too)
from epa_ext.preference import pairwise  # noqa: E402
from epa_ext.preference.pairwise import (  # noqa: E402
    LOSS_TYPES,
    PairwiseSpec,
    UnsupportedCombinationError,
    ld_token_weights,
    log_sum_squared_probs,
    pairwise_loss,
    wpo_sequence_weights,
)

# Same inputs (the very per-token log-probs TRL's _compute_loss read, recorded from its forward
# calls): the same formulas on the same tensors; they differ only where a reduction runs in another
# order (LD-DPO's w-weighted sum against TRL's shared + alpha * tail, the sft term's sum / count
# against its mean), a few ulps of a sequence sum, which the losses' slopes here (< 2) keep
# within 1e-6 of the loss. Measured: bitwise equal without LD-DPO / sft.
SAME_INPUTS_RTOL, SAME_INPUTS_ATOL = 1e-6, 1e-7
# End to end (plain torch's log_softmax of the model's logits): TRL's fused head and log_softmax
# round each token's log-prob differently (a few ulps of |log p| ~ 6, fp32); a log-ratio (policy
# minus reference, each summed over ~10 tokens) carries that absolute error, ~3e-6 measured, whatever
# its own size, and a loss passes it on times its slope (sppo_hard, ipo: up to 2(1/(2 beta) + |ratio|)
# ~ 5 here): 1.4e-5 of 7.7 measured for sppo_hard, 1.8e-6 relative.
END_TO_END_RTOL, END_TO_END_ATOL = 1e-5, 1e-6
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6
BETA = 0.5
# TRL trainer attributes _compute_loss reads, by PairwiseSpec field.
TRAINER_FIELDS = {"loss_types": "loss_types", "loss_weights": "loss_weights", "beta": "beta",
                  "label_smoothing": "label_smoothing", "f_divergence_type": "f_divergence_type",
                  "f_alpha_divergence_coef": "f_alpha_divergence_coef", "ld_alpha": "ld_alpha",
                  "use_weighting": "use_weighting"}


def preference_rows(n: int = 8) -> list[dict]:
    """Answers of different lengths within a pair (LD-DPO's tails, padding) and across pairs."""
    return [{"prompt": f"Q{i}: say", "chosen": " yes good" * (1 + i % 3), "rejected": " no bad" * (1 + (i + 1) % 4)}
            for i in range(n)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained offline on the rows' words (as python_tests/test_trl.py's)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    texts = [f"Q{i}: say yes good no bad" for i in range(40)]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def dpo_config(tmp_dir: str, **fields) -> DPOConfig:
    return DPOConfig(output_dir=tmp_dir, per_device_train_batch_size=4, bf16=False, use_cpu=True, report_to="none",
                     save_strategy="no", disable_tqdm=True, max_length=64, seed=0, beta=BETA, **fields)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def setup(tokenizer, tmp_path_factory):
    """(trainer, [batch 1, batch 2]): a DPOTrainer with a reference model (so LD-DPO reaches the
    reference too) and WPO's extra head output requested; the policy then moved off the reference
    (seeded noise), so that log-ratios, and every loss type's slopes, are not at their zero point."""
    model = tiny_llama(len(tokenizer))
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model),
                         args=dpo_config(str(tmp_path_factory.mktemp("trl")), use_weighting=True),
                         train_dataset=Dataset.from_list(preference_rows()), processing_class=tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    # Rows 0-3 and 4-7 collated directly: no sampler, whose order would depend on random state
    # left by whatever ran before in the process.
    rows = trainer.train_dataset
    return trainer, [trainer.data_collator([rows[i] for i in range(start, start + 4)]) for start in (0, 4)]


@contextlib.contextmanager
def configured(trainer: DPOTrainer, spec: PairwiseSpec):
    """The trainer's loss attributes set to the spec's for the duration (TRL reads them per call)."""
    saved = {attribute: getattr(trainer, attribute) for attribute in TRAINER_FIELDS.values()}
    saved_tau = trainer.args.discopop_tau
    for field, attribute in TRAINER_FIELDS.items():
        value = getattr(spec, field)
        setattr(trainer, attribute, list(value) if isinstance(value, tuple) else value)
    trainer.loss_weights = list(spec.weights)
    trainer.args.discopop_tau = spec.discopop_tau
    try:
        yield
    finally:
        for attribute, value in saved.items():
            setattr(trainer, attribute, value)
        trainer.args.discopop_tau = saved_tau


def trl_loss(trainer: DPOTrainer, batch: dict, spec: PairwiseSpec) -> torch.Tensor:
    with configured(trainer, spec):
        return trainer._compute_loss(trainer.model, batch, return_outputs=False)


def trl_loss_and_inputs(trainer: DPOTrainer, batch: dict, spec: PairwiseSpec):
    """(TRL's loss, per_token): per_token(model, batch) gives, as token_logps, the per-token
    log-probs (and log sum_v p_v^2 where TRL asked for it) that this very _compute_loss call read
    from the policy's and the reference's forward, recorded by forward hooks, so that ours and
    TRL's formulas see the same tensors, whatever a second forward would round differently."""
    outputs = {}
    hooks = [module.register_forward_hook(lambda _module, _args, output, name=name: outputs.setdefault(name, output))
             for name, module in (("policy", trainer.model), ("reference", trainer.ref_model))]
    try:
        loss = trl_loss(trainer, batch, spec)
    finally:
        for hook in hooks:
            hook.remove()
    scored = batch["completion_mask"][:, 1:]

    def per_token(model, _batch):
        output = outputs["policy" if model is trainer.model else "reference"]
        positions = scored.shape[1]  # TRL keeps the last ones (prompt-learning PEFT prepends some)
        log_sum_sq = output.log_sum_sq_probs
        return (output.log_probs[:, -positions:], None if log_sum_sq is None else log_sum_sq[:, -positions:],
                scored)

    return loss, per_token


def token_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p of each next token [2B, T-1], log sum_v p_v^2 there [2B, T-1], scored-token mask
    [2B, T-1]) from the model's own logits (its original forward) in plain torch, rows [chosen;
    rejected]; log sum_v p_v^2 by log_sum_squared_probs on the lm_head's input."""
    captured = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    finally:
        handle.remove()
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    hidden = captured[0][:, :-1]
    log_sum_sq = log_sum_squared_probs(hidden.reshape(-1, hidden.shape[-1]), model.get_output_embeddings().weight)
    return logps, log_sum_sq.view(logps.shape), batch["completion_mask"][:, 1:]


def our_loss(trainer: DPOTrainer, batch: dict, spec: PairwiseSpec, per_token=token_logps) -> torch.Tensor:
    """pairwise_loss on sequence quantities formed here from per_token's log-probs (plain torch by
    default, or trl_loss_and_inputs's)."""
    logps, log_sum_sq, scored = per_token(trainer.model, batch)
    with torch.no_grad():
        ref_logps, _, _ = per_token(trainer.ref_model, batch)
    chosen_scored, rejected_scored = scored.chunk(2)
    if spec.ld_alpha is None:
        weights = scored.float()
    else:
        weights = torch.cat(ld_token_weights(chosen_scored, rejected_scored, spec.ld_alpha))
    policy_chosen, policy_rejected = (logps * weights).sum(1).chunk(2)
    ref_chosen, ref_rejected = (ref_logps * weights).sum(1).chunk(2)
    plain_sums = (logps * scored).sum(1)
    chosen_tokens, rejected_tokens = batch["completion_mask"].sum(1).chunk(2)
    wpo_weights = None
    if spec.use_weighting:
        sequence_weights = wpo_sequence_weights(plain_sums, (log_sum_sq * scored).sum(1), scored.sum(1))
        wpo_weights = sequence_weights.chunk(2)[0] * sequence_weights.chunk(2)[1]
    loss, per_sequence = pairwise_loss(
        spec, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens, chosen_nll=-plain_sums.chunk(2)[0], chosen_nll_tokens=chosen_scored.sum(1),
        wpo_weights=wpo_weights)
    assert len(per_sequence) == len(spec.loss_types)
    assert all(term.shape == policy_chosen.shape for term in per_sequence)
    return loss


def assert_same_loss(trainer, batch, spec: PairwiseSpec):
    """TRL's loss against ours on TRL's own per-token log-probs (the formulas) and on plain torch's
    (end to end); returns (ours end to end, theirs)."""
    theirs, trl_inputs = trl_loss_and_inputs(trainer, batch, spec)
    same_inputs = our_loss(trainer, batch, spec, per_token=trl_inputs)
    torch.testing.assert_close(same_inputs, theirs, rtol=SAME_INPUTS_RTOL, atol=SAME_INPUTS_ATOL)
    ours = our_loss(trainer, batch, spec)
    torch.testing.assert_close(ours, theirs, rtol=END_TO_END_RTOL, atol=END_TO_END_ATOL)
    return ours, theirs


def gradients(trainer, loss: torch.Tensor) -> list[torch.Tensor]:
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, parameters, allow_unused=True))


def assert_same_gradients(trainer, batch, spec: PairwiseSpec):
    ours, theirs = assert_same_loss(trainer, batch, spec)
    for our_grad, their_grad in zip(gradients(trainer, ours), gradients(trainer, theirs)):
        torch.testing.assert_close(our_grad, their_grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def spec_for(loss_type: str, **fields) -> PairwiseSpec:
    if loss_type == "exo_pair":
        fields.setdefault("label_smoothing", 1e-3)
    return PairwiseSpec(loss_types=loss_type, beta=BETA, **fields)


# --- every loss type, alone ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_equals_trl(setup, loss_type):
    trainer, (batch, _) = setup
    ours, _ = assert_same_loss(trainer, batch, spec_for(loss_type))
    assert math.isfinite(ours.item()) and ours.item() != 0.0


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "aot", "sft", "discopop"])
def test_gradients_equal_trl(setup, loss_type):
    trainer, (batch, _) = setup
    assert_same_gradients(trainer, batch, spec_for(loss_type))


def test_policy_differs_from_reference(setup):
    """The batch is off the zero point: a loss equal to TRL's only because every log-ratio is 0
    would prove nothing."""
    trainer, (batch, _) = setup
    logps, _, scored = token_logps(trainer.model, batch)
    ref_logps, _, _ = token_logps(trainer.ref_model, batch)
    assert ((logps - ref_logps) * scored).sum(1).abs().min() > 0.05


# --- mixtures, options --------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_types, loss_weights", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    (["sigmoid", "bco_pair", "sft"], None),
    (["ipo", "sft"], [1.0, 0.5]),
    (["hinge", "apo_zero", "nca_pair", "sigmoid_norm"], [0.3, 1.0, 2.0, 0.0]),
    (["sigmoid", "sigmoid"], [1.0, 0.5]),  # a repeated type counts twice, as in TRL
])
def test_mixtures_equal_trl(setup, loss_types, loss_weights):
    trainer, (batch, _) = setup
    assert_same_loss(trainer, batch, PairwiseSpec(loss_types=loss_types, loss_weights=loss_weights, beta=BETA))


def test_mpo_gradients_equal_trl(setup):
    trainer, (batch, _) = setup
    assert_same_gradients(trainer, batch, PairwiseSpec(loss_types=["sigmoid", "bco_pair", "sft"],
                                                       loss_weights=[0.8, 0.2, 1.0], beta=BETA))


@pytest.mark.parametrize("f_divergence_type, coef", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                                     ("alpha_divergence", 0.5), ("alpha_divergence", 1.5),
                                                     ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", sorted(pairwise.F_DIVERGENCE_LOSS_TYPES))
def test_f_divergences_equal_trl(setup, loss_type, f_divergence_type, coef):
    trainer, (batch, _) = setup
    assert_same_loss(trainer, batch, spec_for(loss_type, f_divergence_type=f_divergence_type,
                                              f_alpha_divergence_coef=coef))


def test_f_divergence_gradients_equal_trl(setup):
    trainer, (batch, _) = setup
    assert_same_gradients(trainer, batch, spec_for("sigmoid", f_divergence_type="alpha_divergence",
                                                   f_alpha_divergence_coef=0.3))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", "aot", "sft", "sigmoid_norm"])
@pytest.mark.parametrize("ld_alpha", [0.0, 0.4])
def test_ld_alpha_equals_trl(setup, loss_type, ld_alpha):
    trainer, (batch, _) = setup
    assert_same_loss(trainer, batch, spec_for(loss_type, ld_alpha=ld_alpha))


def test_ld_alpha_changes_the_loss_and_gradients_equal_trl(setup):
    trainer, (batch, _) = setup
    spec = spec_for("sigmoid", ld_alpha=0.4)
    assert_same_gradients(trainer, batch, spec)
    assert abs(our_loss(trainer, batch, spec).item() - our_loss(trainer, batch, spec_for("sigmoid")).item()) > 1e-4


def test_ld_token_weights():
    chosen = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]])
    rejected = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    chosen_weights, rejected_weights = ld_token_weights(chosen, rejected, 0.25)
    assert chosen_weights.tolist() == [[0, 1, 1, 0.25, 0], [0, 0, 1, 1, 0]]
    assert rejected_weights.tolist() == [[0, 1, 1, 0, 0], [1, 1, 0.25, 0.25, 0]]


@pytest.mark.parametrize("loss_types", [["sigmoid"], ["hinge"], ["ipo"], ["bco_pair"], ["discopop"],
                                        ["sigmoid_norm"], ["sigmoid", "bco_pair"]])
def test_use_weighting_equals_trl(setup, loss_types):
    trainer, (batch, _) = setup
    assert_same_loss(trainer, batch, PairwiseSpec(loss_types=loss_types, beta=BETA, use_weighting=True))


def test_use_weighting_gradients_equal_trl(setup):
    trainer, (batch, _) = setup
    spec = PairwiseSpec(loss_types=["sigmoid", "bco_pair"], beta=BETA, use_weighting=True)
    assert_same_gradients(trainer, batch, spec)
    assert abs(our_loss(trainer, batch, spec).item()
               - our_loss(trainer, batch, PairwiseSpec(loss_types=["sigmoid", "bco_pair"], beta=BETA)).item()) > 1e-3


def test_hinge_with_weighting_fails_in_trl_backward_not_here(setup):
    """TRL 1.16 multiplies relu's output, which relu's backward reads, in place: its loss is right
    but it cannot step. Ours: the same loss, and a gradient."""
    trainer, (batch, _) = setup
    spec = PairwiseSpec(loss_types="hinge", beta=BETA, use_weighting=True)
    theirs = trl_loss(trainer, batch, spec)
    with pytest.raises(RuntimeError, match="inplace"):
        theirs.backward()
    trainer.model.zero_grad()
    assert all(torch.isfinite(g).all() for g in gradients(trainer, our_loss(trainer, batch, spec)) if g is not None)


@pytest.mark.parametrize("loss_type", sorted(pairwise.LABEL_SMOOTHING_LOSS_TYPES) + ["sigmoid", "bco_pair"])
def test_label_smoothing_equals_trl(setup, loss_type):
    """robust, exo_pair, aot, aot_unpaired read it; TRL 1.16 ignores it elsewhere (sigmoid: no cDPO)."""
    trainer, (batch, _) = setup
    smoothed, _ = assert_same_loss(trainer, batch, spec_for(loss_type, label_smoothing=0.2))
    unsmoothed = our_loss(trainer, batch, spec_for(loss_type, label_smoothing=1e-3 if loss_type == "exo_pair" else 0))
    assert (abs(smoothed.item() - unsmoothed.item()) > 1e-4) == (loss_type in pairwise.LABEL_SMOOTHING_LOSS_TYPES)


def test_discopop_tau_equals_trl(setup):
    trainer, (batch, _) = setup
    assert_same_loss(trainer, batch, spec_for("discopop", discopop_tau=0.7))


# --- bco_pair: no running state in TRL 1.16 -------------------------------------------------------------


def test_bco_pair_has_no_running_state(setup):
    """Older TRL shifted bco_pair's rewards by a running mean; 1.16's is stateless: on two
    consecutive batches each loss equals ours, and batch 2's is the same whether or not batch 1
    came first (a running mean would shift it), so there is nothing to checkpoint."""
    trainer, (first, second) = setup
    spec = spec_for("bco_pair")
    second_alone = trl_loss(trainer, second, spec).item()
    assert_same_loss(trainer, first, spec)
    _, second_after_first = assert_same_loss(trainer, second, spec)
    assert second_after_first.item() == second_alone
    assert not any("running" in name.lower() or "moment" in name.lower() for name in vars(trainer))


# --- the WPO input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_log_sum_squared_probs(softcap):
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(70, 16, generator=generator), torch.randn(50, 16, generator=generator)
    bias = torch.randn(50, generator=generator)
    logits = (hidden.double() @ weight.double().T + bias.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    truth = torch.log((torch.softmax(logits, -1) ** 2).sum(-1))
    ours = log_sum_squared_probs(hidden.requires_grad_(), weight, bias, softcap)
    assert not ours.requires_grad and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-5)


# --- refusals ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def accelerate_state_kept():
    """A new DPOConfig resets accelerate's process-wide state, which the module's trainer still
    reads: restored afterwards."""
    states = (PartialState, AcceleratorState, GradientState)
    saved = [dict(state._shared_state) for state in states]
    try:
        yield
    finally:
        for state, shared in zip(states, saved):
            state._shared_state.clear()
            state._shared_state.update(shared)


def trl_refusal(tokenizer, tmp_path, **fields):
    """The exception TRL 1.16 raises for these DPOConfig fields (its config or its trainer's __init__)."""
    with accelerate_state_kept(), pytest.raises(Exception) as raised:
        model = tiny_llama(len(tokenizer))
        DPOTrainer(model=model, args=dpo_config(str(tmp_path), **fields),
                   train_dataset=Dataset.from_list(preference_rows(2)), processing_class=tokenizer)
    return raised.value


@pytest.mark.parametrize("fields", [
    dict(loss_type=["sigmoid", "bco_pair"], f_divergence_type="js_divergence"),
    dict(loss_type=["aot"], use_weighting=True),
    dict(loss_type=["exo_pair"]),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]),
])
def test_refusals_match_trl(tokenizer, tmp_path, fields):
    theirs = trl_refusal(tokenizer, tmp_path, **fields)
    spec_fields = {"loss_types": fields.pop("loss_type"), **fields}
    with pytest.raises(type(theirs)) as ours:
        PairwiseSpec(**spec_fields)
    assert isinstance(ours.value, ValueError)
    if isinstance(theirs, NotImplementedError):
        assert isinstance(ours.value, UnsupportedCombinationError)


def test_unknown_loss_type_matches_trl(setup):
    trainer, (batch, _) = setup
    with configured(trainer, PairwiseSpec()):
        trainer.loss_types, trainer.loss_weights = ["sigmoid", "kto"], [1.0, 1.0]
        with pytest.raises(ValueError, match="Unknown loss type"):
            trainer._compute_loss(trainer.model, batch, return_outputs=False)
    with pytest.raises(ValueError, match="Unknown loss type.*'kto'"):
        PairwiseSpec(loss_types=["sigmoid", "kto"])


def test_sft_with_weighting_fails_in_trl_and_is_refused_here(setup):
    trainer, (batch, _) = setup
    spec = PairwiseSpec(loss_types="sigmoid", use_weighting=True)
    with configured(trainer, spec):
        trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, 1.0]
        with pytest.raises(RuntimeError):
            trainer._compute_loss(trainer.model, batch, return_outputs=False)
    with pytest.raises(ValueError, match="use_weighting.*'sft'"):
        PairwiseSpec(loss_types=["sigmoid", "sft"], use_weighting=True)


def test_robust_smoothing_out_of_range_warns_as_trl():
    with pytest.warns(UserWarning, match=r"\[0.0, 0.5\) for the 'robust' loss"):
        PairwiseSpec(loss_types="robust", label_smoothing=0.5)


@pytest.mark.parametrize("fields, error", [
    (dict(loss_types=[]), ValueError),
    (dict(loss_types=["sigmoid", 3]), TypeError),
    (dict(loss_types=7), TypeError),
    (dict(loss_weights=["1"]), TypeError),
    (dict(beta="0.1"), TypeError),
    (dict(ld_alpha="half"), TypeError),
    (dict(use_weighting=1), TypeError),
    (dict(f_divergence_type="kl"), ValueError),
])
def test_bad_fields(fields, error):
    with pytest.raises(error, match=next(iter(fields)).rstrip("s")):
        PairwiseSpec(**fields)


def test_bad_inputs():
    values = torch.zeros(3)
    with pytest.raises(ValueError, match="chosen_tokens and rejected_tokens"):
        pairwise_loss(PairwiseSpec(loss_types="ipo"), values, values, values, values)
    with pytest.raises(ValueError, match="chosen_nll"):
        pairwise_loss(PairwiseSpec(loss_types="sft"), values, values, values, values)
    with pytest.raises(ValueError, match="wpo_weights"):
        pairwise_loss(PairwiseSpec(use_weighting=True), values, values, values, values)
    with pytest.raises(ValueError, match="wpo_weights"):
        pairwise_loss(PairwiseSpec(), values, values, values, values, wpo_weights=values)
    with pytest.raises(ValueError, match=r"ref_rejected must have shape \[B\] = \[3\]"):
        pairwise_loss(PairwiseSpec(), values, values, values, torch.zeros(4))
    with pytest.raises(TypeError, match="spec"):
        pairwise_loss({"loss_types": "sigmoid"}, values, values, values, values)
