"""Padding-free and length-grouped batches in epa-train: packing itself (rows, position ids, the
gather back), the same per-sequence log-probs, losses and gradients as padded batches (DPO and EPA
with strong and weak negatives, a model and a precomputed reference, LoRA, gradient checkpointing),
whole runs, bitwise resume, what is refused, and the length-grouped batch order. (DDP:
test_train_distributed.py.)"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from conftest import PREFS, TINY, final_weights, initial_tiny_model, read_metrics, train_in_process, train_losses
from numerics import WEIGHT_CHANGE_RTOL, assert_paths_agree

from epa_ext.train.config import ConfigError

CPU = torch.device("cpu")


# --- packing -------------------------------------------------------------------------------------


def right_padded(lengths: list[int], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(lengths)
    input_ids = torch.arange(1, len(lengths) * width + 1).view(len(lengths), width)
    attention_mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return input_ids * attention_mask, attention_mask


def test_pack_puts_every_sequence_whole_in_a_bounded_row_with_positions_restarting():
    from epa_ext.train.packing import pack, unpack

    lengths = [5, 3, 9, 2, 4, 1]
    input_ids, attention_mask = right_padded(lengths, width=11)
    packed = pack(input_ids, attention_mask, max_row_tokens=8, pad_id=-1)
    rows, width = packed.input_ids.shape
    assert width == 9  # the longest row: the 9-token sequence, longer than the bound, alone
    assert packed.num_tokens == rows * width < input_ids.numel()
    flat_ids, flat_positions = packed.input_ids.reshape(-1), packed.position_ids.reshape(-1)
    for r, n in enumerate(lengths):
        where = packed.index[r, :n]
        assert torch.equal(flat_ids[where], input_ids[r, :n])  # the sequence, whole and in order
        assert torch.equal(flat_positions[where], torch.arange(n))
        assert int(where[0]) // width == int(where[-1]) // width  # in one row
    real = packed.index[attention_mask.bool()]
    assert real.unique().numel() == sum(lengths)  # no two tokens share a position
    fills = torch.zeros(rows, dtype=torch.long).index_add_(0, real // width, torch.ones_like(real))
    assert all(fill <= 8 or fill == 9 for fill in fills.tolist())
    assert (flat_ids == -1).sum() == packed.num_tokens - sum(lengths)  # free tails hold pad_id
    # the gather back is the padded layout, also for hidden states
    hidden = torch.randn(rows, width, 3)
    gathered = unpack(hidden, packed)
    assert gathered.shape == (len(lengths), 11, 3)
    assert torch.equal(gathered[attention_mask.bool()], hidden.reshape(-1, 3)[real])

    one_row = pack(input_ids, attention_mask, max_row_tokens=None, pad_id=0)
    assert one_row.input_ids.shape == (1, sum(lengths))


def test_rows_are_filled_evenly_where_first_fit_leaves_one_fuller():
    """First fit, longest first, packs [7, 4, 4, 4, 1] into rows of 12 as [7 4 1] and [4 4]: width
    12; the even fill of the same two rows, [7 4] and [4 4 1], needs 11."""
    from epa_ext.train.packing import pack_lengths

    lengths = [7, 4, 4, 4, 1]
    rows = pack_lengths(lengths, 12)
    assert sorted(sorted(lengths[i] for i in row) for row in rows) == [[1, 4, 4], [4, 7]]
    assert pack_lengths([9, 5, 5, 3, 3], 8) == [[0], [1, 3], [2, 4]]  # an overlong sequence: first fit


def test_pack_refuses_left_padding_and_a_bound_below_one():
    from epa_ext.train.packing import pack

    input_ids, attention_mask = right_padded([3, 2])
    with pytest.raises(ValueError, match="needs right-padded rows"):
        pack(input_ids, attention_mask.flip(-1), 8, 0)
    with pytest.raises(ValueError, match="max_row_tokens must be >= 1 or None; got 0"):
        pack(input_ids, attention_mask, 0, 0)


# --- the same numbers as padded batches ----------------------------------------------------------


def set_up_run(tmp_path, name: str, *flags: str):
    from epa_ext.train.config import parse_config
    from epa_ext.train.runtime import Runtime
    from epa_ext.train.trainer import set_up

    cfg = parse_config(["--dataset", str(PREFS), "--output-dir", str(tmp_path / name), *TINY, "--batch-size", "4",
                        "--eval-fraction", "0", *flags])
    return set_up(cfg, Runtime(0, 1, CPU))


def scored(training, ids: list[int]):
    """(batch, reference log-probs, loss, policy log-probs, logit sums, gradients) of one batch."""
    from epa_ext.train.batching import make_batch

    batch = make_batch(training.data.train, ids, training.data.layout, CPU)
    ref = training.reference.logps("train", batch)
    training.optimizer.zero_grad(set_to_none=True)
    loss, seq, logit_sums, _ = training.loss_module(batch.input_ids, batch.attention_mask, batch.labels, ref,
                                                    batch.candidate_mask, None, batch.packed)
    loss.backward()
    grads = {name: p.grad for name, p in training.loss_module.named_parameters() if p.grad is not None}
    return batch, ref, loss, seq, logit_sums, grads


EPA_STRONG_AND_WEAK = ["--loss", "epa", "--num-strong", "2", "--num-weak", "2"]


@pytest.mark.parametrize("flags", [
    ["--loss", "dpo", "--ref", "precompute"],
    ["--loss", "dpo", "--lora-r", "4"],
    [*EPA_STRONG_AND_WEAK, "--ref", "model", "--gradient-checkpointing"],
    [*EPA_STRONG_AND_WEAK, "--ref", "precompute", "--lora-r", "4"],
], ids=["dpo-precomputed", "dpo-lora", "epa-model-reference-checkpointing", "epa-lora-precomputed"])
def test_packed_batches_score_as_padded_ones(flags, tmp_path):
    """Two runs set up alike (same seed, same initial weights), one with --padding-free (rows of
    at most 120 tokens, so a batch packs into several): per batch, the same reference log-probs
    (scored now or precomputed), policy log-probs per sequence, logit sums, loss and gradients."""
    padded = set_up_run(tmp_path, "padded", *flags)
    packed = set_up_run(tmp_path, "packed", *flags, "--padding-free", "--max-packed-length", "120")
    several_rows = False
    with padded, packed:
        for micro_index in range(3):
            ids = padded.order(micro_index)[:4]
            batch, *expected = scored(padded, ids)
            packed_batch, *actual = scored(packed, ids)
            assert batch.packed is None and packed_batch.packed is not None
            assert packed_batch.packed.num_tokens < batch.input_ids.numel()
            several_rows |= packed_batch.packed.input_ids.shape[0] > 1
            for what, a, e in zip(("reference log-probs", "loss", "policy log-probs", "logit sums"), actual, expected):
                assert_paths_agree(a, e, what=f"batch {micro_index}: {what}")
            grads, expected_grads = actual[-1], expected[-1]
            assert grads.keys() == expected_grads.keys() and grads
            if "--lora-r" in flags:
                assert all("lora" in name for name in grads)
            for name, grad in grads.items():
                assert_paths_agree(grad, expected_grads[name], what=f"batch {micro_index}: gradient of {name}")
    assert several_rows


def test_a_padding_free_run_trains_as_a_padded_one(tmp_path):
    """Whole runs, evaluation included: the same metrics (but the speed) and final weights."""
    args = ["--max-steps", "3", "--batch-size", "4", "--eval-fraction", "0.2", *EPA_STRONG_AND_WEAK]
    padded = train_in_process(tmp_path / "padded", *args)
    packed = train_in_process(tmp_path / "packed", *args, "--padding-free")
    assert len(packed) == len(padded) == 4
    for ours, theirs in zip(packed, padded):
        assert ours.keys() == theirs.keys()
        for key in theirs.keys() - {"tokens_per_second"}:
            assert_paths_agree(ours[key], theirs[key], what=f"step {theirs['step']} {key}")
    # AdamW magnifies the rounding of near-zero gradients: the weights' changes agree in norm
    expected, initial = final_weights(tmp_path / "padded"), initial_tiny_model(tmp_path / "padded").state_dict()
    for key, value in final_weights(tmp_path / "packed").items():
        assert (value - expected[key]).norm() <= WEIGHT_CHANGE_RTOL * (expected[key] - initial[key]).norm(), key


def test_a_padding_free_length_grouped_run_resumes_bitwise(tmp_path):
    """Killed after checkpoint-2 (final/ and the last step's checkpoint deleted): the resumed run
    ends bit for bit as the uninterrupted one, batch order and packing included."""
    args = ["--max-steps", "4", "--save-steps", "2", "--batch-size", "4", "--eval-fraction", "0", "--num-weak", "1",
            "--padding-free", "--group-by-length"]
    full = train_in_process(tmp_path / "full", *args)
    out = tmp_path / "cut"
    train_in_process(out, *args)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoint-4")
    train_in_process(out, *args, "--resume")
    assert train_losses(read_metrics(out)) == train_losses(full)
    expected = final_weights(tmp_path / "full")
    for key, value in final_weights(out).items():
        assert torch.equal(value, expected[key]), key


# --- refused -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--max-packed-length", "200"], "--max-packed-length applies to --padding-free only"),
    (["--padding-free", "--max-packed-length", "95"], "--max-packed-length must be >= --max-length (96)"),
])
def test_packed_length_options_are_checked(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_in_process(tmp_path / "out", "--max-steps", "1", *flags)


def tiny_llama():
    from epa_ext import causal_lm
    from epa_ext.train.modeling import build_tiny_model

    model = build_tiny_model(300, 32, 1, 64, seed=0)
    return model, causal_lm.check(model)


def test_attention_that_does_not_keep_packed_sequences_apart_is_refused(monkeypatch):
    """By name (a custom attention function), and by the probe: with transformers' detection of
    packed sequences switched off, sdpa attends across them, which the probe measures."""
    import transformers.masking_utils
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from epa_ext.train.packing import check_packed_attention

    model, transform = tiny_llama()
    check_packed_attention(model, transform)  # sdpa
    model.set_attn_implementation("eager")
    check_packed_attention(model, transform)
    AttentionInterface.register("my_sdpa", sdpa_attention_forward)
    model.set_attn_implementation("my_sdpa")
    with pytest.raises(ValueError, match="LlamaForCausalLM uses attn_implementation='my_sdpa', which does not keep "
                                         "packed sequences apart"):
        check_packed_attention(model, transform)

    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match=r"'sdpa' does not keep packed sequences apart \(the hidden states of packed "
                                         r"rows differ from the padded batch's by"):
        check_packed_attention(model, transform)
    assert model.training  # left as it was


def test_a_router_loss_is_refused_with_packed_rows():
    from epa_ext.train.packing import check_packed_attention

    model, transform = tiny_llama()
    with pytest.raises(ValueError, match="padding-free batches cannot give an MoE model's router load-balancing loss"):
        check_packed_attention(model, transform, router_logits=True)


# --- length-grouped batches ----------------------------------------------------------------------


def test_length_grouped_order_holds_each_example_once_an_epoch_in_batches_of_similar_length():
    from epa_ext.train.batching import MEGA_BATCH_BATCHES, BatchOrder

    generator = torch.Generator().manual_seed(1)
    num_examples, global_batch = 1000, 4
    lengths = torch.randint(10, 500, (num_examples,), generator=generator).tolist()
    grouped = BatchOrder(num_examples, global_batch, seed=3, lengths=lengths)
    plain = BatchOrder(num_examples, global_batch, seed=3)
    per_epoch = num_examples // global_batch
    for epoch in range(2):
        batches = [grouped(epoch * per_epoch + i) for i in range(per_epoch)]
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == sorted(plain(epoch * per_epoch + i)[j] for i in range(per_epoch)
                                      for j in range(global_batch))  # the same examples as without grouping
        assert len(set(flat)) == len(flat)  # each once: the ranks' slices of a batch are disjoint
        assert max(lengths[i] for i in batches[0]) == max(lengths[i] for i in flat)  # the longest first
        padding = lambda batch: sum(max(lengths[i] for i in batch) - lengths[i] for i in batch)  # noqa: E731
        plain_padding = sum(padding(plain(epoch * per_epoch + i)) for i in range(per_epoch))
        assert sum(padding(b) for b in batches) < 0.1 * plain_padding
    # a pure function of (seed, index, lengths): another instance, asked out of order, agrees
    again = BatchOrder(num_examples, global_batch, seed=3, lengths=lengths)
    assert [again(i) for i in (300, 5, 260)] == [grouped(i) for i in (300, 5, 260)]
    # the batches of a mega-batch are shuffled, not in length order
    first_mega = [max(lengths[i] for i in grouped(k)) for k in range(MEGA_BATCH_BATCHES)]
    assert first_mega != sorted(first_mega, reverse=True)
    with pytest.raises(ValueError, match="need one length per example; got 3 for 1000"):
        BatchOrder(num_examples, global_batch, 0, [1, 2, 3])


def test_longest_rows_is_the_width_a_batch_is_padded_to(tmp_path):
    from epa_ext.train.batching import longest_rows, make_batch

    with set_up_run(tmp_path, "run", *EPA_STRONG_AND_WEAK) as training:
        split, layout = training.data.train, training.data.layout
        lengths = longest_rows(split, layout)
        assert len(set(lengths)) > 5
        for i in range(len(split.examples)):
            assert make_batch(split, [i], layout, CPU).input_ids.shape[1] == lengths[i], i
