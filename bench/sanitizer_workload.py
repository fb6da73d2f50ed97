"""A small CUDA workload for compute-sanitizer (memcheck, racecheck): every kernel of epa_ext
(log-probs on odd shapes, ignored rows, strided views and each dtype; the losses with and without
masks; the chunked linear path; the three-matmul fused-linear losses with packed and oversized
prompt groups), checked against the reference so that a sanitizer run also fails
on wrong answers. Run by bench/gpu_check.sh; needs a GPU."""

from __future__ import annotations

import torch

import epa_ext
from epa_ext import eager


def main() -> None:
    torch.manual_seed(0)
    cases = [((3, 7, 50257), torch.bfloat16), ((5, 123), torch.float32), ((2, 9, 1001), torch.float16),
             ((2, 4, 7), torch.float64)]
    for shape, dtype in cases:
        logits = (torch.randn(shape, device="cuda") * 3).to(dtype)
        labels = torch.randint(0, shape[-1], shape[:-1], device="cuda")
        labels[torch.rand(shape[:-1], device="cuda") < 0.2] = epa_ext.IGNORE_INDEX
        view = logits[:, :-1] if logits.dim() == 3 else logits[1:]
        view_labels = labels[:, :-1] if labels.dim() == 2 else labels[1:]
        for x, y in ((logits, labels), (view, view_labels)):
            x = x.detach().requires_grad_()
            out = epa_ext.sequence_logps(x, y)
            out.sum().backward()
            ref_x = x.detach().double().requires_grad_()
            ref = eager.sequence_logps(ref_x, y)
            ref.sum().backward()
            tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * shape[-2])
            torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=tol, atol=tol)
    check_losses()
    check_linear()
    check_linear_losses()
    torch.cuda.synchronize()
    print("sanitizer workload: ok")


def check_losses() -> None:
    """Every loss kernel, forward and backward, with masks, against the reference."""
    policy = (-torch.rand(37, 6, device="cuda") * 50).requires_grad_()
    ref = -torch.rand(37, 6, device="cuda") * 50
    mask = torch.rand(37, 6, device="cuda") > 0.3
    mask[:, 0] = True
    for m in (None, mask):
        ours = epa_ext.epa_loss(policy, ref, num_strong=2, weak_weight=0.5, mask=m, reduction="sum")
        (grad,) = torch.autograd.grad(ours, policy)
        truth_policy = policy.detach().double().requires_grad_()
        truth = eager.epa_loss(truth_policy, ref.double(), num_strong=2, weak_weight=0.5, mask=m, reduction="sum")
        (truth_grad,) = torch.autograd.grad(truth, truth_policy)
        torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-4, atol=1e-6)
    pairs = [policy[:, i].detach().requires_grad_() for i in range(4)]
    for loss_type in ("sigmoid", "robust", "hinge", "ipo"):
        ours = epa_ext.dpo_loss(*pairs, loss_type=loss_type, reduction="sum")
        truth = eager.dpo_loss(*(p.double() for p in pairs), loss_type=loss_type, reduction="sum")
        torch.testing.assert_close(ours.double(), truth, rtol=1e-5, atol=1e-4)
        torch.autograd.grad(ours, pairs)



def check_linear() -> None:
    """The chunked linear path, with ignored rows and a chunk size that does not divide N."""
    hidden = torch.randn(3, 11, 40, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(301, 40, device="cuda", dtype=torch.bfloat16) / 6).requires_grad_()
    labels = torch.randint(0, 301, (3, 11), device="cuda")
    labels[:, :4] = epa_ext.IGNORE_INDEX
    ours = epa_ext.linear_sequence_logps(hidden, weight, labels, max_chunk_tokens=7)
    grads = torch.autograd.grad(ours.sum(), [hidden, weight])
    ref_in = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    truth = eager.linear_sequence_logps(*ref_in, labels)
    truth_grads = torch.autograd.grad(truth.sum(), ref_in)
    torch.testing.assert_close(ours.double(), truth, rtol=2e-2, atol=0.5)
    for g, t in zip(grads, truth_grads):
        torch.testing.assert_close(g.double(), t, rtol=5e-2, atol=5e-2)


def check_linear_losses() -> None:
    """The three-matmul losses: groups packed into chunks, one group over the budget (pieces),
    an all-ignored sequence, bf16 weights with fp32 accumulation."""
    prompts, candidates, steps = 5, 4, 13
    hidden = torch.randn(candidates * prompts, steps, 40, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(301, 40, device="cuda", dtype=torch.bfloat16) / 6).requires_grad_()
    labels = torch.randint(0, 301, (candidates * prompts, steps), device="cuda")
    labels[:, :3] = epa_ext.IGNORE_INDEX
    labels[prompts + 1] = epa_ext.IGNORE_INDEX
    ref = -torch.rand(candidates * prompts, device="cuda") * 50
    mask = torch.rand(prompts, candidates, device="cuda") > 0.2
    mask[:, 0] = True
    options = dict(num_candidates=candidates, num_strong=2, weak_weight=0.5, mask=mask, sft_weight=0.3)
    loss, _ = epa_ext.fused_linear_epa_loss(hidden, weight, labels, ref, max_chunk_tokens=30, **options)
    grads = torch.autograd.grad(loss, [hidden, weight])
    ref_in = [hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()]
    truth, _ = eager.fused_epa_loss(ref_in[0] @ ref_in[1].T, labels, ref.double(), **options)
    truth_grads = torch.autograd.grad(truth, ref_in)
    torch.testing.assert_close(loss.double(), truth, rtol=2e-2, atol=2e-2)
    for g, t in zip(grads, truth_grads):
        torch.testing.assert_close(g.double(), t, rtol=5e-2, atol=5e-2)


if __name__ == "__main__":
    main()
