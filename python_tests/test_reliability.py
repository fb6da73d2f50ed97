"""Reliability of the ops: non-finite input, huge vocabularies and 64-bit offsets, bitwise
determinism, and no memory growth over thousands of calls."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import CUDA

import epa_ext
from epa_ext import IGNORE_INDEX, eager
from numerics import assert_close_to_truth


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad(out.sum(), [x])
    return out.detach(), grad


@pytest.mark.parametrize("vocab", [3, 5000])  # the scalar path and the vectorized one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_in_a_row_poisons_only_that_row(vocab, dtype, device):
    logits = torch.randn(4, vocab, device=device).to(dtype)
    labels = torch.randint(0, vocab, (4,), device=device)
    clean_out, clean_grad = grad_of(lambda x: epa_ext.token_logps(x, labels), logits)
    poisoned = logits.clone()
    poisoned[1, vocab // 2] = float("nan")
    out, grad = grad_of(lambda x: epa_ext.token_logps(x, labels), poisoned)
    assert torch.isnan(out[1]) and torch.isnan(grad[1]).all()
    keep = torch.tensor([0, 2, 3], device=device)
    assert torch.equal(out[keep], clean_out[keep]) and torch.equal(grad[keep], clean_grad[keep])


@pytest.mark.parametrize("vocab", [3, 5000])
def test_minus_inf_logits_are_exact(vocab, device):
    logits = torch.randn(6, vocab, dtype=torch.float64)
    masked = torch.rand(6, vocab) < 0.5
    masked[:, 0] = False
    masked[2] = True  # a row whose whole vocabulary but its target is masked
    masked[2, 0] = False
    logits = logits.masked_fill(masked, float("-inf"))
    labels = torch.zeros(6, dtype=torch.long)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype).to(device)
        out, grad = grad_of(lambda t: epa_ext.token_logps(t, labels.to(device)), x)
        truth, truth_grad = grad_of(lambda t: eager.token_logps(t, labels), x.double().cpu())
        plain, plain_grad = grad_of(lambda t: eager.token_logps(t, labels), x.cpu())
        assert_close_to_truth(out, truth, dtype=dtype, plain=plain, what="logps")
        assert_close_to_truth(grad, truth_grad, dtype=dtype, plain=plain_grad, what="d(logits)")
        assert out[2].item() == 0.0 and torch.equal(grad[masked.to(device)], torch.zeros_like(grad[masked.to(device)]))


def test_target_at_minus_inf(device):
    logits = torch.randn(2, 300, device=device)
    logits[0, 7] = float("-inf")
    labels = torch.tensor([7, 3], device=device)
    out, grad = grad_of(lambda x: epa_ext.token_logps(x, labels), logits)
    assert out[0].item() == float("-inf") and torch.isfinite(out[1])
    assert torch.isfinite(grad).all()
    assert grad[0, 7].item() == 1.0  # d logp / d z_y = 1 - p_y = 1
    torch.testing.assert_close(grad[0], torch.nn.functional.one_hot(torch.tensor(7), 300).float().to(device)
                               - torch.softmax(logits[0], 0))


def test_all_ignored_batch_gives_zeros(device):
    logits = torch.randn(3, 4, 50, device=device)
    labels = torch.full((3, 4), IGNORE_INDEX, device=device)
    for fn in (lambda x: epa_ext.token_logps(x, labels), lambda x: epa_ext.sequence_logps(x, labels, average=True)):
        out, grad = grad_of(fn, logits)
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(grad, torch.zeros_like(grad))


def test_largest_vocabulary(device):
    vocab = 262144
    logits = torch.randn(3, vocab, device=device) * 4
    labels = torch.tensor([0, vocab - 1, 12345], device=device)
    out, grad = grad_of(lambda x: epa_ext.token_logps(x, labels), logits)
    truth, truth_grad = grad_of(lambda x: eager.token_logps(x, labels.cpu()), logits.double().cpu())
    assert_close_to_truth(out, truth, dtype=torch.float32)
    assert_close_to_truth(grad, truth_grad, dtype=torch.float32)


def available_memory_gib() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) / 2**20


def test_offsets_beyond_2_pow_31_elements(device):
    """bf16 logits of 16385 x 131072 = 2^31 + 131072 elements: the last row starts past what a 32-bit
    offset can address. Only that row and two others are kept (ignored rows are never read in
    forward), and the in-place backward writes every row."""
    if device == "cpu" and (not Path("/proc/meminfo").exists() or available_memory_gib() < 10):
        pytest.skip("needs about 9 GiB of free memory")
    rows, vocab = 16385, 131072
    assert rows * vocab > 2**31
    logits = torch.empty(rows, vocab, dtype=torch.bfloat16, device=device)
    kept = torch.tensor([0, rows // 2, rows - 1])
    values = (torch.randn(3, vocab) * 3).to(torch.bfloat16)
    logits[kept.to(device)] = values.to(device)
    labels = torch.full((rows,), IGNORE_INDEX)
    labels[kept] = torch.tensor([5, vocab - 1, 77])
    logps, lse = torch.ops.epa_ext.token_logps(logits, labels.to(device), IGNORE_INDEX)
    truth, truth_grad = grad_of(lambda x: eager.token_logps(x, labels[kept]), values.double())
    plain, plain_grad = grad_of(lambda x: eager.token_logps(x, labels[kept]), values)
    assert_close_to_truth(logps.cpu()[kept], truth, dtype=torch.bfloat16, plain=plain, what="logps")
    assert torch.equal(logps.cpu()[labels == IGNORE_INDEX], torch.zeros(rows - 3))
    torch.ops.epa_ext.token_logps_backward_(torch.ones(rows, device=device), logits, labels.to(device), lse, logps,
                                            IGNORE_INDEX)
    assert_close_to_truth(logits.cpu()[kept], truth_grad, dtype=torch.bfloat16, plain=plain_grad, what="d(logits)")
    assert not logits[1].any() and not logits[rows - 2].any()  # ignored rows zero-filled, past 2^31 too


@CUDA
def test_cuda_is_bitwise_deterministic():
    """No kernel uses atomics: the same inputs give the same bits, run after run."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 64, 32000, generator=g).to("cuda", torch.bfloat16)
    labels = torch.randint(0, 32000, (4, 64), generator=g).cuda()
    policy = torch.randn(16, 6, generator=g).cuda()
    results = []
    for _ in range(3):
        x, p = logits.clone().requires_grad_(), policy.clone().requires_grad_()
        loss = epa_ext.sequence_logps(x, labels).sum() + epa_ext.epa_loss(p, torch.zeros_like(p), num_strong=2)
        results.append([loss.detach(), *torch.autograd.grad(loss, [x, p])])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


DETERMINISM_SCRIPT = textwrap.dedent("""
    import sys, torch, epa_ext
    torch.set_num_threads(int(sys.argv[1]))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3001, generator=g).requires_grad_()
    labels = torch.randint(0, 3001, (64,), generator=g)
    policy = torch.randn(16, 6, generator=g).requires_grad_()
    seq = epa_ext.sequence_logps(logits.view(8, 8, 3001), labels.view(8, 8))
    loss = epa_ext.epa_loss(policy, torch.zeros(16, 6), num_strong=2, weak_weight=0.5) + seq.sum()
    loss.backward()
    hidden = torch.randn(4, 16, 32, generator=g).requires_grad_()
    weight = torch.randn(500, 32, generator=g).requires_grad_()
    lin = epa_ext.linear_sequence_logps(hidden, weight, torch.randint(0, 500, (4, 16), generator=g), chunk_size=7)
    lin.sum().backward()
    torch.save([seq, loss, logits.grad, policy.grad, lin, hidden.grad, weight.grad], sys.argv[2])
""")


def test_bitwise_determinism_across_runs_and_thread_counts(tmp_path):
    """Same inputs, same bits: twice with 2 threads and once with 1. The log-prob and loss kernels
    parallelize over rows only (no atomics, no reordering of a row's sum); the fused-linear path's
    matmuls come from the BLAS, whose results may depend on the thread count, so it is compared
    across runs at a fixed thread count only."""
    results = []
    for run, threads in enumerate((2, 2, 1)):
        path = tmp_path / f"run{run}.pt"
        subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT, str(threads), str(path)], check=True, cwd=tmp_path)
        results.append(torch.load(path))
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)
    for a, b in zip(results[0][:4], results[2][:4]):
        assert torch.equal(a, b)


def test_no_memory_growth_over_thousands_of_calls(tmp_path):
    """Resident memory stays flat over 3000 forward + backward calls (small tensors through every
    op, plus gradients large enough to take the huge-page allocation path)."""
    script = textwrap.dedent("""
        import re, torch, epa_ext
        from pathlib import Path
        def rss_mib():
            return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
        small = torch.randn(8, 16, 257).requires_grad_()
        big = torch.randn(64, 65536).requires_grad_()   # 16 MiB gradient: the huge-page path
        labels = torch.randint(0, 257, (8, 16)); big_labels = torch.randint(0, 65536, (64,))
        hidden = torch.randn(2, 8, 16).requires_grad_(); weight = torch.randn(300, 16).requires_grad_()
        def step():
            loss, _ = epa_ext.fused_epa_loss(small, labels, torch.zeros(8), num_candidates=4, num_strong=1)
            loss = loss + epa_ext.sequence_logps(big, big_labels).sum()
            loss = loss + epa_ext.linear_sequence_logps(hidden, weight, torch.zeros(2, 8, dtype=torch.long)).sum()
            torch.autograd.grad(loss, [small, big, hidden, weight])
        for _ in range(300):
            step()
        before = rss_mib()
        for _ in range(3000):
            step()
        print(rss_mib() - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    growth = float(result.stdout.strip())
    assert growth < 16, f"resident memory grew by {growth:.1f} MiB over 3000 steps"


def test_fused_logits_losses_second_order_match_plain_torch():
    """fused_dpo_loss / fused_epa_loss compose token_logps and the loss ops: their second
    derivatives (gradgradcheck, float64) and a Hessian-vector product match plain torch."""
    logits = torch.randn(6, 3, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (6, 3))
    labels[0, 0] = IGNORE_INDEX
    ref = -torch.rand(6, dtype=torch.float64) * 3
    cases = {
        "dpo": (lambda x: epa_ext.fused_dpo_loss(x, labels, ref, beta=0.5)[0],
                lambda x: eager.fused_dpo_loss(x, labels, ref, beta=0.5)[0]),
        "epa": (lambda x: epa_ext.fused_epa_loss(x, labels, ref, num_candidates=3, num_strong=1, weak_weight=0.5)[0],
                lambda x: eager.fused_epa_loss(x, labels, ref, num_candidates=3, num_strong=1, weak_weight=0.5)[0]),
    }
    v = torch.randn_like(logits)
    for name, (ours, plain) in cases.items():
        assert torch.autograd.gradgradcheck(ours, (logits.clone().requires_grad_(),)), name
        hvps = []
        for fn in (ours, plain):
            x = logits.clone().requires_grad_()
            (grad,) = torch.autograd.grad(fn(x), [x], create_graph=True)
            hvps.append(torch.autograd.grad((grad * v).sum(), [x])[0])
        assert_close_to_truth(hvps[0], hvps[1], dtype=torch.float64, what=f"fused {name} Hessian-vector product")


def test_fused_logits_losses_refuse_torch_func_grad():
    logits, labels, ref = torch.randn(4, 3, 7), torch.randint(0, 7, (4, 3)), torch.zeros(4)
    with pytest.raises(NotImplementedError, match="does not support torch.func's differentiating transforms"):
        torch.func.grad(lambda x: epa_ext.fused_dpo_loss(x, labels, ref)[0])(logits)


def fused_losses(kind: str, labels: torch.Tensor, ref: torch.Tensor, **options):
    """The fused functions of one loss, each as a function of (hidden, weight): from the logits
    h W^T, and from hidden states on the three-matmul and on the recomputing path; and the
    plain-torch definition (epa_ext.eager) they must equal."""
    logits_fn, linear_fn, eager_fn = ((epa_ext.fused_dpo_loss, epa_ext.fused_linear_dpo_loss, eager.fused_dpo_loss)
                                      if kind == "dpo" else
                                      (epa_ext.fused_epa_loss, epa_ext.fused_linear_epa_loss, eager.fused_epa_loss))
    return {
        "from logits": lambda h, w: logits_fn(h @ w.T, labels, ref, **options)[0],
        "three matmuls": lambda h, w: linear_fn(h, w, labels, ref, **options)[0],
        "recomputing": lambda h, w: linear_fn(h, w, labels, ref, differentiable_logps=True, **options)[0],
        "eager": lambda h, w: eager_fn(h @ w.T, labels, ref, **options)[0],
    }


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=str)
@pytest.mark.parametrize("kind", ["dpo", "epa"])
def test_non_finite_reference_log_probs_in_every_fused_path(kind, bad):
    """Issue 15: a non-finite reference log-prob of one candidate (the chosen answer, a strong or a
    weak negative of prompt 1) gives every fused function, from logits and from hidden states on
    both paths, the loss and gradients of the plain-torch formula: +inf where it is +inf (not
    NaN), NaN where it is undefined; per prompt (reduction="none"), the other prompts untouched."""
    candidates, prompts, vocab = (2 if kind == "dpo" else 3), 3, 11
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(candidates * prompts, 4, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (candidates * prompts, 4), generator=gen)
    labels[:, 0] = IGNORE_INDEX
    options = dict(beta=0.5) if kind == "dpo" else dict(beta=0.5, num_candidates=candidates, num_strong=1,
                                                        weak_weight=0.5)
    for candidate in range(candidates):
        ref = -torch.rand(candidates * prompts, generator=gen, dtype=torch.float64) * 5
        ref[candidate * prompts + 1] = bad
        for reduction in ("mean", "none"):
            paths = fused_losses(kind, labels, ref, reduction=reduction, **options)
            if reduction == "none":
                del paths["three matmuls"]  # reduction="none" always takes the recomputing path
            results = {}
            for name, fn in paths.items():
                h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
                loss = fn(h, w)
                results[name] = (loss.detach(), *torch.autograd.grad(loss.sum(), [h, w]))
            truth = results.pop("eager")
            what = f"ref of candidate {candidate} = {bad}, reduction={reduction}"
            for name, values in results.items():
                for value, expected, part in zip(values, truth, ("loss", "d(hidden)", "d(weight)")):
                    assert_close_to_truth(value, expected, dtype=torch.float64, what=f"{name}: {part}, {what}")
            if reduction == "none":
                assert torch.isfinite(truth[0][[0, 2]]).all(), what
