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
    from epa_ext.preference.packing import pack, unpack

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
    # a full row, and the batch padded beyond its longest sequence: one more position, for T - 1
    assert one_row.input_ids.shape == (1, sum(lengths) + 1)
    assert one_row.position_ids.max() == 10


def test_free_tails_keep_the_padded_batchs_largest_position_id():
    """RoPE types that read the batch's largest position id (dynamic NTK, longrope) see the padded
    batch's, T - 1, in packed rows: no free tail is numbered beyond it (first fit leaves the third
    row [1] a tail of 31 in rows of 32, which used to run to position 30), and a batch padded
    beyond its longest sequence whose rows are all full gets a one-token tail holding it."""
    from epa_ext.preference.packing import pack

    input_ids, attention_mask = right_padded([16, 16, 16, 16, 1])
    packed = pack(input_ids, attention_mask, max_row_tokens=32, pad_id=0)
    assert packed.input_ids.shape == (3, 32)
    assert packed.position_ids.max() == 15
    tail = packed.position_ids[2, 1:]
    assert tail[-1] == 15 and tail.min() == 0  # a pseudo-sequence restarting at 0 ends at T - 1
    flat = packed.position_ids.reshape(-1)
    for r, n in enumerate([16, 16, 16, 16, 1]):
        assert torch.equal(flat[packed.index[r, :n]], torch.arange(n))

    input_ids, attention_mask = right_padded([4, 4], width=8)  # padded to a multiple of 8, say
    packed = pack(input_ids, attention_mask, max_row_tokens=4, pad_id=0)
    assert packed.input_ids.shape == (2, 5) and packed.position_ids[:, -1].tolist() == [7, 7]
    input_ids, attention_mask = right_padded([4, 4])  # the longest sequence holds T - 1: no extra column
    assert pack(input_ids, attention_mask, max_row_tokens=4, pad_id=0).input_ids.shape == (2, 4)


def test_rows_are_filled_evenly_where_first_fit_leaves_one_fuller():
    """First fit, longest first, packs [7, 4, 4, 4, 1] into rows of 12 as [7 4 1] and [4 4]: width
    12; the even fill of the same two rows, [7 4] and [4 4 1], needs 11."""
    from epa_ext.preference.packing import pack_lengths

    lengths = [7, 4, 4, 4, 1]
    rows = pack_lengths(lengths, 12)
    assert sorted(sorted(lengths[i] for i in row) for row in rows) == [[1, 4, 4], [4, 7]]
    assert pack_lengths([9, 5, 5, 3, 3], 8) == [[0], [1, 3], [2, 4]]  # an overlong sequence: first fit


def test_pack_refuses_left_padding_and_a_bound_below_one():
    from epa_ext.preference.packing import pack

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
    from epa_ext.preference.candidates import make_batch

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
    (["--max-packed-length", "200"], "--max-packed-length applies to --padding-free or --prefix-sharing only"),
    (["--padding-free", "--max-packed-length", "95"], "--max-packed-length must be >= --max-length (96)"),
])
def test_packed_length_options_are_checked(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train_in_process(tmp_path / "out", "--max-steps", "1", *flags)


# --- RoPE scaling --------------------------------------------------------------------------------

ROPE_TYPES = ["default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional"]  # transformers 5.25's


def rope_model(rope_type: str, original: int):
    """A tiny model with this RoPE type, scaled by 4 from an original context of `original`
    positions, in eval mode. Dynamic NTK and longrope pick their frequencies from the batch's
    largest position id (beyond `original`: scaled, long); the others from each position alone.
    Weights drawn with std 0.3, not 0.02: logits that far from 0 that the log-probs follow the
    hidden states (at 0.02, the old packing's other frequencies moved them by 1e-5 only)."""
    from test_models import build

    scaling = {"default": None, "linear": dict(factor=4.0), "dynamic": dict(factor=4.0),
               "yarn": dict(factor=4.0, original_max_position_embeddings=original),
               "longrope": dict(short_factor=[1.0] * 4, long_factor=[4.0] * 4,
                                original_max_position_embeddings=original),
               "llama3": dict(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=original),
               "proportional": dict(factor=4.0, partial_rotary_factor=0.5)}[rope_type]
    fields = dict(max_position_embeddings=original if rope_type == "dynamic" else 4 * original, initializer_range=0.3)
    if scaling is not None:
        fields["rope_scaling"] = dict(rope_type=rope_type, **scaling)
    if rope_type == "longrope":
        return build("phi3", original_max_position_embeddings=original, **fields).eval()
    return build("llama", **fields).eval()


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_packed_rows_score_as_padded_ones_under_every_rope_type(rope_type):
    """Four sequences of the original context's 16 tokens (the padded batch keeps the unscaled
    frequencies) and one of a single token, packed into rows of 32: the third row's free tail is 31
    tokens long, and was numbered up to 30, which moved every packed sequence to dynamic NTK's
    scaled and longrope's long frequencies. Now the per-sequence log-probs are the padded batch's,
    before and after it (dynamic NTK keeps the frequencies of the longest batch it has seen), and
    the probe accepts the model."""
    from test_models import VOCAB

    from epa_ext import IGNORE_INDEX, causal_lm, linear_sequence_logps
    from epa_ext.preference.packing import check_packed_attention, pack, through_packed_model

    original = 16
    model = rope_model(rope_type, original)
    transform = causal_lm.check(model)
    lengths = torch.tensor([original] * 4 + [1])
    input_ids = torch.randint(3, VOCAB, (len(lengths), original), generator=torch.Generator().manual_seed(0))
    attention_mask = (torch.arange(original) < lengths[:, None]).long()
    labels = input_ids.roll(-1, 1).masked_fill(torch.arange(original) >= lengths[:, None] - 1, IGNORE_INDEX)
    packed_batch = pack(input_ids, attention_mask, max_row_tokens=2 * original, pad_id=0)
    assert packed_batch.input_ids.shape == (3, 2 * original)

    def score(head):
        return linear_sequence_logps(head.hidden, head.weight, labels, **head.as_kwargs())

    def padded_logps():
        return causal_lm.through_model(model, transform, score, input_ids=input_ids, attention_mask=attention_mask)[0]

    with torch.no_grad():
        padded = padded_logps()
        packed = through_packed_model(model, transform, packed_batch, score)
        assert_paths_agree(packed, padded, what=f"{rope_type} RoPE: packed against padded sequence log-probs")
        assert torch.equal(padded_logps(), padded)
    check_packed_attention(model, transform, max_length=original, max_row_tokens=2 * original)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_the_probe_refuses_tails_numbered_past_the_padded_batch(rope_type, monkeypatch):
    """check_packed_attention probes rows laid out as the run's (sequences of --max-length, rows of
    --max-packed-length, a free tail nearly a row long): with tails numbered on to the row's end
    (the packing before this fix), a model whose RoPE reads the largest position id is refused
    (hidden states 2.3e-3 and 3.1e-3 apart); the probe of four sequences of at most 5 tokens in rows
    of 8 missed it."""
    import epa_ext.preference.packing as packing
    from epa_ext import causal_lm

    model = rope_model(rope_type, original=96)
    transform = causal_lm.check(model)
    packing.check_packed_attention(model, transform, max_length=96, max_row_tokens=192)
    monkeypatch.setattr(packing, "tail_positions", lambda length, padded_width, device: torch.arange(length))
    with pytest.raises(ValueError, match=r"'sdpa' does not keep packed sequences apart \(the hidden states of packed "
                                         r"rows differ from the padded batch's by"):
        packing.check_packed_attention(model, transform, max_length=96, max_row_tokens=192)


def test_the_probe_leaves_dynamic_ntk_as_it_found_it():
    """Dynamic NTK keeps the frequencies of the longest batch it has seen until one fits its
    original context (16 here): the probe's sequences reach the run's --max-length (32), and a
    padded batch of 20 tokens after it gets the frequencies of a model that never saw the probe,
    as in a run without --padding-free."""
    from epa_ext import causal_lm
    from epa_ext.preference.packing import check_packed_attention

    probed, fresh = rope_model("dynamic", 16), rope_model("dynamic", 16)
    check_packed_attention(probed, causal_lm.check(probed), max_length=32, max_row_tokens=64)
    input_ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(probed(input_ids=input_ids, use_cache=False).logits,
                           fresh(input_ids=input_ids, use_cache=False).logits)


def tiny_llama():
    from epa_ext import causal_lm
    from epa_ext.train.modeling import build_tiny_model

    model = build_tiny_model(300, 32, 1, 64, seed=0)
    return model, causal_lm.check(model)


PROBE_LAYOUT = dict(max_length=32, max_row_tokens=64)  # the tiny Llama's 64 positions


def test_attention_that_does_not_keep_packed_sequences_apart_is_refused(monkeypatch):
    """By name (a custom attention function), and by the probe: with transformers' detection of
    packed sequences switched off, sdpa attends across them, which the probe measures."""
    import transformers.masking_utils
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from epa_ext.preference.packing import check_packed_attention

    model, transform = tiny_llama()
    check_packed_attention(model, transform, **PROBE_LAYOUT)  # sdpa
    model.set_attn_implementation("eager")
    check_packed_attention(model, transform, **PROBE_LAYOUT)
    AttentionInterface.register("my_sdpa", sdpa_attention_forward)
    model.set_attn_implementation("my_sdpa")
    with pytest.raises(ValueError, match="LlamaForCausalLM uses attn_implementation='my_sdpa', which does not keep "
                                         "packed sequences apart"):
        check_packed_attention(model, transform, **PROBE_LAYOUT)

    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(ValueError, match=r"'sdpa' does not keep packed sequences apart \(the hidden states of packed "
                                         r"rows differ from the padded batch's by"):
        check_packed_attention(model, transform, **PROBE_LAYOUT)
    assert model.training  # left as it was


def test_a_router_loss_is_refused_with_packed_rows():
    from epa_ext.preference.packing import check_packed_attention

    model, transform = tiny_llama()
    with pytest.raises(ValueError, match="padding-free batches cannot give an MoE model's router load-balancing loss"):
        check_packed_attention(model, transform, **PROBE_LAYOUT, router_logits=True)


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
    from epa_ext.preference.candidates import longest_rows, make_batch

    with set_up_run(tmp_path, "run", *EPA_STRONG_AND_WEAK) as training:
        split, layout = training.data.train, training.data.layout
        lengths = longest_rows(split, layout)
        assert len(set(lengths)) > 5
        for i in range(len(split.examples)):
            assert make_batch(split, [i], layout, CPU).input_ids.shape[1] == lengths[i], i
