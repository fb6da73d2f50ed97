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
    lin = epa_ext.linear_sequence_logps(hidden, weight, torch.randint(0, 500, (4, 16), generator=g),
                                        max_chunk_tokens=7)
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
    """Resident memory stays flat over 3000 forward + backward calls of small tensors through every
    op, and over 300 of gradients large enough to take the huge-page allocation path (a leak there
    is a 16 MiB buffer a call: 300 calls show it far over the bound; the small calls, whose leak
    would be bytes, run ten times as often for the 20 ms a large one costs)."""
    script = textwrap.dedent("""
        import re, torch, epa_ext
        from pathlib import Path
        def rss_mib():
            return int(re.search(r"VmRSS:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
        small = torch.randn(8, 16, 257).requires_grad_()
        big = torch.randn(64, 65536).requires_grad_()   # 16 MiB gradient: the huge-page path
        labels = torch.randint(0, 257, (8, 16)); big_labels = torch.randint(0, 65536, (64,))
        hidden = torch.randn(2, 8, 16).requires_grad_(); weight = torch.randn(300, 16).requires_grad_()
        def step(call):
            loss, _ = epa_ext.fused_epa_loss(small, labels, torch.zeros(8), num_candidates=4, num_strong=1)
            loss = loss + epa_ext.linear_sequence_logps(hidden, weight, torch.zeros(2, 8, dtype=torch.long)).sum()
            inputs = [small, hidden, weight]
            if call % 10 == 0:
                loss = loss + epa_ext.sequence_logps(big, big_labels).sum()
                inputs.append(big)
            torch.autograd.grad(loss, inputs)
        for call in range(300):
            step(call)
        before = rss_mib()
        for call in range(3000):
            step(call)
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


# --- round 3: wide logits, scalar options under torch.compile, values at the edge of float32 ------

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def subnormal_count(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < SMALLEST_NORMAL)).sum())


@pytest.mark.parametrize("softcap", [None, 300.0])
@pytest.mark.parametrize("vocab", [1000, 1003])  # the vectorized loop, and with a scalar tail
def test_wide_logits_give_no_subnormal_gradient_and_the_same_result(softcap, vocab):
    """Logits of std 40 span ~300 nats: most softmax terms lie below FLT_MIN. The kernels take them
    as 0 (subnormal numbers slow every later operation on them, the gradient matmuls included), and
    the result is float64's to fp32 tolerance, as with logits of any other width."""
    logits = torch.randn(64, vocab, dtype=torch.float64) * 40
    labels = torch.randint(0, vocab, (64,))
    for scale in (1.0, 1e-3):  # an incoming gradient below 1 pushes more terms toward FLT_MIN
        out, grad = grad_of(lambda x: epa_ext.token_logps(x, labels, softcap=softcap) * scale, logits.float())
        truth, truth_grad = grad_of(lambda x: eager.token_logps(x, labels, softcap=softcap) * scale, logits)
        _, plain_grad = grad_of(lambda x: eager.token_logps(x, labels, softcap=softcap) * scale, logits.float())
        assert subnormal_count(plain_grad) > 0  # the input does produce subnormal softmax terms
        assert subnormal_count(grad) == 0
        # exp(z - lse) of logits of size M carries a relative error of about eps32 * M in any fp32 code
        widest = float(logits.abs().max())
        assert_close_to_truth(out, truth, dtype=torch.float32, what="logps", inputs_scale=widest)
        assert_close_to_truth(grad, truth_grad, dtype=torch.float32, what="d(logits)",
                              extra_rtol=torch.finfo(torch.float32).eps * widest)


def test_wide_logits_through_the_fused_linear_loss_match_float64():
    """The three-matmul path feeds each chunk's logit gradient, its terms below FLT_MIN taken as 0,
    to the gradient matmuls: the loss and both gradients still match eager float64."""
    torch.manual_seed(1)
    hidden = torch.randn(4, 24, 32, dtype=torch.float64)
    weight = torch.randn(700, 32, dtype=torch.float64) * 40 / 32**0.5  # logits of std ~40
    labels = torch.randint(0, 700, (4, 24))
    ref = torch.randn(4, dtype=torch.float64) * 50 - 2000

    def run(h, w, loss_fn):
        h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = loss_fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    ours = run(hidden.float(), weight.float(), lambda h, w: epa_ext.fused_linear_dpo_loss(h, w, labels, ref.float())[0])
    truth = run(hidden, weight, lambda h, w: eager.fused_dpo_loss(h @ w.T, labels, ref)[0])
    widest = float((hidden @ weight.T).abs().max())  # fp32 softmax terms are off by about eps32 * widest
    for name, a, t in zip(("loss", "d(hidden)", "d(weight)"), ours, truth):
        assert_close_to_truth(a, t, dtype=torch.float32, what=name, inputs_scale=widest,
                              extra_rtol=torch.finfo(torch.float32).eps * widest)


def test_scalar_options_compile_in_fullgraph_with_changing_values():
    """A float option (softcap, beta, weak_weight) that changes between calls becomes symbolic
    under torch.compile; every value compiles in one graph and gives eager's result, and a bad one
    is still refused (by the op's check, when the value is known)."""
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    policy, ref = torch.randn(3, 4), torch.randn(3, 4)
    calls = {
        "token_logps": lambda x: epa_ext.token_logps(logits, labels, softcap=x),
        "dpo_loss": lambda x: epa_ext.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=x),
        "epa_loss": lambda x: epa_ext.epa_loss(policy, ref, beta=x, num_strong=1, weak_weight=x),
    }
    for name, call in calls.items():
        torch._dynamo.reset()
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
        for value in (30.0, 50.0, 70.0, 0.25):
            torch.testing.assert_close(compiled(value), call(value), msg=f"{name}({value})")
        with pytest.raises(Exception, match=r"must be .*; got inf"):
            compiled(float("inf"))


def test_a_beta_that_vanishes_in_float32_is_refused():
    """1e-46 is 0 in float32, where the losses of float32 inputs are computed (NaN gradients to
    log_weights); float64 inputs compute in float64, where it is a normal number."""
    pattern = r"beta must be a number in \[1.17\d*e-38, 3.40\d*e\+38\] \(float32's normal range"
    policy, ref = torch.randn(3, 4), torch.randn(3, 4)
    hidden, weight = torch.randn(6, 5, 8), torch.randn(13, 8)
    labels, seq_ref = torch.randint(0, 13, (6, 5)), torch.randn(6)
    for beta in (1e-46, 1e39):
        for device_ in ("cpu", "meta"):
            p, r = policy.to(device_), ref.to(device_)
            with pytest.raises(ValueError, match="epa_loss: " + pattern):
                torch.ops.epa_ext.epa_loss(p, r, None, beta, 1, 1.0)
            with pytest.raises(ValueError, match="dpo_loss: " + pattern):
                torch.ops.epa_ext.dpo_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1], beta, "sigmoid", 0.0)
        with pytest.raises(ValueError, match=pattern):
            epa_ext.epa_loss(policy, ref, beta=beta, num_strong=1, log_weights=torch.zeros(3, 4))
        with pytest.raises(ValueError, match="linear_epa_loss: " + pattern):
            epa_ext.fused_linear_epa_loss(hidden, weight, labels, seq_ref, num_candidates=3, beta=beta)
        with pytest.raises(ValueError, match="linear_dpo_loss: " + pattern):
            epa_ext.fused_linear_dpo_loss(hidden, weight, labels, seq_ref, beta=beta)
    loss = epa_ext.epa_loss(policy.double(), ref.double(), beta=1e-46, num_strong=1)
    assert torch.isfinite(loss)


def test_bad_log_weights_are_reported_at_the_callers_position_and_value():
    """The chunked three-matmul path runs the loss kernel on spans of prompts: a bad log-weight is
    still named by its row in the caller's [B, C] tensor; a float64 value that float32 cannot
    hold is named as given (1e300), not as the inf it would become."""
    torch.manual_seed(2)
    prompts, candidates, length = 4, 3, 6
    hidden = torch.randn(candidates * prompts, length, 16)
    weight = torch.randn(50, 16)
    labels = torch.randint(0, 50, (candidates * prompts, length))
    ref = torch.randn(candidates * prompts)
    log_weights = torch.zeros(prompts, candidates)
    log_weights[2, 2] = float("nan")
    for budget in (None, candidates * length):  # one chunk; one prompt group per chunk
        with pytest.raises(ValueError, match=r"got nan at \[2, 2\]"):
            epa_ext.fused_linear_epa_loss(hidden, weight, labels, ref, num_candidates=candidates,
                                          log_weights=log_weights, max_chunk_tokens=budget)
    wide = torch.zeros(prompts, candidates, dtype=torch.float64)
    wide[2, 2] = 1e300
    pattern = r"got 1e\+300 at \[2, 2\] \(out of float32's range"
    with pytest.raises(ValueError, match=pattern):
        epa_ext.epa_loss(torch.randn(prompts, candidates), torch.randn(prompts, candidates), num_strong=1,
                         log_weights=wide)
    with pytest.raises(ValueError, match=pattern):
        epa_ext.fused_linear_epa_loss(hidden, weight, labels, ref, num_candidates=candidates, log_weights=wide,
                                      max_chunk_tokens=candidates * length)
