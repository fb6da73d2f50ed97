"""Prefix-shared rows (epa_ext.preference.prefix): each prompt once in a row with its C answers
after it, the hidden states gathered back into the padded candidate-major layout. The layout and
its masks; the same per-sequence log-probs and EPA loss gradients as the padded batch on every
architecture family (sliding windows shorter than the rows, per-layer-type masks, partial rotary
and absolute positions) under sdpa and eager; that the mask is needed (position ids alone, a plain
causal mask, a bool mask under eager, a missing window are each wrong); the probe; what is refused.

Tolerances: numerics.py's fp32 rule for two paths of one computation (``assert_paths_agree``),
with gradients taken relative to each tensor's largest element (their scale is ~1e-2, below the
rule's floor of 1)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from numerics import assert_paths_agree
from test_models import VOCAB, build

from epa_ext import causal_lm, linear_sequence_logps
from epa_ext.fused import fused_linear_epa_loss
from epa_ext.preference.candidates import pad_rows
from epa_ext.preference.prefix import (SharedAttention, check_prefix_sharing, share, shared_attention,
                                       through_shared_model, unshare)

WINDOW = 6  # shorter than every group's row, and than most candidate rows
# Five prompts with C = 6 candidates each (EPA: the chosen answer, K = 2 strong, M = 3 weak
# negatives): answers of very different lengths (1 to 26 tokens); groups of 70, 35, 30, 25 and 20
# tokens, which rows of at most ROW_BOUND pack as [70] (a group over the bound, alone), [35, 25]
# and [30, 20] (several groups per row).
PROMPTS = [11, 5, 13, 2, 8]
ANSWERS = [[1, 12, 4, 14, 2, 26], [2, 9, 2, 8, 6, 3], [3, 1, 5, 2, 4, 2], [4, 6, 1, 3, 5, 4], [1, 2, 3, 1, 4, 1]]
ROW_BOUND = 60
NUM_STRONG = 2


def epa_batch(num_candidates: int = 6):
    """(input_ids, attention_mask, labels [C*B, T], candidate_mask [B, C], prompt lengths [B]),
    candidate-major (row c*B + b), right-padded; prompt 1 has one strong negative fewer (a padding
    candidate holding a copy of its chosen answer, as ``collate`` lays it out)."""
    generator = torch.Generator().manual_seed(3)

    def tokens(length):
        return torch.randint(3, VOCAB, (length,), generator=generator).tolist()

    prompts = [tokens(n) for n in PROMPTS]
    answers = [[tokens(n) for n in lengths[:num_candidates]] for lengths in ANSWERS]
    candidate_mask = torch.ones(len(PROMPTS), num_candidates, dtype=torch.bool)
    if num_candidates > NUM_STRONG:
        answers[1][NUM_STRONG] = answers[1][0]
        candidate_mask[1, NUM_STRONG] = False
    rows = [(prompts[b], answers[b][c]) for c in range(num_candidates) for b in range(len(PROMPTS))]
    input_ids, attention_mask, labels = pad_rows(rows, pad_id=0)
    return input_ids, attention_mask, labels, candidate_mask, torch.tensor(PROMPTS)


# (model type, its config fields): windows shorter than the rows, in every form the models read them.
MODELS = {
    "llama": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),  # layer types: full, sliding
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "mistral": dict(sliding_window=WINDOW),  # one windowed mask for all layers
    "gemma2": dict(sliding_window=WINDOW),  # layer types: sliding, full; softcapped attention and logits
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(sliding_window=WINDOW, partial_rotary_factor=0.5),
    "gpt2": {},  # absolute position embeddings
    "gpt_neox": {},  # partial rotary (rotary_pct 0.25)
}
CASES = [(model_type, implementation) for model_type in MODELS for implementation in ("sdpa", "eager")
         if (model_type, implementation) != ("gemma2", "sdpa")]  # Gemma-2 refuses sdpa (softcapped attention)


def tiny(model_type: str, implementation: str, **overrides):
    """A tiny fp32 model, weights of std 0.2 (logits far enough from 0 that the log-probs follow
    the hidden states: a wrong mask shows)."""
    return build(model_type, attn_implementation=implementation,
                 **{"initializer_range": 0.2, **MODELS[model_type], **overrides})


def padded_and_shared(model, transform, consume, input_ids, attention_mask, shared):
    padded, _ = causal_lm.through_model(model, transform, consume, input_ids=input_ids, attention_mask=attention_mask)
    return padded, through_shared_model(model, transform, shared, consume)


# --- the layout ----------------------------------------------------------------------------------


def test_each_prompt_is_laid_out_once_and_gathered_back_to_every_candidate():
    input_ids, attention_mask, _, _, prompt_lengths = epa_batch()
    lengths = attention_mask.sum(-1)
    shared = share(input_ids, attention_mask, prompt_lengths, 6, ROW_BOUND, pad_id=-1,
                   attention=SharedAttention("sdpa", torch.float32))
    group_lengths = [p + sum(a) for p, a in zip(PROMPTS, ANSWERS)]
    assert shared.input_ids.shape == (3, 70)  # [70] alone (over the bound), [35, 25], [30, 20]
    assert shared.num_tokens == 210 and shared.unshared_tokens == int(lengths.sum()) == 375
    assert shared.saved_share == pytest.approx(1 - 210 / 375)
    flat_ids, flat_positions = shared.input_ids.reshape(-1), shared.position_ids.reshape(-1)
    real = shared.index[attention_mask.bool()]
    assert real.unique().numel() == sum(group_lengths)  # each prompt once, each answer once
    assert (flat_ids == -1).sum() == shared.num_tokens - sum(group_lengths)  # free tails hold pad_id
    batch_size = len(PROMPTS)
    for r in range(input_ids.shape[0]):
        b, n, prompt = r % batch_size, int(lengths[r]), PROMPTS[r % batch_size]
        where = shared.index[r, :n]
        assert torch.equal(flat_ids[where], input_ids[r, :n])  # the candidate's tokens, in order
        assert torch.equal(flat_positions[where], torch.arange(n))  # answers continue the prompt's positions
        # its prompt, and the prompt's last token that predicts the first answer token, are the group's one
        assert torch.equal(where[:prompt], shared.index[b, :prompt])
        assert int(where[0]) // 70 == int(where[-1]) // 70  # the group in one row
    assert shared.position_ids.max() == input_ids.shape[1] - 1  # the padded batch's largest position id
    # the gather back, also for hidden states (differentiable)
    hidden = torch.randn(3, 70, 4, requires_grad=True)
    gathered = unshare(hidden, shared)
    assert gathered.shape == (*input_ids.shape, 4)
    assert torch.equal(gathered[attention_mask.bool()], hidden.reshape(-1, 4)[real].detach())
    gathered[attention_mask.bool()].sum().backward()
    counts = torch.zeros(210).index_add_(0, real, torch.ones(real.numel()))
    assert torch.equal(hidden.grad.reshape(-1, 4)[:, 0], counts)  # a prompt token's gradient: C candidates'


@pytest.mark.parametrize("layer_types", [None, ("full_attention", "sliding_attention")], ids=["one-mask", "by-type"])
def test_masks_let_each_answer_see_its_prompt_and_itself_within_the_window(layer_types):
    """Independently of how the mask is built: the keys a candidate's token may attend in the
    shared rows are exactly the ones it attends in its padded row (its earlier tokens, within the
    window by position distance), mapped through the gather index; free tail tokens attend only
    themselves. sdpa's bool mask and eager's additive one say the same."""
    input_ids, attention_mask, _, _, prompt_lengths = epa_batch()
    masks = {}
    for implementation in ("sdpa", "eager"):
        attention = SharedAttention(implementation, torch.float32, layer_types, WINDOW)
        masks[implementation] = share(input_ids, attention_mask, prompt_lengths, 6, ROW_BOUND, 0,
                                      attention=attention)
    shared = masks["sdpa"]
    by_type = shared.attention_mask if layer_types else {"sliding_attention": shared.attention_mask}
    eager = masks["eager"].attention_mask if layer_types else {"sliding_attention": masks["eager"].attention_mask}
    assert set(by_type) == set(layer_types or ["sliding_attention"])
    width = shared.input_ids.shape[1]
    lengths = attention_mask.sum(-1).tolist()
    for kind, mask in by_type.items():
        assert mask.dtype == torch.bool and mask.shape == (3, 1, width, width)
        additive = eager[kind]
        assert additive.dtype == torch.float32
        assert torch.equal(additive == 0, mask) and bool((additive[~mask] == torch.finfo(torch.float32).min).all())
        flat = mask[:, 0].reshape(-1, width)  # [P * S query, S key]
        window = WINDOW if kind == "sliding_attention" else None
        seen = set()
        for r, n in enumerate(lengths):
            for t in range(n):
                query = int(shared.index[r, t])
                keys = {int(shared.index[r, u]) % width for u in range(t + 1) if window is None or t - u < window}
                assert set(flat[query].nonzero()[:, 0].tolist()) == keys, (kind, r, t)
                seen.add(query)
        for query in set(range(flat.shape[0])) - seen:  # free tail tokens
            assert flat[query].nonzero()[:, 0].tolist() == [query % width]


def test_share_refuses_batches_it_cannot_share():
    input_ids, attention_mask, _, _, prompt_lengths = epa_batch()
    attention = SharedAttention("sdpa", torch.float32)
    other_prompt = input_ids.clone()
    other_prompt[3 * len(PROMPTS) + 2, PROMPTS[2] - 1] += 1  # candidate 3 of prompt 2: its prompt's last token
    with pytest.raises(ValueError, match="must hold the same prompt tokens"):
        share(other_prompt, attention_mask, prompt_lengths, 6, None, 0, attention=attention)
    with pytest.raises(ValueError, match="needs right-padded rows"):
        share(input_ids, attention_mask.flip(-1), prompt_lengths, 6, None, 0, attention=attention)
    with pytest.raises(ValueError, match="num_candidates must be >= 1 and divide the batch's 30 rows; got 4"):
        share(input_ids, attention_mask, prompt_lengths, 4, None, 0, attention=attention)
    with pytest.raises(ValueError, match="prompt_lengths must lie in"):
        share(input_ids, attention_mask, prompt_lengths + 30, 6, None, 0, attention=attention)
    with pytest.raises(ValueError, match="prompt_lengths needs one length per prompt"):
        share(input_ids, attention_mask, prompt_lengths[:2], 6, None, 0, attention=attention)
    with pytest.raises(ValueError, match="max_row_tokens must be >= 1 or None; got 0"):
        share(input_ids, attention_mask, prompt_lengths, 6, 0, 0, attention=attention)
    with pytest.raises(TypeError, match="attention must be a SharedAttention"):
        share(input_ids, attention_mask, prompt_lengths, 6, None, 0, attention="sdpa")


# --- the same numbers as the padded batch --------------------------------------------------------


@pytest.mark.parametrize("model_type,implementation", CASES, ids=[f"{m}-{i}" for m, i in CASES])
def test_shared_rows_score_and_train_as_padded_ones(model_type, implementation, device):
    """Per-sequence log-probs (linear_sequence_logps of the gathered hidden states against the
    padded batch's), and the fused EPA loss (K = 2, M = 3, a padding candidate, an SFT term) with
    every parameter's gradient; in training mode (no dropout). The probe accepts the model. On the
    CPU, and on CUDA where there is one (bench/gpu_check.sh runs the CUDA cases)."""
    model = tiny(model_type, implementation).train().to(device)
    transform = causal_lm.check(model)
    check_prefix_sharing(model, transform)
    input_ids, attention_mask, labels, candidate_mask, prompt_lengths = (t.to(device) for t in epa_batch())
    shared = share(input_ids, attention_mask, prompt_lengths, 6, ROW_BOUND, 0, attention=shared_attention(model))
    assert shared.input_ids.shape[0] == 3

    def logps_of(head):
        return linear_sequence_logps(head.hidden, head.weight, labels, **head.as_kwargs())

    with torch.no_grad():
        padded, ours = padded_and_shared(model, transform, logps_of, input_ids, attention_mask, shared)
    assert_paths_agree(ours, padded, what=f"{model_type} {implementation}: sequence log-probs")

    ref = (-torch.rand(input_ids.shape[0], generator=torch.Generator().manual_seed(4)) * 30).to(device)

    def loss_of(head):
        return fused_linear_epa_loss(head.hidden, head.weight, labels, ref, **head.as_kwargs(), num_candidates=6,
                                     beta=0.1, num_strong=NUM_STRONG, mask=candidate_mask, sft_weight=0.1)

    results = []
    for through in (lambda: causal_lm.through_model(model, transform, loss_of, input_ids=input_ids,
                                                    attention_mask=attention_mask)[0],
                    lambda: through_shared_model(model, transform, shared, loss_of)):
        model.zero_grad(set_to_none=True)
        loss, seq = through()
        loss.backward()
        results.append((loss.detach(), seq.detach(), {n: p.grad for n, p in model.named_parameters()
                                                       if p.grad is not None}))
    (padded_loss, padded_seq, padded_grads), (loss, seq, grads) = results
    assert_paths_agree(loss, padded_loss, what=f"{model_type} {implementation}: EPA loss")
    assert_paths_agree(seq, padded_seq, what=f"{model_type} {implementation}: EPA's sequence log-probs")
    assert grads.keys() == padded_grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, expected in padded_grads.items():
        scale = expected.abs().max().clamp(min=1e-30)
        assert_paths_agree(grads[name] / scale, expected / scale,
                           what=f"{model_type} {implementation}: gradient of {name} (relative to its largest)")


def test_the_mask_is_needed():
    """What the prototype found silently wrong, each far from the padded log-probs here: the
    shared rows with position ids alone (the packed-sequence detection then reads each answer as
    a continuation of the previous one), with a plain causal mask over the row, a bool mask under
    eager (added to the scores: masks nothing), and a windowed model's mask without its window.
    The right mask agrees in each case (so a wrong one would fail the tests above)."""
    input_ids, attention_mask, labels, _, prompt_lengths = epa_batch()

    def logps_of(head):
        return linear_sequence_logps(head.hidden, head.weight, labels, **head.as_kwargs())

    def off_by(model, **model_kwargs):
        transform, shared = causal_lm.check(model), shared_for(model)
        with torch.no_grad():
            padded, _ = causal_lm.through_model(model, transform, logps_of, input_ids=input_ids,
                                                attention_mask=attention_mask)
            right = through_shared_model(model, transform, shared, logps_of)
            wrong, _ = causal_lm.through_model(
                model, transform, lambda head: logps_of(replace(head, hidden=unshare(head.hidden, shared))),
                input_ids=shared.input_ids, position_ids=shared.position_ids, **model_kwargs)
        assert_paths_agree(right, padded, what="the right mask")
        return float((wrong - padded).abs().max())

    def shared_for(model, **attention):
        fields = {**vars(shared_attention(model)), **attention}
        return share(input_ids, attention_mask, prompt_lengths, 6, ROW_BOUND, 0, attention=SharedAttention(**fields))

    llama = tiny("llama", "sdpa").eval()
    width = shared_for(llama).input_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril().expand(3, 1, width, width)
    eager = tiny("llama", "eager").eval()
    mistral = tiny("mistral", "sdpa").eval()
    errors = {
        "position ids alone": off_by(llama),
        "a plain causal mask": off_by(llama, attention_mask=causal),
        "a bool mask under eager": off_by(eager,
                                          attention_mask=shared_for(eager, implementation="sdpa").attention_mask),
        "no window": off_by(mistral, attention_mask=shared_for(mistral, sliding_window=None).attention_mask),
    }
    for what, error in errors.items():
        assert error > 1e-2, f"{what}: off by {error:.2g} nats only"


# --- the probe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_type,implementation", [("llama", "sdpa"), ("mistral", "sdpa"), ("gemma2", "eager"),
                                                       ("qwen3", "eager")])
def test_the_probe_accepts_half_precision_models(model_type, implementation, dtype):
    model = tiny(model_type, implementation).to(dtype)
    check_prefix_sharing(model, causal_lm.check(model))


def off_when_shared(model, change: str):
    """Hooks on the model's backbone, active when it gets a 4D mask (or a dict of them): "drop"
    passes no mask instead (attention the mask does not reach); "scale" multiplies its output by
    1.01 (a 1 % error of the shared rows' logits)."""
    backbone, _ = causal_lm.backbone_and_head(model)

    def shared_mask(kwargs) -> bool:
        mask = kwargs.get("attention_mask")
        return isinstance(mask, dict) or (isinstance(mask, torch.Tensor) and mask.dim() == 4)

    def drop(_module, args, kwargs):
        if shared_mask(kwargs):
            kwargs["attention_mask"] = None
        return args, kwargs

    def scale(_module, _args, kwargs, output):
        if shared_mask(kwargs):
            output.last_hidden_state = output.last_hidden_state * 1.01
        return output

    if change == "drop":
        backbone.register_forward_pre_hook(drop, with_kwargs=True)
    else:
        backbone.register_forward_hook(scale, with_kwargs=True)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("change", ["drop", "scale"])
def test_the_probe_refuses_a_model_that_does_not_honour_the_mask(change, dtype):
    for model_type, implementation in [("llama", "sdpa"), ("gemma2", "eager")]:
        model = tiny(model_type, implementation, initializer_range=0.02).to(dtype)
        transform = causal_lm.check(model)
        check_prefix_sharing(model, transform)
        off_when_shared(model, change)
        name = type(model).__name__
        with pytest.raises(ValueError, match=rf"{name} with attn_implementation='{implementation}' does not give the "
                                             r"padded batch's hidden states in prefix-shared rows"):
            check_prefix_sharing(model, transform)


# --- refused -------------------------------------------------------------------------------------


def test_attention_that_cannot_take_the_mask_is_refused(monkeypatch):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setitem(AttentionInterface._global_mapping, "registered_sdpa", sdpa_attention_forward)
    model = tiny("llama", "registered_sdpa")
    transform = causal_lm.check(model)
    with pytest.raises(ValueError, match="LlamaForCausalLM uses attn_implementation='registered_sdpa', which cannot "
                                         "take the attention mask of prefix-shared rows; they need one of sdpa, eager"):
        check_prefix_sharing(model, transform)
    flex = tiny("llama", "flex_attention")
    with pytest.raises(ValueError, match=r"LlamaForCausalLM uses attn_implementation='flex_attention': "
                                         r"prefix-shared rows cannot use it \(torch 2.14 has no flex_attention "
                                         r"backward on the CPU\)"):
        shared_attention(flex)
    bidirectional = tiny("gemma3_text", "sdpa", use_bidirectional_attention=True)
    with pytest.raises(ValueError, match="Gemma3ForCausalLM attends bidirectionally"):
        shared_attention(bidirectional)


def test_router_logits_are_refused():
    model = tiny("llama", "sdpa")
    transform = causal_lm.check(model)
    input_ids, attention_mask, _, _, prompt_lengths = epa_batch()
    shared = share(input_ids, attention_mask, prompt_lengths, 6, ROW_BOUND, 0, attention=shared_attention(model))
    message = "prefix-shared rows cannot give an MoE model's router load-balancing loss"
    with pytest.raises(ValueError, match=message):
        through_shared_model(model, transform, shared, lambda head: head.hidden, router_logits=True)
    with pytest.raises(ValueError, match=message):
        check_prefix_sharing(model, transform, router_logits=True)
