"""Property-based tests (hypothesis) of every public op against the float64 reference: random
shapes (1 row, 1 token, V = 1 and 2 included), dtypes, strided views, ignore patterns, masks,
candidate counts, beta and weak_weight. Forward values and gradients.

EPA_EXT_HYPOTHESIS_EXAMPLES sets the examples per test (default 80 -> 400 in all);
raise it for a long run, e.g. EPA_EXT_HYPOTHESIS_EXAMPLES=2000 make test.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import epa_ext
from epa_ext import IGNORE_INDEX, eager
from numerics import assert_close_to_truth

EXAMPLES = int(os.environ.get("EPA_EXT_HYPOTHESIS_EXAMPLES", "80"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("EPA_EXT_HYPOTHESIS_RANDOM"),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def logits_cases(draw):
    """A [B, T, V] (or [N, V]) logits view with labels: maybe sliced, maybe time-major storage."""
    dtype = draw(DTYPES)
    vocab = draw(st.sampled_from([1, 2, 3, 17, 64, 255, 1000, 4099]))
    two_d = draw(st.booleans())
    batch, steps = draw(st.integers(1, 4)), draw(st.integers(1, 9))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    gen = seeded(draw(st.integers(0, 2**31 - 1)))
    layout = draw(st.sampled_from(["contiguous", "sliced", "time-major"]))
    full_steps = steps + (1 if layout == "sliced" else 0)
    base = torch.randn(batch, full_steps, vocab, generator=gen, dtype=torch.float64) * scale
    if layout == "time-major":
        base = base.transpose(0, 1).contiguous().transpose(0, 1)
    logits = base.to(dtype)[:, :steps]
    ignore = draw(st.sampled_from([0.0, 0.2, 0.7, 1.0]))
    labels = torch.randint(0, vocab, (batch, steps), generator=gen)
    labels[torch.rand(batch, steps, generator=gen) < ignore] = IGNORE_INDEX
    if two_d:
        logits, labels = logits.reshape(-1, vocab), labels.reshape(-1)
    return logits, labels


def value_and_grad(fn, x, upstream_seed=0):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    upstream = torch.rand(out.shape, generator=seeded(upstream_seed), dtype=torch.float64) + 0.5
    (grad,) = torch.autograd.grad(out, [x], upstream.to(out.dtype))
    return out.detach(), grad


@SETTINGS
@given(case=logits_cases(), average=st.booleans())
def test_sequence_and_token_logps(case, average):
    logits, labels = case
    dtype = logits.dtype
    for ours_fn, ref_fn in (
        (lambda x: epa_ext.token_logps(x, labels), lambda x: eager.token_logps(x, labels)),
        (lambda x: epa_ext.sequence_logps(x, labels, average=average),
         lambda x: eager.sequence_logps(x, labels, average=average)),
    ):
        ours, ours_grad = value_and_grad(ours_fn, logits)
        truth, truth_grad = value_and_grad(ref_fn, logits.double())
        plain, plain_grad = value_and_grad(ref_fn, logits)
        assert_close_to_truth(ours, truth, dtype=dtype, plain=plain, what="logps")
        assert_close_to_truth(ours_grad, truth_grad, dtype=dtype, plain=plain_grad, what="d(logits)")


@SETTINGS
@given(loss_type=st.sampled_from(["sigmoid", "robust", "hinge", "ipo"]), batch=st.integers(1, 9),
       beta=st.floats(0.01, 5.0), smoothing=st.sampled_from([0.0, 0.1, 0.3, 0.49]), scale=st.sampled_from([1.0, 50.0]),
       seed=st.integers(0, 2**31 - 1), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_dpo_loss(loss_type, batch, beta, smoothing, scale, seed, reduction):
    smoothing = smoothing if loss_type in ("sigmoid", "robust") else 0.0
    gen = seeded(seed)
    inputs = [-(torch.rand(batch, generator=gen, dtype=torch.float64) * scale) for _ in range(4)]
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=smoothing, reduction=reduction)
    stacked = torch.stack(inputs)

    def ours_fn(x):
        return epa_ext.dpo_loss(*x.float(), **options)

    def ref_fn(x):
        return eager.dpo_loss(*x, **options)

    ours, grad = value_and_grad(ours_fn, stacked)
    truth, truth_grad = value_and_grad(ref_fn, stacked.float().double())  # the same fp32 inputs
    # delta = (pc - rc) - (pr - rr) cancels in fp32: an absolute error ~ eps32 * scale, times the
    # loss's slope (or beta, or ipo's curvature 2) in the value and the gradient
    inputs_scale = scale * max(1.0, beta, float(truth_grad.abs().max()))
    assert_close_to_truth(ours, truth, dtype=torch.float32, inputs_scale=inputs_scale, what="dpo loss")
    assert_close_to_truth(grad, truth_grad, dtype=torch.float32, inputs_scale=inputs_scale, what="dpo gradient")


@st.composite
def epa_cases(draw):
    batch = draw(st.integers(1, 6))
    strong = draw(st.integers(1, 4))
    weak = draw(st.integers(0, 5))
    candidates = 1 + strong + weak
    gen = seeded(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1.0, 20.0, 300.0]))
    policy = -torch.rand(batch, candidates, generator=gen, dtype=torch.float64) * scale
    ref = -torch.rand(batch, candidates, generator=gen, dtype=torch.float64) * scale
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(batch, candidates, generator=gen) > draw(st.sampled_from([0.2, 0.6]))
        mask[:, 0] = True
    return policy, ref, mask, strong, draw(st.floats(0.01, 2.0)), draw(st.sampled_from([0.0, 0.3, 1.0, 4.0]))


@SETTINGS
@given(case=epa_cases(), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_epa_loss(case, reduction):
    policy, ref, mask, strong, beta, weak_weight = case
    options = dict(beta=beta, num_strong=strong, weak_weight=weak_weight, mask=mask, reduction=reduction)
    ref = ref.float().double()  # the fp32 inputs the kernel sees, in float64
    ours, grad = value_and_grad(lambda p: epa_ext.epa_loss(p.float(), ref.float(), **options), policy)
    truth, truth_grad = value_and_grad(lambda p: eager.epa_loss(p.float().double(), ref, **options), policy)
    # scores beta * (policy - ref) are formed in fp32: an absolute error ~ eps32 * their magnitude,
    # in the loss and (times beta) in the gradient
    inputs_scale = max(1.0, beta) * beta * float(policy.abs().max() + ref.abs().max())
    assert_close_to_truth(ours, truth, dtype=torch.float32, inputs_scale=inputs_scale, what="epa loss")
    assert_close_to_truth(grad, truth_grad, dtype=torch.float32, inputs_scale=inputs_scale, what="epa gradient")
    if mask is not None:
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


@SETTINGS
@given(hidden_size=st.integers(1, 40), vocab=st.sampled_from([1, 2, 7, 100, 513]), rows=st.integers(1, 30),
       chunk=st.sampled_from([None, 1, 3, 8]), with_bias=st.booleans(), ignore=st.sampled_from([0.0, 0.3, 1.0]),
       dtype=DTYPES, seed=st.integers(0, 2**31 - 1))
def test_linear_sequence_logps(hidden_size, vocab, rows, chunk, with_bias, ignore, dtype, seed):
    gen = seeded(seed)
    hidden = torch.randn(2, rows, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / max(hidden_size, 1) ** 0.5
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    labels = torch.randint(0, vocab, (2, rows), generator=gen)
    labels[torch.rand(2, rows, generator=gen) < ignore] = IGNORE_INDEX
    params = [hidden, weight] + ([bias] if with_bias else [])

    def run(fn, tensors):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        upstream = torch.rand(out.shape, generator=seeded(1), dtype=torch.float64) + 0.5
        return out.detach(), torch.autograd.grad(out, leaves, upstream.to(out.dtype))

    def ours_fn(h, w, b=None):
        return epa_ext.linear_sequence_logps(h, w, labels, bias=b, max_chunk_tokens=chunk)

    def eager_fn(h, w, b=None):
        return eager.linear_sequence_logps(h, w, labels, b)

    ours, ours_grads = run(ours_fn, [t.to(dtype) for t in params])
    truth, truth_grads = run(eager_fn, params)
    plain, plain_grads = run(eager_fn, [t.to(dtype) for t in params])
    assert_close_to_truth(ours, truth, dtype=dtype, plain=plain, what="sequence logps")
    for name, a, t, p in zip(("hidden", "weight", "bias"), ours_grads, truth_grads, plain_grads):
        # each is a sum over tokens or H of products of bf16/fp16-rounded gradients: on these tiny
        # shapes plain torch's error is a noisy yardstick, so allow a few ulps
        assert_close_to_truth(a, t, dtype=dtype, plain=p, what=f"d({name})", slack_ulps=4)


@SETTINGS
@given(prompts=st.integers(1, 3), candidates=st.integers(2, 5), steps=st.integers(1, 6),
       vocab=st.sampled_from([2, 31, 300]), inplace=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fused_losses_equal_their_composition(prompts, candidates, steps, vocab, inplace, seed):
    gen = seeded(seed)
    rows = prompts * candidates
    logits = torch.randn(rows, steps, vocab, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (rows, steps), generator=gen)
    labels[torch.rand(rows, steps, generator=gen) < 0.3] = IGNORE_INDEX
    ref = -torch.rand(rows, generator=gen, dtype=torch.float64) * steps * 3

    def ours(x):
        return epa_ext.fused_epa_loss(x * 1, labels, ref.float(), num_candidates=candidates, beta=0.5,
                                      inplace_backward=inplace)[0]

    logits, ref = logits.float().double(), ref.float().double()  # the fp32 inputs, in float64
    value, grad = value_and_grad(ours, logits.float())
    truth, truth_grad = value_and_grad(
        lambda x: eager.fused_epa_loss(x, labels, ref, num_candidates=candidates, beta=0.5)[0], logits)
    # the scores 0.5 * (sequence log-prob - ref) are formed in fp32 from sums over the tokens
    seq = eager.sequence_logps(logits, labels)
    inputs_scale = 0.5 * float(seq.abs().max() + ref.abs().max())
    assert_close_to_truth(value, truth, dtype=torch.float32, inputs_scale=inputs_scale, what="fused epa loss")
    assert_close_to_truth(grad, truth_grad, dtype=torch.float32, inputs_scale=inputs_scale, what="d(logits)")


@st.composite
def linear_loss_cases(draw):
    """Prompt groups of random lengths (0 included: all-ignored sequences) for the three-matmul
    fused-linear losses, with a random chunk budget (so groups pack, split or go in pieces)."""
    kind = draw(st.sampled_from(["dpo", "epa"]))
    candidates = 2 if kind == "dpo" else draw(st.integers(2, 5))
    prompts = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 9), min_size=prompts * candidates, max_size=prompts * candidates))
    hidden_size, vocab = draw(st.integers(1, 24)), draw(st.sampled_from([1, 2, 17, 64]))
    gen = seeded(draw(st.integers(0, 2**31 - 1)))
    steps = max(lengths) + 1
    labels = torch.full((prompts * candidates, steps), IGNORE_INDEX)
    for row, length in enumerate(lengths):
        labels[row, 1: 1 + length] = torch.randint(0, vocab, (length,), generator=gen)
    hidden = torch.randn(prompts * candidates, steps, hidden_size, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / hidden_size**0.5
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None
    ref = (-torch.rand(prompts * candidates, generator=gen, dtype=torch.float64) * 3 * torch.tensor(lengths)).float()
    options = dict(sft_weight=draw(st.sampled_from([0.0, 0.5])), average=draw(st.booleans()),
                   reduction=draw(st.sampled_from(["mean", "sum"])), beta=draw(st.sampled_from([0.1, 1.0])))
    if kind == "dpo":
        options["loss_type"] = draw(st.sampled_from(["sigmoid", "robust", "hinge", "ipo"]))
    else:
        options.update(num_candidates=candidates, num_strong=draw(st.integers(1, candidates - 1)),
                       weak_weight=draw(st.sampled_from([0.0, 0.5, 1.0])))
        if draw(st.booleans()):
            mask = torch.rand(prompts, candidates, generator=gen) > 0.3
            mask[:, 0] = True
            options["mask"] = mask
    budget = draw(st.sampled_from([None, 1, 3, 8, 20]))
    return kind, hidden, weight, bias, labels, ref, options, budget, draw(DTYPES)


@SETTINGS
@given(case=linear_loss_cases())
def test_three_matmul_linear_losses(case):
    kind, hidden, weight, bias, labels, ref, options, budget, dtype = case
    params = [hidden, weight] + ([bias] if bias is not None else [])

    def run(fn, tensors):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        return out.detach(), torch.autograd.grad(out, leaves, torch.tensor(1.7, dtype=out.dtype))

    def ours(h, w, b=None):
        fn = epa_ext.fused_linear_dpo_loss if kind == "dpo" else epa_ext.fused_linear_epa_loss
        return fn(h, w, labels, ref, bias=b, max_chunk_tokens=budget, **options)[0]

    def plain(h, w, b=None):
        fn = eager.fused_dpo_loss if kind == "dpo" else eager.fused_epa_loss
        return fn(h @ w.T + (0 if b is None else b), labels, ref.to(h.dtype), **options)[0]

    value, grads = run(ours, [t.to(dtype) for t in params])
    truth, truth_grads = run(plain, params)
    in_dtype, in_dtype_grads = run(plain, [t.to(dtype) for t in params])
    assert_close_to_truth(value, truth, dtype=dtype, plain=in_dtype, what=f"{kind} loss", slack_ulps=4)
    for name, a, t, p in zip(("hidden", "weight", "bias"), grads, truth_grads, in_dtype_grads):
        assert_close_to_truth(a, t, dtype=dtype, plain=p, what=f"{kind} d({name})", slack_ulps=4)
