"""linear_sequence_logps and fused_linear_*_loss: from hidden states and the lm_head, against the
eager path (full logits, log_softmax, gather) in float64 and in each dtype."""

from __future__ import annotations

import pytest
import torch

import epa_ext
from epa_ext import eager
from numerics import assert_close_to_truth


def make_inputs(batch, seq_len, hidden_size, vocab, dtype, device, *, ignore_fraction=0.2, with_bias=True):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(batch, seq_len, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5 * 2
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    labels[torch.rand(batch, seq_len, generator=gen) < ignore_fraction] = -100
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), labels.to(device)


def grads_of(fn, tensors, upstream_seed=5):
    """Value of fn(*leaves) and the gradients of its inputs (None where an input is None or frozen)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad or t.is_floating_point())
              for t in tensors]
    out = fn(*leaves)
    upstream = torch.rand(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(upstream_seed)) + 0.5
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
        return epa_ext.linear_sequence_logps(h, w, labels, bias=b, average=average, chunk_size=chunk)

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
        lambda h, w, b: epa_ext.linear_sequence_logps(h, w, labels, bias=b, chunk_size=3), args
    )


@pytest.mark.parametrize("ignore_fraction", [0.2, 1.0])
def test_ignored_rows(ignore_fraction, device):
    hidden, weight, bias, labels = make_inputs(3, 8, 16, 50, torch.float32, device, ignore_fraction=ignore_fraction)
    value, grads = grads_of(lambda h, w, b: epa_ext.linear_sequence_logps(h, w, labels, bias=b, chunk_size=5),
                            [hidden, weight, bias])
    truth, truth_grads = grads_of(lambda h, w, b: eager.linear_sequence_logps(h, w, labels, b),
                                  [t.double() for t in (hidden, weight, bias)])
    assert_close_to_truth(value, truth, dtype=torch.float32)
    for g, t in zip(grads, truth_grads):
        assert_close_to_truth(g, t, dtype=torch.float32)
    ignored = labels == -100
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
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_bf16_weight_gradient_accumulates_in_fp32(device):
    hidden, weight, _, labels = make_inputs(4, 64, 32, 64, torch.bfloat16, device, with_bias=False)
    errors = {}
    truth = grads_of(lambda h, w: eager.linear_sequence_logps(h, w, labels), [hidden.double(), weight.double()])[1][1]
    for fp32 in (True, False):
        grad = grads_of(lambda h, w: epa_ext.linear_sequence_logps(h, w, labels, chunk_size=8, fp32_weight_grad=fp32),
                        [hidden, weight])[1][1]
        errors[fp32] = (grad.double() - truth).abs().max().item()
    assert errors[True] <= errors[False]


def test_token_logps_match_the_logits_op(device):
    hidden, weight, bias, labels = make_inputs(2, 9, 10, 77, torch.float32, device)
    ours = epa_ext.linear_token_logps(hidden, weight, labels, bias=bias, chunk_size=4)
    via_logits = epa_ext.token_logps(hidden @ weight.T + bias, labels)
    torch.testing.assert_close(ours, via_logits, rtol=1e-5, atol=1e-5)
    flat = epa_ext.linear_token_logps(hidden.reshape(-1, 10), weight, labels.reshape(-1), bias=bias)
    torch.testing.assert_close(flat.view(2, 9), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias, device):
    hidden, weight, bias, labels = make_inputs(2, 5, 6, 11, torch.float32, device, with_bias=with_bias)
    h2, y1 = hidden.reshape(10, 6), labels.reshape(10)
    torch.library.opcheck(torch.ops.epa_ext.linear_token_logps.default,
                          (h2.requires_grad_(), weight.requires_grad_(), bias, y1, -100, 3, True))
    logps, lse = torch.ops.epa_ext.linear_token_logps(h2.detach(), weight.detach(), bias, y1, -100, 3, True)
    torch.library.opcheck(torch.ops.epa_ext.linear_token_logps_backward.default,
                          (torch.rand(10, device=device), h2.detach(), weight.detach(), bias, y1, lse, logps, -100, 3,
                           [True, True, with_bias], True))


def test_compile_fullgraph(device):
    hidden, weight, bias, labels = make_inputs(2, 6, 8, 30, torch.float32, device)

    def fn(h, w, b):
        return epa_ext.linear_sequence_logps(h, w, labels, bias=b, average=True, chunk_size=5).sum()

    results = [grads_of(f, [hidden, weight, bias]) for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager"))]
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


def test_fused_linear_losses_equal_the_logits_path(device):
    hidden, weight, bias, labels = make_inputs(8, 6, 12, 40, torch.float32, device)
    ref = -torch.rand(8, device=device) * 20
    mask = torch.rand(2, 4, device=device) > 0.3
    mask[:, 0] = True
    cases = [
        (lambda h, w, b: epa_ext.fused_linear_epa_loss(h, w, labels, ref, bias=b, num_candidates=4, num_strong=2,
                                                        weak_weight=0.5, mask=mask, max_chunk_tokens=7)[0],
         lambda h, w, b: epa_ext.fused_epa_loss(h @ w.T + b, labels, ref, num_candidates=4, num_strong=2,
                                                weak_weight=0.5, mask=mask)[0]),
        (lambda h, w, b: epa_ext.fused_linear_epa_loss(h, w, labels, ref, bias=b, num_candidates=2, sft_weight=0.3,
                                                        average=True)[0],
         lambda h, w, b: epa_ext.fused_epa_loss(h @ w.T + b, labels, ref, num_candidates=2, sft_weight=0.3,
                                                average=True)[0]),
        (lambda h, w, b: epa_ext.fused_linear_dpo_loss(h, w, labels, ref, bias=b, loss_type="ipo", beta=0.5)[0],
         lambda h, w, b: epa_ext.fused_dpo_loss(h @ w.T + b, labels, ref, loss_type="ipo", beta=0.5)[0]),
        (lambda h, w, b: epa_ext.fused_linear_dpo_loss(h, w, labels, ref, bias=b, label_smoothing=0.1)[0],
         lambda h, w, b: eager.fused_dpo_loss(h @ w.T + b, labels, ref, label_smoothing=0.1)[0]),
    ]
    for ours_fn, logits_fn in cases:
        value, grads = grads_of(ours_fn, [hidden, weight, bias])
        expected, expected_grads = grads_of(logits_fn, [hidden, weight, bias])
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


BAD = [
    (lambda h, w, b, y: epa_ext.linear_sequence_logps(h, w[:, :5], y), "weight must have H = 6 columns"),
    (lambda h, w, b, y: epa_ext.linear_sequence_logps(h, w[0], y), r"weight must have shape \[V, H\]"),
    (lambda h, w, b, y: epa_ext.linear_sequence_logps(h, w, y, bias=b[:3]), r"bias must have shape \[V\] = \[11\]"),
    (lambda h, w, b, y: epa_ext.linear_sequence_logps(h, w.double(), y), "weight and hidden must have the same dtype"),
    (lambda h, w, b, y: epa_ext.linear_sequence_logps(h, w.to("meta"), y), "weight must be on the device of hidden"),
    (lambda h, w, b, y: epa_ext.linear_sequence_logps(h, w, y[:, :4]), "labels must have the shape of hidden"),
    (lambda h, w, b, y: epa_ext.linear_sequence_logps(h, w, y.float()), "labels must be int64"),
    (lambda h, w, b, y: epa_ext.linear_sequence_logps(h, w, y, chunk_size=0), "chunk_size must be a positive"),
    (lambda h, w, b, y: epa_ext.fused_linear_epa_loss(h, w, y, torch.zeros(2), num_candidates=3),
     "hidden must stack num_candidates = 3 candidates"),
]


@pytest.mark.parametrize("call,pattern", BAD)
def test_bad_input_is_a_clear_error(call, pattern):
    hidden, weight, bias, labels = make_inputs(2, 5, 6, 11, torch.float32, "cpu")
    with pytest.raises((RuntimeError, ValueError), match=pattern):
        call(hidden, weight, bias, labels)
