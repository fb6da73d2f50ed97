"""--prefix-sharing in epa-train and EPATrainer's prefix_sharing (issue 35): the prompt-shared rows
of the preference core (epa_ext/preference/prefix.py; the rows themselves are tested in
test_prefix_sharing.py) give the padded batches' reference and policy log-probs, losses and
gradients (DPO and EPA with strong and weak negatives, with and without importance weights, a model
and a precomputed reference, LoRA, gradient checkpointing), whole runs train as padded ones, the
token ratio decides auto, and what cannot be shared is refused (on) or trained unshared (auto)."""

from __future__ import annotations

import pytest
import torch
from conftest import PREFS, TINY, final_weights, initial_tiny_model, train_in_process
from numerics import WEIGHT_CHANGE_RTOL, assert_paths_agree
from test_train_packing import EPA_STRONG_AND_WEAK, scored, set_up_run

from epa_ext.preference.options import MIN_SHARED_TOKEN_RATIO
from epa_ext.preference.prefix import Shared, shared_token_ratio
from epa_ext.train.config import ConfigError

# K = 2 strong and M = 3 weak negatives: six candidates per prompt share it
EPA_SIX_CANDIDATES = ["--loss", "epa", "--num-strong", "2", "--num-weak", "3"]


@pytest.mark.parametrize("flags", [
    ["--loss", "dpo", "--ref", "precompute"],
    ["--loss", "dpo", "--lora-r", "4", "--gradient-checkpointing"],
    [*EPA_SIX_CANDIDATES, "--ref", "model", "--gradient-checkpointing"],
    [*EPA_SIX_CANDIDATES, "--weak-correction", "importance", "--weak-correction-prompts", "3"],
    [*EPA_STRONG_AND_WEAK, "--ref", "precompute", "--lora-r", "4"],
], ids=["dpo-precomputed", "dpo-lora-checkpointing", "epa-model-reference-checkpointing", "epa-importance-weights",
        "epa-lora-precomputed"])
def test_prefix_shared_batches_score_as_padded_ones(flags, tmp_path):
    """Two runs set up alike (same seed, same initial weights), one with --prefix-sharing on (rows
    bounded so that groups share rows): per batch,
    the same reference log-probs (scored now or precomputed), policy log-probs, logit sums, loss
    and gradients, each prompt through the decoder once."""
    padded = set_up_run(tmp_path, "padded", *flags)
    bound = "200" if "dpo" in flags else "500"  # a DPO group is two answers long, an EPA group six
    shared = set_up_run(tmp_path, "shared", *flags, "--prefix-sharing", "on", "--max-packed-length", bound)
    several_groups_in_a_row = False
    with padded, shared:
        for micro_index in range(3):
            ids = padded.order(micro_index)[:4]
            batch, *expected = scored(padded, ids)
            shared_batch, *actual = scored(shared, ids)
            assert batch.packed is None and isinstance(shared_batch.packed, Shared)
            prompts = [len(padded.data.train.examples[i].prompt_ids) for i in ids]
            assert shared_token_ratio(batch.attention_mask, prompts, batch.num_candidates) > 1.1
            several_groups_in_a_row |= shared_batch.packed.input_ids.shape[0] < len(ids)
            for what, a, e in zip(("reference log-probs", "loss", "policy log-probs", "logit sums"), actual, expected):
                assert_paths_agree(a, e, what=f"batch {micro_index}: {what}")
            grads, expected_grads = actual[-1], expected[-1]
            assert grads.keys() == expected_grads.keys() and grads
            for name, grad in grads.items():
                assert_paths_agree(grad, expected_grads[name], what=f"batch {micro_index}: gradient of {name}")
    assert several_groups_in_a_row


def test_a_prefix_shared_run_trains_as_a_padded_one(tmp_path):
    """Whole runs, evaluation included: the same metrics (but the speed and the decoder tokens
    saved, which only the shared run logs) and final weights."""
    args = ["--max-steps", "3", "--batch-size", "4", "--eval-fraction", "0.2", *EPA_SIX_CANDIDATES]
    padded = train_in_process(tmp_path / "padded", *args)
    shared = train_in_process(tmp_path / "shared", *args, "--prefix-sharing", "on")
    assert len(shared) == len(padded) == 4
    for ours, theirs in zip(shared, padded):
        saved = [key for key in ours if key.endswith("decoder_tokens_saved")]
        assert len(saved) == 1 and 0 < ours.pop(saved[0]) < 1
        assert ours.keys() == theirs.keys()
        for key in theirs.keys() - {"tokens_per_second"}:
            assert_paths_agree(ours[key], theirs[key], what=f"step {theirs['step']} {key}")
    expected, initial = final_weights(tmp_path / "padded"), initial_tiny_model(tmp_path / "padded").state_dict()
    for key, value in final_weights(tmp_path / "shared").items():
        assert (value - expected[key]).norm() <= WEIGHT_CHANGE_RTOL * (expected[key] - initial[key]).norm(), key


def test_auto_shares_the_batches_whose_token_ratio_pays(tmp_path):
    """--prefix-sharing auto shares a batch where C(P + A) / (P + sum A) reaches
    MIN_SHARED_TOKEN_RATIO and leaves the others padded (or packed, with --padding-free)."""
    from epa_ext.preference.candidates import make_batch

    cpu = torch.device("cpu")
    seen = set()
    for name, flags in (("dpo", ["--loss", "dpo", "--padding-free"]), ("epa", EPA_SIX_CANDIDATES)):
        with set_up_run(tmp_path, name, *flags, "--prefix-sharing", "auto") as training:
            layout = training.data.layout
            assert layout.min_shared_ratio == MIN_SHARED_TOKEN_RATIO
            for micro_index in range(8):
                ids = training.order(micro_index)[:4]
                batch = make_batch(training.data.train, ids, layout, cpu)
                prompts = [len(training.data.train.examples[i].prompt_ids) for i in ids]
                pays = shared_token_ratio(batch.attention_mask, prompts, batch.num_candidates) >= MIN_SHARED_TOKEN_RATIO
                assert isinstance(batch.packed, Shared) == pays
                assert pays or batch.packed is None if name == "epa" else batch.packed is not None
                seen.add(pays)
    assert seen == {True, False}, "the data should give batches on both sides of the ratio"


def test_a_model_that_cannot_share_is_refused_with_on_and_trained_unshared_with_auto(tmp_path, monkeypatch,
                                                                                     capsys):
    """A model whose attention the probe refuses (here: an implementation other than sdpa and
    eager): --prefix-sharing on stops in one line naming it, auto says so once and trains as
    without the option."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from epa_ext.train import modeling

    AttentionInterface.register("my_sdpa", sdpa_attention_forward)
    load_initial_model = modeling.load_initial_model

    def with_custom_attention(cfg, tokenizer):
        model = load_initial_model(cfg, tokenizer)
        model.set_attn_implementation("my_sdpa")
        return model

    monkeypatch.setattr(modeling, "load_initial_model", with_custom_attention)
    with pytest.raises(ConfigError, match="--prefix-sharing on: .*LlamaForCausalLM.*'my_sdpa'"):
        set_up_run(tmp_path, "on", *EPA_SIX_CANDIDATES, "--prefix-sharing", "on")
    with set_up_run(tmp_path, "auto", *EPA_SIX_CANDIDATES, "--prefix-sharing", "auto") as training:
        assert training.data.layout.shared_attention is None
    assert capsys.readouterr().err.count("--prefix-sharing auto: not sharing prompts") == 1


@pytest.mark.parametrize("flags,message", [
    (["--prefix-sharing", "sometimes"], "--prefix-sharing: invalid value 'sometimes'; allowed: auto, on, off"),
    (["--max-packed-length", "200"], "--max-packed-length applies to --padding-free or --prefix-sharing only"),
])
def test_prefix_sharing_options_are_checked(flags, message, tmp_path):
    from epa_ext.train.config import parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config(["--dataset", str(PREFS), "--output-dir", str(tmp_path), *TINY, *flags]).validate()


# --- EPATrainer ----------------------------------------------------------------------------------------


trl_tests = pytest.importorskip("test_trl", reason="EPATrainer's tests need TRL")


@pytest.fixture(scope="module")
def tokenizer():
    return trl_tests.make_tokenizer()


@pytest.mark.parametrize("options,lora", [
    (dict(loss_type="sigmoid"), False),
    (dict(loss_type="epa", num_weak=3, gradient_checkpointing=True), False),
    (dict(loss_type="sigmoid", precompute_ref_log_probs=True), True),
], ids=["dpo-reference-model", "epa-weak-checkpointing", "dpo-lora-precomputed"])
def test_epa_trainer_with_prefix_sharing_trains_as_padded_batches(options, lora, tokenizer, tmp_path, monkeypatch):
    """prefix_sharing='on': the policy and the reference score each batch's prompts once (the
    batches were shared: recorded), and the logged numbers and final weights are those of padded
    batches."""
    import epa_ext.integrations.trl.trainer as trainer_module

    shared_batches = []
    share = trainer_module.share
    monkeypatch.setattr(trainer_module, "share", lambda *a, **k: shared_batches.append(share(*a, **k))
                        or shared_batches[-1])
    rows = trl_tests.pick_rows() if options["loss_type"] == "epa" else trl_tests.standard_rows()
    ref_model = True if options.get("num_weak") else None
    config, train = trl_tests.config, trl_tests.train
    padded = train(trl_tests.EPATrainer, config(trl_tests.EPAConfig, tmp_path / "padded", **options), rows, tokenizer,
                   lora=lora, ref_model=ref_model)
    assert not shared_batches
    args = config(trl_tests.EPAConfig, tmp_path / "shared", prefix_sharing="on", **options)
    shared = train(trl_tests.EPATrainer, args, rows, tokenizer, lora=lora, ref_model=ref_model)
    assert shared_batches and all(batch.saved_share > 0 for batch in shared_batches)
    # at the first step policy and reference are one model: a margin's sign is rounding (accuracies)
    trl_tests.assert_same_training(shared, padded, ties_at_first_step=True)


def test_epa_trainer_refuses_what_cannot_be_shared_or_trains_it_unshared(tokenizer, tmp_path):
    """An attention implementation the shared rows' masks do not reach: prefix_sharing='on' is
    refused at init naming the model, 'auto' warns once and trains without sharing."""
    import copy

    from datasets import Dataset
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from epa_ext.train.modeling import build_tiny_model

    AttentionInterface.register("my_sdpa", sdpa_attention_forward)
    model = build_tiny_model(len(tokenizer), 32, 2, 128, seed=0)
    model.set_attn_implementation("my_sdpa")
    rows = Dataset.from_list(trl_tests.standard_rows())
    with pytest.raises(ValueError, match="prefix_sharing='on': model: .*LlamaForCausalLM.*'my_sdpa'"):
        trl_tests.EPATrainer(model=model, ref_model=copy.deepcopy(model), train_dataset=rows,
                             args=trl_tests.config(trl_tests.EPAConfig, tmp_path, prefix_sharing="on"),
                             processing_class=tokenizer)
    with pytest.warns(UserWarning, match="prefix_sharing='auto': not sharing prompts: model: "):
        trainer = trl_tests.EPATrainer(model=model, ref_model=copy.deepcopy(model), train_dataset=rows,
                                       args=trl_tests.config(trl_tests.EPAConfig, tmp_path, prefix_sharing="auto"),
                                       processing_class=tokenizer)
    assert trainer._shared_attention is None
