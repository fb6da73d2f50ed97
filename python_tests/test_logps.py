"""token_logps / sequence_logps / completion_labels against the plain-torch definitions (epa_ext/eager.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import epa_ext
from epa_ext import eager
from numerics import assert_close_to_truth

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 2-D and 3-D; odd vocabularies; row counts that are no multiple of any block or vector size.
SHAPES = [(37, 123), (3, 17, 123), (2, 5, 50257), (1, 1, 1), (1, 3, 2), (4, 33, 1000)]


def make_inputs(shape, dtype, device, *, ignore_fraction=0.2, scale=3.0, ignore_index=-100):
    vocab = shape[-1]
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
    labels = torch.randint(0, vocab, shape[:-1])
    labels[torch.rand(shape[:-1]) < ignore_fraction] = ignore_index
    return logits, labels.to(device)


def check_against_reference(logits, labels, *, ignore_index=-100, what="", grad_extra_rtol=0.0):
    """Forward and d(logits) of token_logps against float64 truth and plain torch in the dtype."""
    dtype = logits.dtype
    upstream = torch.randn(labels.shape, dtype=torch.float64)

    ours_in = logits.detach().clone().requires_grad_()
    ours = epa_ext.token_logps(ours_in, labels, ignore_index=ignore_index)
    ours.backward(upstream.to(ours.dtype).to(ours.device))

    results = {}
    for name, x in (("truth", logits.detach().double()), ("plain", logits.detach())):
        x = x.clone().requires_grad_()
        out = eager.token_logps(x, labels, ignore_index)
        out.backward(upstream.to(out.dtype).to(out.device))
        results[name] = (out, x.grad)

    assert ours.dtype == torch.float32 and ours.device == logits.device
    assert ours_in.grad.dtype == dtype and ours_in.grad.shape == logits.shape
    assert_close_to_truth(ours, results["truth"][0], dtype=dtype, plain=results["plain"][0], what=f"{what} logps")
    assert_close_to_truth(ours_in.grad, results["truth"][1], dtype=dtype, plain=results["plain"][1],
                          what=f"{what} d(logits)", extra_rtol=grad_extra_rtol)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(shape, dtype, device):
    logits, labels = make_inputs(shape, dtype, device)
    check_against_reference(logits, labels, what=f"{shape}")


def test_float64_matches_reference(device):
    logits, labels = make_inputs((3, 9, 257), torch.float64, device)
    x = logits.clone().requires_grad_()
    ours = epa_ext.token_logps(x, labels)
    assert ours.dtype == torch.float64
    ours.sum().backward()
    y = logits.clone().requires_grad_()
    eager.token_logps(y, labels).sum().backward()
    assert_close_to_truth(ours, eager.token_logps(logits, labels), dtype=torch.float64)
    assert_close_to_truth(x.grad, y.grad, dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_and_sequences_all_ignored(dtype, device):
    logits, labels = make_inputs((4, 6, 77), dtype, device)
    labels[1] = -100  # a sequence with no completion token
    labels[:, 0] = -100
    check_against_reference(logits, labels, what="partly ignored")

    labels[:] = -100
    x = logits.clone().requires_grad_()
    out = epa_ext.sequence_logps(x, labels)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(4, device=device))
    assert torch.equal(x.grad, torch.zeros_like(x))
    averaged = epa_ext.sequence_logps(logits, labels, average=True)
    assert torch.equal(averaged, torch.zeros(4, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views_are_read_in_place(dtype, device):
    logits, labels = make_inputs((3, 11, 301), dtype, device)
    # The usual causal-LM slice: [B, T-1, V] with the batch stride of [B, T, V].
    sliced = logits[:, :-1]
    check_against_reference(sliced, labels[:, :-1], what="logits[:, :-1]")
    # Time-major storage read as [B, T, V].
    time_major = logits.transpose(0, 1).contiguous().transpose(0, 1)
    check_against_reference(time_major, labels, what="transposed")
    # Rows of a 2-D view with a row stride larger than V.
    rows = logits.reshape(33, 301)[::2, :200]
    check_against_reference(rows, torch.randint(0, 200, (17,), device=device), what="row stride")
    # The op itself accepts such views (the public function makes no copy of them).
    direct, _ = torch.ops.epa_ext.token_logps(sliced, labels[:, :-1].contiguous(), -100)
    torch.testing.assert_close(direct, epa_ext.token_logps(sliced.contiguous(), labels[:, :-1]))


def test_non_unit_vocab_stride_is_copied(device):
    logits, labels = make_inputs((2, 4, 64), torch.float32, device)
    every_other = logits[..., ::2]
    labels = labels.clamp(max=31).masked_fill(labels < 0, -100)
    check_against_reference(every_other, labels, what="logits[..., ::2]")


@pytest.mark.parametrize("ignore_index", [-1, 0, 5])
def test_custom_ignore_index(ignore_index, device):
    logits, labels = make_inputs((2, 9, 40), torch.float32, device, ignore_index=ignore_index)
    check_against_reference(logits, labels, ignore_index=ignore_index, what=f"ignore_index={ignore_index}")


def test_extreme_logits_fp32(device):
    logits, labels = make_inputs((4, 8, 1000), torch.float32, device, scale=1.0)
    spikes = torch.rand(logits.shape, device=device) < 0.01
    logits = torch.where(spikes, torch.sign(torch.randn_like(logits)) * 1e4, logits)
    logits[0, 0, labels[0, 0].clamp(min=0)] = 1e4  # a target that takes all the mass
    logits[0, 1, :] = -1e4
    # The backward recomputes the other columns' softmax as exp(z - lse) from the fp32 lse the
    # forward saved; rounding lse to fp32 costs a relative error of up to |lse| * 2^-24 in each of
    # those probabilities (6e-4 here, 1e-5 at the |logits| ~ 100 of real models). The target
    # column comes from the forward's log-prob and carries no such error.
    lse_rounding = 2 * logits.abs().max().item() * 2.0**-24
    check_against_reference(logits, labels, what="+-1e4", grad_extra_rtol=lse_rounding)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_large_low_precision_values(dtype, device):
    scale = 3e4 if dtype == torch.bfloat16 else 3e3
    logits, labels = make_inputs((3, 7, 500), dtype, device, scale=scale)
    check_against_reference(logits, labels, what="large values")


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_reference(average, device):
    logits, labels = make_inputs((5, 13, 211), torch.float32, device)
    labels[2] = -100
    x = logits.clone().requires_grad_()
    ours = epa_ext.sequence_logps(x, labels, average=average)
    ours.backward(torch.arange(5.0, device=device))
    y = logits.double().requires_grad_()
    truth = eager.sequence_logps(y, labels, average=average)
    truth.backward(torch.arange(5.0, dtype=torch.float64, device=device))
    assert ours.shape == (5,)
    assert_close_to_truth(ours, truth, dtype=torch.float32, what="sequence_logps")
    assert_close_to_truth(x.grad, y.grad, dtype=torch.float32, what="d(logits)")
    assert ours[2].item() == 0.0


def test_sequence_logps_of_2d_logits_is_one_sequence():
    logits, labels = make_inputs((9, 31), torch.float32, "cpu")
    total = epa_ext.sequence_logps(logits, labels)
    assert total.shape == ()
    torch.testing.assert_close(total, epa_ext.token_logps(logits, labels).sum())


@pytest.mark.parametrize("average", [False, True])
def test_gradcheck_float64(average, device):
    logits, labels = make_inputs((2, 4, 7), torch.float64, device)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: epa_ext.sequence_logps(t, labels, average=average), (x,), eps=1e-6, atol=1e-8
    )
    assert torch.autograd.gradcheck(lambda t: epa_ext.token_logps(t, labels), (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, device):
    logits, labels = make_inputs((2, 5, 33), dtype, device)
    torch.library.opcheck(torch.ops.epa_ext.token_logps.default, (logits.requires_grad_(), labels, -100))
    logps, lse = torch.ops.epa_ext.token_logps(logits.detach(), labels, -100)
    grad = torch.randn(labels.shape, device=device)
    torch.library.opcheck(torch.ops.epa_ext.token_logps_backward.default,
                          (grad, logits.detach(), labels, lse, logps, -100))


def test_torch_compile_fullgraph(device):
    logits, labels = make_inputs((3, 6, 97), torch.float32, device)

    def loss_fn(x, y):
        return epa_ext.sequence_logps(x, y, average=True).sum() + epa_ext.token_logps(x, y).mean()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled):
        x = logits.clone().requires_grad_()
        out = fn(x, labels)
        out.backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def test_torch_compile_inductor():
    logits, labels = make_inputs((2, 5, 64), torch.float32, "cpu")
    compiled = torch.compile(epa_ext.sequence_logps, fullgraph=True)
    torch.testing.assert_close(compiled(logits, labels), epa_ext.sequence_logps(logits, labels))


def test_empty_batch(device):
    logits = torch.randn(0, 5, 11, device=device, requires_grad=True)
    labels = torch.zeros(0, 5, dtype=torch.long, device=device)
    out = epa_ext.token_logps(logits, labels)
    assert out.shape == (0, 5)
    seq = epa_ext.sequence_logps(logits, labels)
    assert seq.shape == (0,)
    seq.sum().backward()
    assert logits.grad.shape == (0, 5, 11)


BAD_INPUTS = [
    # (logits shape, labels, error pattern)
    ((11,), torch.zeros(1, dtype=torch.long), r"logits must have shape \[N, V\] or \[B, T, V\]"),
    ((2, 3, 4, 5), torch.zeros(2, 3, 4, dtype=torch.long), r"logits must have shape"),
    ((2, 3, 5), torch.zeros(2, 4, dtype=torch.long), r"labels must have the shape of logits"),
    ((2, 3, 5), torch.zeros(2, 3), r"labels must be int64"),
    ((2, 3, 5), torch.zeros(2, 3, dtype=torch.bool), r"labels must be int64"),
    ((2, 3, 0), torch.zeros(2, 3, dtype=torch.long), r"empty vocabulary dimension \(V = 0\)"),
    ((2, 3, 5), torch.full((2, 3), 5), r"labels must lie in \[0, V\) or equal ignore_index"),
    ((2, 3, 5), torch.full((2, 3), -7), r"labels must lie in \[0, V\) or equal ignore_index"),
]


@pytest.mark.parametrize("shape,labels,pattern", BAD_INPUTS)
def test_bad_input_is_a_clear_error(shape, labels, pattern):
    logits = torch.randn(shape)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
        epa_ext.token_logps(logits, labels)


def test_bad_dtype_and_types():
    with pytest.raises(RuntimeError, match="logits must be float32, bfloat16, float16 or float64"):
        epa_ext.token_logps(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        epa_ext.token_logps(torch.zeros(2, 3), [0, 1])
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        epa_ext.token_logps(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), ignore_index=1.5)


def test_devices_must_match():
    # A meta tensor stands in for another device on machines without a GPU.
    with pytest.raises(RuntimeError, match="labels and logits must be on the same device"):
        epa_ext.token_logps(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_devices_must_match_cuda():
    with pytest.raises(RuntimeError, match="labels and logits must be on the same device"):
        epa_ext.token_logps(torch.randn(2, 3, 5, device="cuda"), torch.zeros(2, 3, dtype=torch.long))


def test_int32_labels_are_accepted():
    logits, labels = make_inputs((2, 4, 10), torch.float32, "cpu")
    torch.testing.assert_close(epa_ext.token_logps(logits, labels.int()), epa_ext.token_logps(logits, labels))


def test_completion_labels(device):
    input_ids = torch.randint(0, 100, (3, 8), device=device)
    mask = torch.zeros(3, 8, dtype=torch.bool, device=device)
    mask[0, 4:] = True
    mask[1, 2:6] = True  # then padding
    labels = epa_ext.completion_labels(input_ids, mask)
    expected = torch.full((3, 8), -100, dtype=torch.long)
    for b in range(3):
        for t in range(7):
            if mask[b, t + 1]:
                expected[b, t] = input_ids[b, t + 1]
    assert labels.dtype == torch.long
    assert torch.equal(labels.cpu(), expected)
    assert torch.equal(epa_ext.completion_labels(input_ids, mask.int(), ignore_index=-1).cpu(),
                       expected.masked_fill(expected == -100, -1))


def test_completion_labels_bad_input():
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="completion_mask must have the shape of input_ids"):
        epa_ext.completion_labels(ids, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="input_ids must hold integer token ids"):
        epa_ext.completion_labels(ids.float(), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="completion_mask must be bool"):
        epa_ext.completion_labels(ids, torch.ones(2, 5))


def test_sequence_logps_composes_with_completion_labels():
    input_ids = torch.randint(0, 50, (2, 10))
    mask = torch.arange(10).expand(2, 10) >= 6
    logits = torch.randn(2, 10, 50)
    labels = epa_ext.completion_labels(input_ids, mask)
    expected = torch.log_softmax(logits.double(), -1)[:, 5:9].gather(-1, input_ids[:, 6:10, None]).sum((1, 2))
    torch.testing.assert_close(epa_ext.sequence_logps(logits, labels).double(), expected, rtol=1e-5, atol=1e-5)


def test_default_cpu_capability_path_matches_reference():
    """The non-AVX2 build of the CPU loops, forced through the environment in a fresh process."""
    script = textwrap.dedent(
        """
        import torch, epa_ext
        from epa_ext import eager
        assert epa_ext.cpu_capability() == "default", epa_ext.cpu_capability()
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            logits = (torch.randn(3, 5, 2053) * 3).to(dtype).requires_grad_()
            labels = torch.randint(0, 2053, (3, 5)); labels[0, :2] = -100
            out = epa_ext.token_logps(logits, labels)
            out.sum().backward()
            x = logits.detach().double().requires_grad_()
            truth = eager.token_logps(x, labels); truth.sum().backward()
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(out.double(), truth, rtol=tol, atol=tol)
            torch.testing.assert_close(logits.grad.double(), x.grad, rtol=tol, atol=tol)
        print("ok")
        """
    )
    env = dict(os.environ, EPA_EXT_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd="/")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_unknown_cpu_capability_is_rejected():
    env = dict(os.environ, EPA_EXT_CPU_CAPABILITY="avx9000")
    script = "import torch, epa_ext; epa_ext.token_logps(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd="/")
    assert result.returncode != 0
    assert "EPA_EXT_CPU_CAPABILITY must be 'default' or 'avx2'" in result.stderr
