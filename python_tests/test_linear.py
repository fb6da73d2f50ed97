"""linear_sequence_logps and fused_linear_*_loss: from hidden states and the lm_head, against the
eager path (full logits, log_softmax, gather) in float64 and in each dtype; the three-matmul path
of the losses against the float64 reference and against the recomputing path."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

import epa_ext
from epa_ext import IGNORE_INDEX, eager
from numerics import assert_close_to_truth, assert_paths_agree


def make_inputs(batch, seq_len, hidden_size, vocab, dtype, device, *, ignore_fraction=0.2, with_bias=True):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5 * 2
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    labels[torch.rand(batch, seq_len, generator=gen) < ignore_fraction] = IGNORE_INDEX
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), labels.to(device)


def grads_of(fn, tensors, upstream_seed=5):
    """Value of fn(*leaves) and the gradients of its inputs (None where an input is None or frozen),
    for a random upstream gradient (upstream_seed=None: ones)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad or t.is_floating_point())
              for t in tensors]
    out = fn(*leaves)
    upstream = (torch.ones(out.shape, dtype=torch.float64) if upstream_seed is None else
                torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(upstream_seed)) + 0.5)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, upstream.to(out.dtype).to(out.device)))
    return out.detach(), [None if t is None or not t.requires_grad else next(grads) for t in leaves]


SHAPES = [  # (B, T, H, V, chunk_size)
    (3, 7, 37, 101, 4),     # odd H and V; chunks that do not divide the rows
    (2, 16, 64, 500, None),  # automatic chunk
    (1, 5, 8, 3, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("average", [False, True])
def test_matches_eager(shape, dtype, average, device):
    batch, seq_len, hidden_size, vocab, chunk = shape
    inputs = make_inputs(batch, seq_len, hidden_size, vocab, dtype, device)
    labels = inputs[3]

    def ours(h, w, b):
        return epa_ext.linear_sequence_logps(h, w, labels, bias=b, average=average, max_chunk_tokens=chunk)

    def plain_torch(h, w, b):
        return eager.linear_sequence_logps(h, w, labels, b, average=average)

    value, grads = grads_of(ours, inputs[:3])
    truth, truth_grads = grads_of(plain_torch, [t.double() for t in inputs[:3]])
    plain, plain_grads = grads_of(plain_torch, inputs[:3])
    assert value.dtype == torch.float32 and value.shape == (batch,)
    assert_close_to_truth(value, truth, dtype=dtype, plain=plain, what="sequence logps")
    for name, g, t, p in zip(("hidden", "weight", "bias"), grads, truth_grads, plain_grads):
        assert g.dtype == dtype
        assert_close_to_truth(g, t, dtype=dtype, plain=p, what=f"d({name})")


def test_float64_and_gradcheck(device):
    hidden, weight, bias, labels = make_inputs(2, 5, 6, 9, torch.float64, device)
    args = [t.requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: epa_ext.linear_sequence_logps(h, w, labels, bias=b, max_chunk_tokens=3), args
    )


@pytest.mark.parametrize("ignore_fraction", [0.2, 1.0])
def test_ignored_rows(ignore_fraction, device):
    hidden, weight, bias, labels = make_inputs(3, 8, 16, 50, torch.float32, device, ignore_fraction=ignore_fraction)
    value, grads = grads_of(lambda h, w, b: epa_ext.linear_sequence_logps(h, w, labels, bias=b, max_chunk_tokens=5),
                            [hidden, weight, bias])
    truth, truth_grads = grads_of(lambda h, w, b: eager.linear_sequence_logps(h, w, labels, b),
                                  [t.double() for t in (hidden, weight, bias)])
    assert_close_to_truth(value, truth, dtype=torch.float32)
    for g, t in zip(grads, truth_grads):
        assert_close_to_truth(g, t, dtype=torch.float32)
    ignored = labels == IGNORE_INDEX
    assert torch.equal(grads[0][ignored], torch.zeros_like(grads[0][ignored]))
    if ignore_fraction == 1.0:
        assert torch.equal(value, torch.zeros_like(value))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_frozen_weight_gets_no_gradient(device):
    hidden, weight, _, labels = make_inputs(2, 6, 12, 40, torch.float32, device, with_bias=False)
    h = hidden.clone().requires_grad_()
    out = epa_ext.linear_sequence_logps(h, weight, labels)  # weight does not require grad (LoRA, frozen head)
    out.sum().backward()
    assert weight.grad is None and h.grad is not None
    h_ref = hidden.double().requires_grad_()
    eager.linear_sequence_logps(h_ref, weight.double(), labels).sum().backward()
    assert_close_to_truth(h.grad, h_ref.grad, dtype=torch.float32)


def test_tied_weights(device):
    """The lm_head shares its weight with the input embedding: both gradients add up."""
    torch.manual_seed(0)
    vocab, hidden_size = 30, 8
    embedding = torch.nn.Embedding(vocab, hidden_size).to(device)
    input_ids = torch.randint(0, vocab, (2, 6), device=device)
    labels = epa_ext.completion_labels(input_ids, torch.ones_like(input_ids, dtype=torch.bool))
    grads = []
    for fn in (lambda h: epa_ext.linear_sequence_logps(h, embedding.weight, labels),
               lambda h: eager.linear_sequence_logps(h, embedding.weight, labels)):
        embedding.zero_grad()
        hidden = torch.tanh(embedding(input_ids))
        fn(hidden).sum().backward()
        grads.append(embedding.weight.grad.clone())
    assert_paths_agree(grads[0], grads[1], what="tied embedding gradient")


def bf16_weight_gradient_errors(path: str, device) -> dict[bool, float]:
    """Largest error of a bf16 weight gradient against float64, with and without fp32_weight_grad,
    accumulated over 32 chunks of 8 tokens: of linear_sequence_logps (path "logps") or of the
    three-matmul DPO loss (path "loss")."""
    hidden, weight, _, labels = make_inputs(4, 64, 32, 64, torch.bfloat16, device, with_bias=False, ignore_fraction=0)
    ref = torch.zeros(4, device=device)

    def value(h, w, fp32=True, plain=False):
        if path == "logps":
            if plain:
                return eager.linear_sequence_logps(h, w, labels)
            return epa_ext.linear_sequence_logps(h, w, labels, max_chunk_tokens=8, fp32_weight_grad=fp32)
        if plain:
            return eager.fused_dpo_loss(h @ w.T, labels, ref.double(), beta=1.0)[0]
        return epa_ext.fused_linear_dpo_loss(h, w, labels, ref, beta=1.0, max_chunk_tokens=8, fp32_weight_grad=fp32)[0]

    truth = grads_of(lambda h, w: value(h, w, plain=True), [hidden.double(), weight.double()])[1][1]
    errors = {}
    for fp32 in (True, False):
        grad = grads_of(lambda h, w: value(h, w, fp32), [hidden, weight])[1][1]
        errors[fp32] = (grad.double() - truth).abs().max().item()
    return errors


@pytest.mark.parametrize("path", ["logps", "loss"])
def test_bf16_weight_gradient_accumulates_in_fp32(path, device):
    """One rounding to bf16 at the end instead of one per chunk: the error must shrink by at
    least 2x (about 3x here; equal errors would mean the fp32 buffer does nothing)."""
    errors = bf16_weight_gradient_errors(path, device)
    assert errors[True] * 2 < errors[False], errors


def test_token_logps_match_the_logits_op(device):
    hidden, weight, bias, labels = make_inputs(2, 9, 10, 77, torch.float32, device)
    ours = epa_ext.linear_token_logps(hidden, weight, labels, bias=bias, max_chunk_tokens=4)
    via_logits = epa_ext.token_logps(hidden @ weight.T + bias, labels)
    assert_paths_agree(ours, via_logits, what="linear_token_logps")
    flat = epa_ext.linear_token_logps(hidden.reshape(-1, 10), weight, labels.reshape(-1), bias=bias)
    assert_paths_agree(flat.view(2, 9), ours, what="flat linear_token_logps")


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias, device):
    hidden, weight, bias, labels = make_inputs(2, 5, 6, 11, torch.float32, device, with_bias=with_bias)
    h2, y1 = hidden.reshape(10, 6), labels.reshape(10)
    torch.library.opcheck(torch.ops.epa_ext.linear_token_logps.default,
                          (h2.requires_grad_(), weight.requires_grad_(), bias, y1, IGNORE_INDEX, 3, True))
    logps, lse = torch.ops.epa_ext.linear_token_logps(h2.detach(), weight.detach(), bias, y1, IGNORE_INDEX, 3, True)
    torch.library.opcheck(torch.ops.epa_ext.linear_token_logps_backward.default,
                          (torch.rand(10, device=device), h2.detach(), weight.detach(), bias, y1, lse, logps,
                           IGNORE_INDEX, 3, [True, True, with_bias], True))


def test_compile_fullgraph(device):
    hidden, weight, bias, labels = make_inputs(2, 6, 8, 30, torch.float32, device)

    def fn(h, w, b):
        return epa_ext.linear_sequence_logps(h, w, labels, bias=b, average=True, max_chunk_tokens=5).sum()

    results = [grads_of(f, [hidden, weight, bias]) for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager"))]
    assert_paths_agree(results[1][0], results[0][0], what="compiled value")
    for a, b in zip(results[1][1], results[0][1]):
        assert_paths_agree(a, b, what="compiled gradient")


def test_second_order_gradients_are_refused(device):
    """A Hessian-vector product through the linear op would silently miss its part: it raises."""
    hidden, weight, bias, labels = make_inputs(2, 5, 6, 11, torch.float32, device)
    h = hidden.clone().requires_grad_()
    out = epa_ext.linear_sequence_logps(h, weight, labels).sum() + (h ** 2).sum()
    with pytest.raises(RuntimeError, match="linear_token_logps: second-order gradients are not supported"):
        torch.autograd.grad(out, [h], create_graph=True)


# --- the preference losses from hidden states: three matmuls ------------------------------------


def make_groups(lengths, hidden_size, vocab, dtype, device, *, prompt_len=3, with_bias=True, seed=3):
    """Prompt groups as fused_linear_*_loss takes them, candidate-major.

    lengths: [B][C] completion lengths (0: a sequence with every label ignored). Each row has
    prompt_len ignored positions, then its completion, then padding (ignored).
    Returns hidden [C*B, T, H], weight, bias, labels [C*B, T], summed ref_logps [C*B]."""
    prompts, candidates = len(lengths), len(lengths[0])
    steps = prompt_len + max(max(row) for row in lengths)
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(candidates * prompts, steps, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5 * 2
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    labels = torch.full((candidates * prompts, steps), IGNORE_INDEX)
    for b, row in enumerate(lengths):
        for c, length in enumerate(row):
            labels[c * prompts + b, prompt_len: prompt_len + length] = torch.randint(0, vocab, (length,), generator=gen)
    ref = -torch.rand(candidates * prompts, generator=gen, dtype=torch.float64) * 3 * (labels != IGNORE_INDEX).sum(-1)
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), labels.to(device), ref.float().to(device)


def uniform(prompts, candidates, length):
    return [[length] * candidates for _ in range(prompts)]


DPO_OPTIONS = [
    dict(loss_type="sigmoid", label_smoothing=0.1),
    dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="hinge", beta=0.5),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type="ipo", beta=0.5, sft_weight=0.3, reduction="sum"),
    dict(loss_type="sigmoid", sft_weight=0.5, average=True),
]
EPA_OPTIONS = [  # num_candidates and, with "mask", a random mask of absent candidates
    dict(num_candidates=4),
    dict(num_candidates=6, num_strong=2, weak_weight=0.5, mask=True, sft_weight=0.4),
    dict(num_candidates=3, num_strong=1, average=True, reduction="sum"),
    dict(num_candidates=5, num_strong=2, weak_weight=0.0, mask=True, sft_weight=1.0, average=True),
]


def loss_functions(kind, options, labels, ref, prompts, device, **ours_options):
    """(ours(h, w, b) -> loss, eager(h, w, b) -> loss) for one loss configuration."""
    options = dict(options)
    if options.pop("mask", False):
        gen = torch.Generator().manual_seed(1)
        mask = torch.rand(prompts, options["num_candidates"], generator=gen) > 0.3
        mask[:, 0] = True
        options["mask"] = mask.to(device)
    if kind == "dpo":
        def ours(h, w, b):
            return epa_ext.fused_linear_dpo_loss(h, w, labels, ref, bias=b, **options, **ours_options)[0]

        def plain(h, w, b):
            return eager.fused_dpo_loss(h @ w.T + (0 if b is None else b), labels, ref.to(h.dtype), **options)[0]
    else:
        def ours(h, w, b):
            return epa_ext.fused_linear_epa_loss(h, w, labels, ref, bias=b, **options, **ours_options)[0]

        def plain(h, w, b):
            return eager.fused_epa_loss(h @ w.T + (0 if b is None else b), labels, ref.to(h.dtype), **options)[0]
    return ours, plain


LOSS_CASES = [("dpo", o) for o in DPO_OPTIONS] + [("epa", o) for o in EPA_OPTIONS]


def check_against_eager(kind, options, inputs, dtype, device, **ours_options):
    """Loss and d(hidden), d(weight), d(bias) of the three-matmul path against float64 eager (and
    plain torch in dtype), with a random upstream gradient."""
    hidden, weight, bias, labels, ref = inputs
    prompts = hidden.shape[0] // (2 if kind == "dpo" else options["num_candidates"])
    ours, plain = loss_functions(kind, options, labels, ref, prompts, device, **ours_options)
    value, grads = grads_of(ours, [hidden, weight, bias])
    truth, truth_grads = grads_of(plain, [t if t is None else t.double() for t in (hidden, weight, bias)])
    in_dtype, in_dtype_grads = grads_of(plain, [hidden, weight, bias])
    assert value.dtype == torch.float32
    assert_close_to_truth(value, truth, dtype=dtype, plain=in_dtype, what=f"{kind} loss")
    for name, g, t, p in zip(("hidden", "weight", "bias"), grads, truth_grads, in_dtype_grads):
        if t is None:
            assert g is None
            continue
        assert g.dtype == dtype
        assert_close_to_truth(g, t, dtype=dtype, plain=p, what=f"{kind} d({name})")
    return value, grads


@pytest.mark.parametrize("kind,options", LOSS_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_three_matmul_losses_match_eager(kind, options, dtype, device):
    candidates = 2 if kind == "dpo" else options["num_candidates"]
    lengths = [[(3 * b + 5 * c) % 9 + 2 for c in range(candidates)] for b in range(4)]  # uneven lengths
    check_against_eager(kind, options, make_groups(lengths, 24, 97, dtype, device), dtype, device)


BUDGETS = {  # name -> max_chunk_tokens for groups of 4 candidates x 6-9 tokens (24-36 per group)
    "splits-nothing": None,
    "one-group-per-chunk": 36,
    "every-group-in-pieces": 7,
}


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("kind,options", [LOSS_CASES[4], LOSS_CASES[7]], ids=str)
def test_budgets_give_the_same_loss_and_gradients(kind, options, budget, device):
    candidates = 2 if kind == "dpo" else options["num_candidates"]
    lengths = [[6 + (b + c) % 4 for c in range(candidates)] for b in range(5)]
    inputs = make_groups(lengths, 16, 50, torch.float32, device)
    value, grads = check_against_eager(kind, options, inputs, torch.float32, device, max_chunk_tokens=budget)
    # and against the recomputing path (linear_token_logps, then the loss)
    hidden, weight, bias, labels, ref = inputs
    prompts = hidden.shape[0] // candidates
    recomputing, _ = loss_functions(kind, options, labels, ref, prompts, device, max_chunk_tokens=budget,
                                    differentiable_logps=True)
    expected, expected_grads = grads_of(recomputing, [hidden, weight, bias])
    assert_paths_agree(value, expected, what="loss vs the recomputing path")
    for a, b in zip(grads, expected_grads):
        assert_paths_agree(a, b, what="gradient vs the recomputing path")


def matmul_calls(fn) -> int:
    """How many matrix products fn runs (the profiler sees the op's own ATen calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = Counter(event.name for event in prof.events())
    return sum(names[name] for name in ("aten::mm", "aten::addmm", "aten::addmm_"))


def test_matmul_count_per_chunk():
    """3 matmuls per chunk with a trainable head, 2 with a frozen one, 1 without gradients; a group
    over the budget in k pieces takes 4k - 1 (the logits of all pieces but the last are computed
    again for the gradient); the recomputing path takes 4 per chunk."""
    lengths = [[5, 5], [5, 5], [5, 5], [40, 30]]  # three groups of 10 tokens, one of 70
    hidden, weight, _, labels, ref = make_groups(lengths, 8, 30, torch.float32, "cpu", with_bias=False)
    h, w = hidden.requires_grad_(), weight.requires_grad_()

    def step(x, head, **options):
        def run():
            loss, _ = epa_ext.fused_linear_dpo_loss(x, head, labels, ref, max_chunk_tokens=30, **options)
            if loss.requires_grad:
                loss.backward()
        return matmul_calls(run)

    # chunks: the three small groups (30 tokens), then the large group in pieces of 30, 30, 10
    # (forward 3; gradient: the last piece from the buffer, the other two recomputed)
    assert step(h, w) == 3 * 1 + (3 + 2 + 2 * 3)
    assert step(h, w.detach()) == 2 * 1 + (3 + 2 + 3)
    with torch.no_grad():
        assert step(h, w) == 1 + 3
    assert step(h, w, differentiable_logps=True) == 4 * 4  # 100 kept rows in chunks of 30


def test_groups_of_very_different_lengths_and_ignored_sequences(device):
    """One long group over the budget, tiny groups, sequences and a whole group without a kept
    label: all against float64 eager, for DPO and EPA."""
    dpo_lengths = [[1, 60], [0, 4], [0, 0], [3, 0], [7, 9]]
    inputs = make_groups(dpo_lengths, 16, 40, torch.float32, device)
    check_against_eager("dpo", dict(sft_weight=0.5), inputs, torch.float32, device, max_chunk_tokens=16)
    epa_lengths = [[2, 0, 50, 1], [0, 0, 0, 0], [5, 5, 5, 5]]
    inputs = make_groups(epa_lengths, 16, 40, torch.float32, device)
    check_against_eager("epa", dict(num_candidates=4, num_strong=2, sft_weight=0.5, average=True), inputs,
                        torch.float32, device, max_chunk_tokens=16)


def test_all_labels_ignored(device):
    hidden, weight, bias, labels, ref = make_groups(uniform(3, 2, 0), 8, 20, torch.float32, device)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss, seq = epa_ext.fused_linear_dpo_loss(h, w, labels, ref, bias=bias, sft_weight=1.0)
    expected, _ = eager.fused_dpo_loss(h.detach() @ w.detach().T + bias, labels, ref, sft_weight=1.0)
    assert_close_to_truth(loss, expected.double(), dtype=torch.float32, what="loss of an all-ignored batch")
    assert torch.equal(seq, torch.zeros_like(seq))
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h.grad)) and torch.equal(w.grad, torch.zeros_like(w.grad))


def test_tied_embedding_as_the_lm_head(device):
    torch.manual_seed(0)
    vocab, hidden_size, prompts = 30, 8, 3
    grads = []
    for path in ("ours", "eager"):
        torch.manual_seed(1)
        embedding = torch.nn.Embedding(vocab, hidden_size).to(device)
        input_ids = torch.randint(0, vocab, (2 * prompts, 7), device=device)
        labels = epa_ext.completion_labels(input_ids, torch.ones_like(input_ids, dtype=torch.bool))
        ref = -torch.rand(2 * prompts, device=device) * 20
        hidden = torch.tanh(embedding(input_ids))
        if path == "ours":
            loss, _ = epa_ext.fused_linear_dpo_loss(hidden, embedding.weight, labels, ref, sft_weight=0.2)
        else:
            loss, _ = eager.fused_dpo_loss(hidden @ embedding.weight.T, labels, ref, sft_weight=0.2)
        loss.backward()
        grads.append(embedding.weight.grad)
    assert_paths_agree(grads[0], grads[1], what="tied embedding gradient")


def test_frozen_head_and_no_gradient_form_no_buffers(device):
    hidden, weight, bias, labels, ref = make_groups(uniform(2, 2, 5), 8, 20, torch.float32, device)
    args = (labels, ref, 0.1, "sigmoid", 0.0, 0.0, False, False, "mean", IGNORE_INDEX, 0)
    outputs = torch.ops.epa_ext.linear_dpo_loss(hidden, weight, bias, *args, [True, False, False], True)
    assert [tuple(t.shape) for t in outputs[2:]] == [tuple(hidden.shape), (0,), (0,)]
    outputs = torch.ops.epa_ext.linear_dpo_loss(hidden, weight, bias, *args, [False, False, False], True)
    assert [tuple(t.shape) for t in outputs[2:]] == [(0,), (0,), (0,)]
    # through the public function: a frozen head gets no gradient, hidden gets eager's
    h = hidden.clone().requires_grad_()
    loss, _ = epa_ext.fused_linear_dpo_loss(h, weight, labels, ref, bias=bias)
    loss.backward()
    assert weight.grad is None
    h64 = hidden.double().requires_grad_()
    eager.fused_dpo_loss(h64 @ weight.double().T + bias.double(), labels, ref.double())[0].backward()
    assert_close_to_truth(h.grad, h64.grad, dtype=torch.float32, what="d(hidden) with a frozen head")
    with torch.no_grad():
        value, seq = epa_ext.fused_linear_dpo_loss(hidden, weight, labels, ref, bias=bias)
    assert_paths_agree(value, loss, what="loss without gradients")


def test_gradient_accumulation_over_micro_batches_equals_one_batch(device):
    """Two backward calls (each micro-batch's mean loss weighted by its share, so the upstream
    gradient is 1/2) accumulate into .grad what one call on the whole batch gives. The chosen
    answers of both micro-batches have 7 tokens, so the SFT term's token mean adds up too."""
    lengths = [[4, 6], [3, 8], [2, 2], [5, 5]]
    hidden, weight, bias, labels, ref = make_groups(lengths, 12, 30, torch.float32, device)
    prompts = len(lengths)

    def rows(first, end):  # the rows of prompts [first, end), candidate-major
        return torch.cat([torch.arange(first, end) + c * prompts for c in range(2)]).to(device)

    leaves = {name: [t.clone().requires_grad_() for t in (hidden, weight, bias)] for name in ("big", "micro")}
    h, w, b = leaves["big"]
    loss, _ = epa_ext.fused_linear_dpo_loss(h, w, labels, ref, bias=b, sft_weight=0.3)
    loss.backward()
    h, w, b = leaves["micro"]
    for first, end in ((0, 2), (2, 4)):
        r = rows(first, end)
        micro, _ = epa_ext.fused_linear_dpo_loss(h[r], w, labels[r], ref[r], bias=b, sft_weight=0.3)
        (micro * 0.5).backward()
    for name, big, accumulated in zip(("hidden", "weight", "bias"), leaves["big"], leaves["micro"]):
        assert_paths_agree(accumulated.grad, big.grad, what=f"accumulated d({name})")


def small_batch(device, dtype=torch.float32):
    return make_groups([[4, 6], [3, 0], [5, 5]], 8, 20, dtype, device)


def test_second_backward_through_the_consumed_gradient_raises(device):
    hidden, weight, bias, labels, ref = small_batch(device)
    w = weight.clone().requires_grad_()
    loss, _ = epa_ext.fused_linear_dpo_loss(hidden, w, labels, ref, bias=bias)
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward through the same graph .* is not supported"):
        loss.backward()


def test_second_order_gradients_of_the_losses_are_refused(device):
    hidden, weight, bias, labels, ref = small_batch(device)
    for differentiable in (False, True):
        h = hidden.clone().requires_grad_()
        out = epa_ext.fused_linear_epa_loss(h, weight, labels, ref, bias=bias, num_candidates=2,
                                            differentiable_logps=differentiable)[0] + (h ** 2).sum()
        with pytest.raises(RuntimeError, match="second-order gradients are not supported"):
            torch.autograd.grad(out, [h], create_graph=True)


def test_torch_func_differentiating_transforms_are_refused():
    """torch.func.grad / jacfwd over the linear functions raise our error (not PyTorch's internal
    one about setup_context, and not a zero forward-mode tangent)."""
    hidden, weight, bias, labels, ref = small_batch("cpu")
    calls = {
        "linear_token_logps": lambda h: epa_ext.linear_sequence_logps(h, weight, labels).sum(),
        "fused_linear_dpo_loss": lambda h: epa_ext.fused_linear_dpo_loss(h, weight, labels, ref)[0],
        "fused_linear_epa_loss": lambda h: epa_ext.fused_linear_epa_loss(h, weight, labels, ref, num_candidates=2)[0],
    }
    for name, fn in calls.items():
        for transform in (torch.func.grad, torch.func.jacfwd):
            with pytest.raises(NotImplementedError, match=f"epa_ext.{name} does not support torch.func"):
                transform(fn)(hidden)


def test_when_each_path_is_taken(device):
    """Detached policy log-probs on the three-matmul path; the recomputing path (differentiable
    log-probs) for differentiable_logps=True, reduction="none" and a reference that needs a gradient."""
    hidden, weight, bias, labels, ref = small_batch(device)
    h = hidden.clone().requires_grad_()
    loss, seq = epa_ext.fused_linear_dpo_loss(h, weight, labels, ref, bias=bias)
    assert loss.requires_grad and not seq.requires_grad
    _, seq = epa_ext.fused_linear_dpo_loss(h, weight, labels, ref, bias=bias, differentiable_logps=True)
    assert seq.requires_grad
    losses, seq = epa_ext.fused_linear_dpo_loss(h, weight, labels, ref, bias=bias, reduction="none")
    assert losses.shape == (3,) and seq.requires_grad
    r = ref.clone().requires_grad_()
    loss, seq = epa_ext.fused_linear_dpo_loss(h, weight, labels, r, bias=bias)
    assert seq.requires_grad
    (grad_ref,) = torch.autograd.grad(loss, [r])
    r64 = ref.double().requires_grad_()
    expected = torch.autograd.grad(eager.fused_dpo_loss(hidden.double() @ weight.double().T + bias.double(), labels,
                                                        r64)[0], [r64])[0]
    assert_close_to_truth(grad_ref, expected, dtype=torch.float32, what="d(ref_logps)")


@pytest.mark.parametrize("budget", [None, 7], ids=["whole-groups", "groups-in-pieces"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_log_weights_on_both_paths(budget, dtype, device):
    """Per-candidate log-weights (-inf: absent) on the three-matmul path and the recomputing one,
    with a mask and weak_weight, against eager."""
    lengths = [[6 + (b + c) % 4 for c in range(5)] for b in range(4)]
    inputs = make_groups(lengths, 16, 50, dtype, device)
    gen = torch.Generator().manual_seed(2)
    weights = torch.randn(4, 5, generator=gen)
    weights[1, 3] = float("-inf")
    options = dict(num_candidates=5, num_strong=2, weak_weight=0.5, mask=True, log_weights=weights.to(device))
    check_against_eager("epa", options, inputs, dtype, device, max_chunk_tokens=budget)
    check_against_eager("epa", options, inputs, dtype, device, max_chunk_tokens=budget, differentiable_logps=True)


def test_log_weights_that_require_grad_get_their_gradient(device):
    """The three-matmul op takes log_weights as constants: ones that require grad send the loss down
    the recomputing path, which differentiates them (softmax - onehot(0), as epa_loss does)."""
    hidden, weight, bias, labels, ref = small_batch(device)
    h = hidden.clone().requires_grad_()
    weights = torch.randn(3, 2, device=device)
    w = weights.clone().requires_grad_()
    loss, seq = epa_ext.fused_linear_epa_loss(h, weight, labels, ref, bias=bias, num_candidates=2, log_weights=w)
    assert seq.requires_grad  # the recomputing path
    (grad,) = torch.autograd.grad(loss, [w])
    w64 = weights.double().requires_grad_()
    truth = eager.fused_epa_loss(hidden.double() @ weight.double().T + bias.double(), labels, ref.double(),
                                 num_candidates=2, log_weights=w64)[0]
    assert_close_to_truth(grad, torch.autograd.grad(truth, [w64])[0], dtype=torch.float32, what="d(log_weights)")
    _, seq = epa_ext.fused_linear_epa_loss(h, weight, labels, ref, bias=bias, num_candidates=2, log_weights=weights)
    assert not seq.requires_grad  # constants: the three-matmul path


def test_upstream_gradient_of_one_is_used_as_is(device):
    hidden, weight, bias, labels, ref = small_batch(device)
    grads = []
    for scale in (None, 1.0, 3.0):
        h = hidden.clone().requires_grad_()
        loss, _ = epa_ext.fused_linear_dpo_loss(h, weight, labels, ref, bias=bias)
        (loss * scale if scale else loss).backward()
        grads.append(h.grad)
    assert torch.equal(grads[0], grads[1])
    assert_paths_agree(grads[2], 3 * grads[0], what="scaled d(hidden)")


def test_ipo_on_hidden_states_takes_summed_reference_log_probs(device):
    hidden, weight, bias, labels, ref = make_groups([[4, 12], [9, 3]], 8, 20, torch.float32, device)
    logits = (hidden @ weight.T + bias).double()
    counts = (labels != IGNORE_INDEX).sum(-1).double()
    scores = (eager.sequence_logps(logits, labels) - ref.double()) / counts
    trl = ((scores[:2] - scores[2:] - 1 / (2 * 0.5)) ** 2).mean()
    for differentiable in (False, True):
        loss, _ = epa_ext.fused_linear_dpo_loss(hidden, weight, labels, ref, bias=bias, loss_type="ipo", beta=0.5,
                                                differentiable_logps=differentiable)
        assert_close_to_truth(loss, trl, dtype=torch.float32, what="IPO from hidden states")


def op_args(kind, hidden, weight, bias, labels, ref, output_mask, **overrides):
    """Positional arguments of epa_ext::linear_{dpo,epa}_loss."""
    if kind == "dpo":
        options = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.1, sft_weight=0.2, average=False,
                       ref_logps_averaged=False, reduction="mean", ignore_index=IGNORE_INDEX, max_chunk_tokens=5)
    else:
        options = dict(mask=None, num_candidates=2, beta=0.1, num_strong=1, weak_weight=1.0, sft_weight=0.2,
                       average=True, ref_logps_averaged=False, reduction="sum", ignore_index=IGNORE_INDEX,
                       max_chunk_tokens=0)
    options.update(overrides)
    return (hidden, weight, bias, labels, ref, *options.values(), output_mask, True)


@pytest.mark.parametrize("kind", ["dpo", "epa"])
@pytest.mark.parametrize("output_mask", [[True, True, True], [True, False, False], [False, False, False]], ids=str)
def test_loss_ops_opcheck(kind, output_mask, device):
    hidden, weight, bias, labels, ref = small_batch(device)
    leaves = [t.clone().requires_grad_(need) for t, need in zip((hidden, weight, bias), output_mask)]
    torch.library.opcheck(getattr(torch.ops.epa_ext, f"linear_{kind}_loss").default,
                          op_args(kind, *leaves, labels, ref, output_mask))


@pytest.mark.parametrize("kind", ["dpo", "epa"])
def test_loss_compile_fullgraph(kind, device):
    hidden, weight, bias, labels, ref = small_batch(device)
    mask = torch.tensor([[True, True], [True, False], [True, True]], device=device)

    def step(h, w, b):
        if kind == "dpo":
            return epa_ext.fused_linear_dpo_loss(h, w, labels, ref, bias=b, sft_weight=0.3, max_chunk_tokens=6)[0] * 2
        return epa_ext.fused_linear_epa_loss(h, w, labels, ref, bias=b, num_candidates=2, mask=mask,
                                             max_chunk_tokens=6)[0] * 2

    eager_result = grads_of(step, [hidden, weight, bias])
    compiled = grads_of(torch.compile(step, fullgraph=True, backend="aot_eager"), [hidden, weight, bias])
    assert_paths_agree(compiled[0], eager_result[0], what="compiled loss")
    for a, b in zip(compiled[1], eager_result[1]):
        assert_paths_agree(a, b, what="compiled gradient")


def hidden_weight_labels_ref():
    return small_batch("cpu")


BAD = [  # (call(hidden, weight, bias, labels, ref), error, pattern)
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w[:, :5], y), ValueError, "weight must have H = 8 columns"),
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w[0], y), ValueError, r"weight must have shape \[V, H\]"),
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w, y, bias=b[:3]), ValueError,
     r"bias must have shape \[V\] = \[20\]"),
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w.double(), y), TypeError,
     "weight and hidden must have the same dtype"),
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w.to("meta"), y), ValueError,
     "weight must be on the device of hidden"),
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w, y[:, :4]), ValueError,
     "labels must have the shape of hidden"),
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w, y.float()), TypeError, "labels must be int64"),
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w, y, max_chunk_tokens=0), ValueError,
     "max_chunk_tokens must be a positive"),
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(list(h), w, y), TypeError,
     "hidden must be a torch.Tensor; got list"),
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w, y.index_fill(1, torch.tensor([3]), 57)), ValueError,
     r"labels must lie in \[0, V\) = \[0, 20\) or equal ignore_index \(-100\); got 57 at flat position 3 of labels"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_token_logps(h[0], w, None, y[0], IGNORE_INDEX, -5, True), ValueError,
     r"linear_token_logps: max_chunk_tokens must be a positive number of tokens \(0: automatic, max\(H, 512\)\); got -5"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r[:5], num_candidates=2), ValueError,
     r"ref_logps must have shape \[C\*B\] = \[6\]"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r, num_candidates=4), ValueError,
     "hidden must stack num_candidates = 4 candidates"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_dpo_loss(list(h), w, y, r), TypeError,
     "hidden must be a torch.Tensor; got list"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r, num_candidates=2, mask=[[True, True]] * 3),
     TypeError, "mask must be a torch.Tensor; got list"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_dpo_loss(h, w, y, r, sft_weight=-0.5), ValueError,
     "sft_weight must be a finite number >= 0; got -0.5"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_dpo_loss(h, w, y, r, max_chunk_tokens=0), ValueError,
     "max_chunk_tokens must be a positive number of tokens or None"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_dpo_loss(h, w, y, r, max_chunk_tokens=-3), ValueError,
     "max_chunk_tokens must be a positive number of tokens or None"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_dpo_loss(h, w, y, r, max_chunk_tokens=2.5), TypeError,
     "max_chunk_tokens must be an int; got float"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_dpo_loss(h, w, y.index_fill(1, torch.tensor([4]), 20), r),
     ValueError, r"linear_dpo_loss: labels must lie in \[0, V\) = \[0, 20\) .* got 20 at labels\[0, 4\]"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r, num_candidates=2,
                                                         mask=torch.tensor([[True, True], [False, True], [True, True]])),
     ValueError, r"mask\[:, 0\] must be True .* it is False in row 1"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_dpo_loss(h, w, y, r, ref_logps_averaged=True), ValueError,
     "ref_logps_averaged=True says ref_logps are length-averaged"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_dpo_loss(*op_args("dpo", h, w, b, y, r, [False] * 3,
                                                                      max_chunk_tokens=-1)),
     ValueError, "linear_dpo_loss: max_chunk_tokens must be a positive number of tokens"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_dpo_loss(*op_args("dpo", h, w, b, y, r, [False] * 3,
                                                                      sft_weight=-1.0)),
     ValueError, "linear_dpo_loss: sft_weight must be a finite number >= 0"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_epa_loss(*op_args("epa", h, w, b, y, r, [False] * 3,
                                                                      reduction="none")),
     ValueError, "linear_epa_loss: reduction must be 'mean' or 'sum' \\(reduction='none' takes the recomputing"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_epa_loss(*op_args("epa", h, w, b, y, r, [False] * 3,
                                                                      num_strong=2)),
     ValueError, r"linear_epa_loss: num_strong must lie in \[1, C - 1\] = \[1, 1\]; got 2"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_epa_loss(*op_args("epa", h, w, b, y, r, [False] * 3,
                                                                      mask=torch.ones(3, 2))),
     TypeError, "linear_epa_loss: mask must be a bool tensor"),
    # issue 15: every option checked, on every path; a meta tensor among real ones is a device error
    (lambda h, w, b, y, r: epa_ext.linear_sequence_logps(h, w, y, average="yes"), TypeError,
     "average must be True or False; got str"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_dpo_loss(h, w, y, r, ignore_index=1.5), TypeError,
     "ignore_index must be an int; got float"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_dpo_loss(h, w, y, r, beta="0.1", reduction="none"), TypeError,
     r"beta must be a real number \(float or int\); got str"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r, num_candidates=2, weak_weight=float("inf"),
                                                         differentiable_logps=True),
     ValueError, "weak_weight must be finite; got inf"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r, num_candidates=2,
                                                         mask=torch.ones(3, 2, dtype=torch.bool, device="meta")),
     ValueError, r"mask must be on the device of hidden \(cpu\); got meta"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_epa_loss(*op_args(
        "epa", h, w, b, y, r, [False] * 3, mask=torch.ones(3, 2, dtype=torch.bool, device="meta"))),
     ValueError, r"linear_epa_loss: mask must be on the device of hidden \(cpu\); got meta"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_token_logps_backward(
        *backward_args(h, w, b, y, lse_dtype=torch.float64)),
     TypeError, "linear_token_logps_backward: lse must be the forward's (Float|torch.float32) output"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_token_logps_backward(
        *backward_args(h, w, b, y, grad_dtype=torch.long)),
     TypeError, "linear_token_logps_backward: grad_logps must be a floating-point tensor"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_token_logps_backward(
        *backward_args(h, w, b, y, lse_device="meta")),
     ValueError, r"linear_token_logps_backward: lse must be the forward's output of shape \[54\] on cpu; got "
                 r"\[54\] on meta"),
    (lambda h, w, b, y, r: torch.ops.epa_ext.linear_token_logps_backward(
        *backward_args(h, w, b, y, grad_device="meta")),
     ValueError, r"linear_token_logps_backward: grad_logps must have the shape and device of labels"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r, num_candidates=2, log_weights=torch.zeros(3, 3)),
     ValueError, r"linear_epa_loss: log_weights must have shape \[B, C\] = \[3, 2\]; got \[3, 3\]"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r, num_candidates=2,
                                                         log_weights=torch.zeros(3, 2, dtype=torch.long)),
     TypeError, "linear_epa_loss: log_weights must be a floating-point tensor"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r, num_candidates=2,
                                                         log_weights=torch.full((3, 2), float("nan"))),
     ValueError, r"epa_loss: log_weights must be finite, or -inf for an absent negative .*; got nan at \[0, 0\]"),
    (lambda h, w, b, y, r: epa_ext.fused_linear_epa_loss(h, w, y, r, num_candidates=2, log_weights=[[0.0] * 2] * 3),
     TypeError, "log_weights must be a torch.Tensor; got list"),
]


def backward_args(hidden, weight, bias, labels, *, grad_dtype=torch.float32, grad_device=None,
                  lse_dtype=torch.float32, lse_device=None):
    """Positional arguments of epa_ext::linear_token_logps_backward on the flattened batch, with
    the incoming gradient or the saved lse of the given dtype and device."""
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    rows = flat_labels.shape[0]
    grad = torch.ones(rows, dtype=grad_dtype, device=grad_device or hidden.device)
    lse = torch.zeros(rows, dtype=lse_dtype, device=lse_device or hidden.device)
    logps = torch.zeros(rows, device=hidden.device)
    return grad, flat_hidden, weight, bias, flat_labels, lse, logps, IGNORE_INDEX, 0, [True, True, True], True


@pytest.mark.parametrize("call,error,pattern", BAD, ids=[b[2][:50] for b in BAD])
def test_bad_input_is_a_clear_error(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(*hidden_weight_labels_ref())


META_BAD = [b for b in BAD
            if not any(word in b[2] for word in ("labels must lie", "mask\\[:, 0\\]", "list", "device", "meta",
                                                 "log_weights"))]


@pytest.mark.parametrize("call,error,pattern", META_BAD, ids=[b[2][:50] for b in META_BAD])
def test_bad_input_on_the_meta_device(call, error, pattern):
    """The fake kernels (torch.compile, meta tensors) raise the same errors as the kernels."""
    with pytest.raises(error, match=pattern):
        call(*[t.to("meta") for t in hidden_weight_labels_ref()])


@pytest.mark.parametrize("function", [epa_ext.linear_token_logps, epa_ext.linear_sequence_logps])
def test_the_old_chunk_argument_is_refused_naming_the_new_one(function):
    """One name per concept: the chunk budget is `max_chunk_tokens`, as in the fused-linear losses."""
    hidden, weight, labels = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunk_size': it is called 'max_chunk_tokens'"):
        function(hidden, weight, labels, chunk_size=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunks'$"):
        function(hidden, weight, labels, chunks=2)
