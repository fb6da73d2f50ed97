"""fused_dpo_loss / fused_epa_loss: equal to the composition sequence_logps -> loss, in value and
d(logits), with and without the in-place backward."""

from __future__ import annotations

import pytest
import torch

import epa_ext
from epa_ext import eager
from numerics import assert_close_to_truth


def make_batch(candidates, prompts, seq_len, vocab, dtype, device, ignore_fraction=0.3):
    rows = candidates * prompts
    logits = (torch.randn(rows, seq_len, vocab, dtype=torch.float64) * 2).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows, seq_len))
    labels[torch.rand(rows, seq_len) < ignore_fraction] = -100
    labels[:, -1] = -100
    ref_logps = (-torch.rand(rows, dtype=torch.float64) * seq_len * 3).float().to(device)
    return logits, labels.to(device), ref_logps


def run(fn, logits, *args, **kwargs):
    x = logits.detach().clone().requires_grad_()
    loss, seq = fn(x * 1 if kwargs.get("inplace_backward") else x, *args, **kwargs)
    # the same upstream gradient for every call (each provider gets equal work)
    upstream = torch.rand(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) + 0.5
    loss.backward(upstream.to(loss.dtype).to(loss.device))
    return loss.detach(), seq.detach(), x.grad


def check_fused(ours_fn, ref_fn, logits, labels, ref_logps, *, inplace, **options):
    dtype = logits.dtype
    loss, seq, grad = run(ours_fn, logits, labels, ref_logps, inplace_backward=inplace, **options)
    truth_loss, truth_seq, truth_grad = run(ref_fn, logits.double(), labels, ref_logps.double(), **options)
    plain_loss, plain_seq, plain_grad = run(ref_fn, logits, labels, ref_logps, **options)
    assert loss.dtype == torch.float32 and seq.dtype == torch.float32 and grad.dtype == dtype
    assert_close_to_truth(seq, truth_seq, dtype=dtype, plain=plain_seq, what="policy_seq_logps")
    assert_close_to_truth(loss, truth_loss, dtype=dtype, plain=plain_loss, what="loss")
    assert_close_to_truth(grad, truth_grad, dtype=dtype, plain=plain_grad, what="d(logits)")


EPA_OPTIONS = [
    dict(num_candidates=4, beta=0.1),
    dict(num_candidates=6, beta=0.05, num_strong=2, weak_weight=0.5, reduction="sum"),
    dict(num_candidates=3, beta=0.1, average=True, reduction="none"),
]


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
@pytest.mark.parametrize("options", EPA_OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_epa_equals_composition(options, inplace, dtype, device):
    logits, labels, ref = make_batch(options["num_candidates"], 3, 9, 131, dtype, device)
    check_fused(epa_ext.fused_epa_loss, eager.fused_epa_loss, logits, labels, ref, inplace=inplace, **options)


def test_fused_epa_with_mask(device):
    logits, labels, ref = make_batch(5, 4, 7, 64, torch.float32, device)
    mask = torch.rand(4, 5, device=device) > 0.4
    mask[:, 0] = True
    check_fused(epa_ext.fused_epa_loss, eager.fused_epa_loss, logits, labels, ref, inplace=False,
                num_candidates=5, num_strong=2, mask=mask)
    # absent candidates get no gradient at all
    x = logits.clone().requires_grad_()
    loss, _ = epa_ext.fused_epa_loss(x, labels, ref, num_candidates=5, num_strong=2, mask=mask)
    loss.backward()
    absent_rows = (~mask).T.reshape(-1)  # candidate-major rows
    assert torch.equal(x.grad[absent_rows], torch.zeros_like(x.grad[absent_rows]))


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_dpo_equals_composition(loss_type, inplace, dtype, device):
    logits, labels, ref = make_batch(2, 4, 11, 97, dtype, device)
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    beta = 0.5 if loss_type == "ipo" else 0.1
    if loss_type == "ipo":  # IPO works on length-averaged log-probs, the reference's too
        ref = ref / (labels != -100).sum(-1).clamp_min(1)
    check_fused(epa_ext.fused_dpo_loss, eager.fused_dpo_loss, logits, labels, ref, inplace=inplace,
                beta=beta, loss_type=loss_type, label_smoothing=smoothing)


def test_inplace_backward_writes_the_gradient_into_the_logits(device):
    logits, labels, ref = make_batch(4, 2, 5, 33, torch.float32, device)
    expected = run(epa_ext.fused_epa_loss, logits, labels, ref, num_candidates=4)[2]
    hidden = torch.randn(8, 5, 16, device=device, requires_grad=True)
    head = torch.randn(33, 16, device=device) * 0.1
    produced = hidden @ head.T  # a non-leaf, as an lm_head produces
    storage = produced.data_ptr()
    loss, _ = epa_ext.fused_epa_loss(produced, labels, ref, num_candidates=4, inplace_backward=True)
    grads = torch.autograd.grad(loss, [produced], retain_graph=True)[0]
    assert grads.data_ptr() == storage  # no second logits-sized buffer
    assert torch.equal(produced.detach(), grads)
    # The same gradient reaches the hidden states as without the in-place backward.
    h1 = hidden.detach().clone().requires_grad_()
    loss1, _ = epa_ext.fused_epa_loss(h1 @ head.T, labels, ref, num_candidates=4)
    loss1.backward()
    h2 = hidden.detach().clone().requires_grad_()
    loss2, _ = epa_ext.fused_epa_loss(h2 @ head.T, labels, ref, num_candidates=4, inplace_backward=True)
    loss2.backward()
    torch.testing.assert_close(h2.grad, h1.grad)
    del expected


def test_inplace_backward_op_opcheck(device):
    logits, labels, _ = make_batch(2, 2, 3, 17, torch.float32, device)
    logps, lse = torch.ops.epa_ext.token_logps(logits, labels, -100)
    torch.library.opcheck(torch.ops.epa_ext.token_logps_backward_.default,
                          (torch.rand(labels.shape, device=device), logits.clone(), labels, lse, logps, -100))


def test_fused_compile_fullgraph(device):
    logits, labels, ref = make_batch(4, 2, 6, 40, torch.float32, device)

    def step(x):
        epa, _ = epa_ext.fused_epa_loss(x, labels, ref, num_candidates=4, num_strong=2, weak_weight=0.5)
        dpo, _ = epa_ext.fused_dpo_loss(x[:4], labels[:4], ref[:4], loss_type="ipo", beta=0.5)
        return epa + dpo

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        x = logits.clone().requires_grad_()
        out = fn(x)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_fused_bad_input():
    logits, labels, ref = make_batch(3, 2, 4, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="num_candidates = 4 .* got 6 rows, which 4 does not divide"):
        epa_ext.fused_epa_loss(logits, labels, ref, num_candidates=4)
    with pytest.raises(ValueError, match="num_candidates = 2 .* got 7 rows"):
        epa_ext.fused_dpo_loss(logits[:1].repeat(7, 1, 1), labels[:1].repeat(7, 1), ref[:1].repeat(7))
    with pytest.raises(ValueError, match=r"ref_logps must have shape \[C\*B\] = \[6\]"):
        epa_ext.fused_epa_loss(logits, labels, ref[:5], num_candidates=3)
    with pytest.raises(ValueError, match=r"logits must have shape \[C\*B, T, V\]"):
        epa_ext.fused_epa_loss(logits[0], labels[0], ref, num_candidates=3)
    with pytest.raises(ValueError, match=r"num_strong must lie in \[1, C - 1\] = \[1, 2\]; got 3"):
        epa_ext.fused_epa_loss(logits, labels, ref, num_candidates=3, num_strong=3)
    with pytest.raises(ValueError, match="ref_logps must be on the device of logits"):
        epa_ext.fused_epa_loss(logits, labels, ref.to("meta"), num_candidates=3)
