"""A small CUDA workload for compute-sanitizer (memcheck, racecheck): every kernel of epa_ext on
odd shapes, ignored rows, strided views and each dtype, checked against the reference so that a
sanitizer run also fails on wrong answers. Run by bench/gpu_check.sh; needs a GPU."""

from __future__ import annotations

import torch

import epa_ext
from epa_ext import reference


def main() -> None:
    torch.manual_seed(0)
    cases = [((3, 7, 50257), torch.bfloat16), ((5, 123), torch.float32), ((2, 9, 1001), torch.float16),
             ((2, 4, 7), torch.float64)]
    for shape, dtype in cases:
        logits = (torch.randn(shape, device="cuda") * 3).to(dtype)
        labels = torch.randint(0, shape[-1], shape[:-1], device="cuda")
        labels[torch.rand(shape[:-1], device="cuda") < 0.2] = -100
        view = logits[:, :-1] if logits.dim() == 3 else logits[1:]
        view_labels = labels[:, :-1] if labels.dim() == 2 else labels[1:]
        for x, y in ((logits, labels), (view, view_labels)):
            x = x.detach().requires_grad_()
            out = epa_ext.sequence_logps(x, y)
            out.sum().backward()
            ref_x = x.detach().double().requires_grad_()
            ref = reference.sequence_logps(ref_x, y)
            ref.sum().backward()
            tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * shape[-2])
            torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=tol, atol=tol)
    torch.cuda.synchronize()
    print("sanitizer workload: ok")


if __name__ == "__main__":
    main()
