"""token_logps / sequence_logps / completion_labels against the plain-torch definitions (epa_ext/eager.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import CUDA

import epa_ext
from epa_ext import IGNORE_INDEX, eager
from numerics import GRADCHECK, assert_close_to_truth

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 2-D and 3-D; odd vocabularies; row counts that are no multiple of any block or vector size.
SHAPES = [(37, 123), (3, 17, 123), (2, 5, 50257), (1, 1, 1), (1, 3, 2), (4, 33, 1000)]


def make_inputs(shape, dtype, device, *, ignore_fraction=0.2, scale=3.0, ignore_index=IGNORE_INDEX):
    vocab = shape[-1]
    logits = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)
    labels = torch.randint(0, vocab, shape[:-1])
    labels[torch.rand(shape[:-1]) < ignore_fraction] = ignore_index
    return logits, labels.to(device)


def check_against_reference(logits, labels, *, ignore_index=IGNORE_INDEX, what="", grad_extra_rtol=0.0,
                            softcap=None, inplace_backward=False):
    """Forward and d(logits) of token_logps against float64 truth and plain torch in the dtype.
    With a softcap c, the capped logits (magnitude <= min(c, max |logit|)) carry fp32 rounding of
    eps32 times that into every log-prob, the inputs_scale of numerics.assert_close_to_truth."""
    dtype = logits.dtype
    upstream = torch.randn(labels.shape, dtype=torch.float64)

    ours_in = logits.detach().clone().requires_grad_()
    # in-place: the op overwrites a non-leaf copy of the logits with their gradient
    ours = epa_ext.token_logps(ours_in * 1 if inplace_backward else ours_in, labels, ignore_index=ignore_index,
                               softcap=softcap, inplace_backward=inplace_backward)
    ours.backward(upstream.to(ours.dtype).to(ours.device))

    results = {}
    for name, x in (("truth", logits.detach().double()), ("plain", logits.detach())):
        x = x.clone().requires_grad_()
        out = eager.token_logps(x, labels, ignore_index, softcap=softcap)
        out.backward(upstream.to(out.dtype).to(out.device))
        results[name] = (out, x.grad)

    assert ours.dtype == torch.float32 and ours.device == logits.device
    assert ours_in.grad.dtype == dtype and ours_in.grad.shape == logits.shape
    finite = logits.detach()[logits.detach().isfinite()]
    scale = min(softcap, finite.abs().max().item() if finite.numel() else 0.0) if softcap else 0.0
    assert_close_to_truth(ours, results["truth"][0], dtype=dtype, plain=results["plain"][0], what=f"{what} logps",
                          inputs_scale=scale)
    assert_close_to_truth(ours_in.grad, results["truth"][1], dtype=dtype, plain=results["plain"][1],
                          what=f"{what} d(logits)", extra_rtol=grad_extra_rtol, inputs_scale=scale)


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
    labels[1] = IGNORE_INDEX  # a sequence with no completion token
    labels[:, 0] = IGNORE_INDEX
    check_against_reference(logits, labels, what="partly ignored")

    labels[:] = IGNORE_INDEX
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
    direct, _ = torch.ops.epa_ext.token_logps(sliced, labels[:, :-1].contiguous(), IGNORE_INDEX)
    torch.testing.assert_close(direct, epa_ext.token_logps(sliced.contiguous(), labels[:, :-1]))


def test_non_unit_vocab_stride_is_copied(device):
    logits, labels = make_inputs((2, 4, 64), torch.float32, device)
    every_other = logits[..., ::2]
    labels = labels.clamp(max=31).masked_fill(labels < 0, IGNORE_INDEX)
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
    labels[2] = IGNORE_INDEX
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


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=lambda c: c.__name__)
@pytest.mark.parametrize("average", [False, True])
def test_gradcheck_float64(average, check, device):
    """First and second derivatives (the second through create_graph=True) against finite differences."""
    logits, labels = make_inputs((2, 4, 7), torch.float64, device)
    x = logits.clone().requires_grad_()
    assert check(lambda t: epa_ext.sequence_logps(t, labels, average=average), (x,), **GRADCHECK)
    assert check(lambda t: epa_ext.token_logps(t, labels), (x,), **GRADCHECK)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, device):
    logits, labels = make_inputs((2, 5, 33), dtype, device)
    torch.library.opcheck(torch.ops.epa_ext.token_logps.default, (logits.requires_grad_(), labels, IGNORE_INDEX))
    logps, lse = torch.ops.epa_ext.token_logps(logits.detach(), labels, IGNORE_INDEX)
    grad = torch.randn(labels.shape, device=device)
    torch.library.opcheck(torch.ops.epa_ext.token_logps_backward.default,
                          (grad, logits.detach(), labels, lse, logps, IGNORE_INDEX))


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
    """The inductor backend, forward and backward, against the plain-torch definition."""
    logits, labels = make_inputs((2, 5, 64), torch.float32, "cpu")
    upstream = torch.rand(2) + 0.5

    def value_and_grad(fn, x):
        x = x.detach().clone().requires_grad_()
        out = fn(x, labels)
        (grad,) = torch.autograd.grad(out, [x], upstream.to(out.dtype))
        return out.detach(), grad

    compiled = torch.compile(lambda x, y: epa_ext.sequence_logps(x, y), fullgraph=True)
    # Inductor's on-disk caches key on the traced graph, not on the Python source of the ops'
    # autograd formulas: a cached backward would hide a change to them.
    with torch._inductor.config.patch(force_disable_caches=True):
        value, grad = value_and_grad(compiled, logits)
    truth, truth_grad = value_and_grad(lambda x, y: eager.sequence_logps(x, y), logits.double())
    assert_close_to_truth(value, truth, dtype=torch.float32, what="compiled sequence_logps")
    assert_close_to_truth(grad, truth_grad, dtype=torch.float32, what="compiled d(logits)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(0, 5, 11), (3, 0, 11), (0, 11)], ids=str)
def test_empty_batch(shape, dtype, device):
    """No rows at all: empty log-probs, sequence log-probs of 0 (averaged too: not 0/0), and an
    all-zero gradient, in the output dtype of the op; as plain torch gives them."""
    logits = torch.randn(shape, dtype=dtype, device=device)
    labels = torch.zeros(shape[:-1], dtype=torch.long, device=device)
    for average in (False, True):
        x = logits.clone().requires_grad_()
        seq = epa_ext.sequence_logps(x, labels, average=average)
        (grad,) = torch.autograd.grad(seq.sum(), [x])
        truth = eager.sequence_logps(logits, labels, average=average)
        assert seq.dtype == dtype and seq.device == logits.device
        assert torch.equal(seq, truth) and torch.equal(seq, torch.zeros_like(truth)), (average, seq)
        assert torch.equal(grad, torch.zeros_like(logits))
    tokens = epa_ext.token_logps(logits, labels)
    assert tokens.dtype == dtype and torch.equal(tokens, eager.token_logps(logits, labels))


BAD_INPUTS = [
    # (logits shape, labels, error type, error pattern)
    ((11,), torch.zeros(1, dtype=torch.long), ValueError, r"logits must have shape \[N, V\] or \[B, T, V\]"),
    ((2, 3, 4, 5), torch.zeros(2, 3, 4, dtype=torch.long), ValueError, r"logits must have shape"),
    ((2, 3, 5), torch.zeros(2, 4, dtype=torch.long), ValueError, r"labels must have the shape of logits"),
    ((2, 3, 5), torch.zeros(2, 3), TypeError, r"labels must be int64"),
    ((2, 3, 5), torch.zeros(2, 3, dtype=torch.bool), TypeError, r"labels must be int64"),
    ((2, 3, 0), torch.zeros(2, 3, dtype=torch.long), ValueError, r"empty vocabulary dimension \(V = 0\)"),
]


@pytest.mark.parametrize("device_", ["cpu", "meta"])
@pytest.mark.parametrize("shape,labels,error,pattern", BAD_INPUTS)
def test_bad_input_is_a_clear_error(shape, labels, error, pattern, device_):
    """The CPU kernel's checks and the fake kernel's (meta: what torch.compile sees) alike."""
    logits = torch.randn(shape, device=device_)
    with pytest.raises(error, match=pattern):
        epa_ext.token_logps(logits, labels.to(device_))
    with pytest.raises(error, match=pattern):
        torch.ops.epa_ext.token_logps(logits, labels.to(device_), IGNORE_INDEX)


@pytest.mark.parametrize("label", [5, -7])
def test_label_out_of_range(label):
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[1, 1] = label
    pattern = r"labels must lie in \[0, V\) or equal ignore_index \(-100\); found -?\d+ at flat position 4 with V = 5"
    with pytest.raises(ValueError, match=pattern):
        epa_ext.token_logps(torch.randn(2, 3, 5), labels)


def test_bad_dtype_and_types():
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError, match="logits must be float32, bfloat16, float16 or float64; got Long"):
        epa_ext.token_logps(torch.zeros(2, 3, dtype=torch.long), labels)
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor; got list; convert it with torch.tensor"):
        epa_ext.token_logps(torch.zeros(2, 3), [0, 1])
    with pytest.raises(TypeError, match="logits must be a torch.Tensor; got list"):
        epa_ext.sequence_logps([[0.0, 1.0]], labels[:1])
    with pytest.raises(TypeError, match="ignore_index must be an int; got float 1.5"):
        epa_ext.token_logps(torch.zeros(2, 3), labels, ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_index must be an int; got bool"):
        epa_ext.token_logps(torch.zeros(2, 3), labels, ignore_index=True)
    with pytest.raises(TypeError, match="average must be True or False; got str"):
        epa_ext.sequence_logps(torch.zeros(2, 3), labels, average="yes")
    with pytest.raises(TypeError, match="inplace_backward must be True or False; got int"):
        epa_ext.token_logps(torch.zeros(2, 3), labels, inplace_backward=1)


def test_raw_backward_ops_check_their_inputs():
    logits, labels = make_inputs((2, 3, 7), torch.float32, "cpu")
    logps, lse = torch.ops.epa_ext.token_logps(logits, labels, IGNORE_INDEX)
    good = torch.ones(2, 3)
    bad = [  # (grad_logps, lse, logps, error, pattern)
        (torch.ones(2, 3, dtype=torch.long), lse, logps, TypeError, "grad_logps must be a floating-point tensor; got"),
        (torch.ones(3, 2), lse, logps, ValueError, r"grad_logps must have the shape and device of labels \(\[2, 3\]"),
        (good, lse.double(), logps, TypeError, "lse must be the forward's (Float|torch.float32) output; got"),
        (good, lse, logps[:1], ValueError, r"logps must be the forward's output of shape \[2, 3\]"),
    ]
    for device_ in ("cpu", "meta"):  # the kernels' checks and the fake kernels' alike
        for grad, lse_, logps_, error, pattern in bad:
            args = [t.to(device_) for t in (grad, logits, labels, lse_, logps_)]
            with pytest.raises(error, match=pattern):
                torch.ops.epa_ext.token_logps_backward(*args, IGNORE_INDEX)
            with pytest.raises(error, match=pattern):
                torch.ops.epa_ext.token_logps_backward_(*args, IGNORE_INDEX)


def test_devices_must_match():
    # A meta tensor stands in for another device on machines without a GPU. Either way round (the
    # order of the dispatch keys picks the kernel), the error names the device mismatch.
    cpu_logits, cpu_labels = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    for logits, labels in ((cpu_logits, cpu_labels.to("meta")), (cpu_logits.to("meta"), cpu_labels)):
        with pytest.raises(ValueError, match="labels must be on the device of logits"):
            epa_ext.token_logps(logits, labels)
        with pytest.raises(ValueError, match="labels and logits must be on the same device"):
            torch.ops.epa_ext.token_logps(logits, labels, IGNORE_INDEX)


@CUDA
def test_devices_must_match_cuda():
    logits, labels = torch.randn(2, 3, 5, device="cuda"), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="labels must be on the device of logits"):
        epa_ext.token_logps(logits, labels)
    with pytest.raises(ValueError, match="labels and logits must be on the same device"):
        torch.ops.epa_ext.token_logps(logits, labels, IGNORE_INDEX)


def test_int32_labels_are_accepted():
    logits, labels = make_inputs((2, 4, 10), torch.float32, "cpu")
    torch.testing.assert_close(epa_ext.token_logps(logits, labels.int()), epa_ext.token_logps(logits, labels))


def test_completion_labels(device):
    input_ids = torch.randint(0, 100, (3, 8), device=device)
    mask = torch.zeros(3, 8, dtype=torch.bool, device=device)
    mask[0, 4:] = True
    mask[1, 2:6] = True  # then padding
    labels = epa_ext.completion_labels(input_ids, mask)
    expected = torch.full((3, 8), IGNORE_INDEX, dtype=torch.long)
    for b in range(3):
        for t in range(7):
            if mask[b, t + 1]:
                expected[b, t] = input_ids[b, t + 1]
    assert labels.dtype == torch.long
    assert torch.equal(labels.cpu(), expected)
    assert torch.equal(epa_ext.completion_labels(input_ids, mask.int(), ignore_index=-1).cpu(),
                       expected.masked_fill(expected == IGNORE_INDEX, -1))


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
    assert_close_to_truth(epa_ext.sequence_logps(logits, labels), expected, dtype=torch.float32)


def test_default_cpu_capability_path_matches_reference():
    """The non-AVX2 build of the CPU loops, forced through the environment in a fresh process."""
    script = textwrap.dedent(
        f"""
        import sys, torch, epa_ext
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_logps import check_against_reference, make_inputs
        assert epa_ext.cpu_capability() == "default", epa_ext.cpu_capability()
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            logits, labels = make_inputs((3, 5, 2053), dtype, "cpu")
            check_against_reference(logits, labels, what="default capability")
            check_against_reference(logits * 3, labels, softcap=5.0, what="default capability, softcap")
        print("ok")
        """
    )
    env = dict(os.environ, EPA_EXT_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd="/")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def run_python(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=dict(os.environ, **env),
                          capture_output=True, text=True, cwd="/")


def test_unknown_cpu_capability_is_a_python_error():
    """Issue 16: a bad EPA_EXT_CPU_CAPABILITY used to abort the process (a C++ exception escaping
    a PyCFunction). Now a ValueError naming the variable and its values, both where the module
    function reads it and where a kernel first does, and again on a second call."""
    script = """
        import torch, epa_ext
        for call in (epa_ext.cpu_capability,
                     lambda: epa_ext.token_logps(torch.randn(2, 3), torch.zeros(2, dtype=torch.long)),
                     epa_ext.cpu_capability):
            try:
                call()
            except ValueError as error:
                print("ValueError:", error)
    """
    result = run_python(script, EPA_EXT_CPU_CAPABILITY="bogus")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout
    for line in lines:
        assert line.startswith("ValueError: the environment variable EPA_EXT_CPU_CAPABILITY must be 'default' or "
                               "'avx2' (or unset, to choose from the processor); got 'bogus'"), line
    uncaught = run_python("import epa_ext; epa_ext.cpu_capability()", EPA_EXT_CPU_CAPABILITY="bogus")
    assert uncaught.returncode == 1 and "ValueError" in uncaught.stderr, (uncaught.returncode, uncaught.stderr)


def test_a_second_copy_of_the_extension_is_a_python_error(tmp_path):
    """Loading the compiled library twice (two installs of epa_ext in one process) used to abort in
    a static initializer (the second declaration of the epa_ext namespace). The declaration now
    runs in PyInit, and the failure is a RuntimeError that says what happened."""
    copy = tmp_path / Path(epa_ext._C.__file__).name
    shutil.copy(epa_ext._C.__file__, copy)
    script = f"""
        import importlib.util, epa_ext
        spec = importlib.util.spec_from_file_location("_C", {str(copy)!r})
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except RuntimeError as error:
            print("RuntimeError:", error)
    """
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("RuntimeError: epa_ext's compiled extension could not declare its ops (is another "
                                    "copy of epa_ext already loaded in this process? import only one)"), result.stdout


# --- second and higher derivatives ---------------------------------------------------------------


def hessian_vector_product(fn, x, v):
    """(d/dx of <grad f(x), v>, grad f(x)) with create_graph=True, as a Hessian-free optimizer does."""
    x = x.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(fn(x), [x], create_graph=True)
    (hvp,) = torch.autograd.grad((grad * v).sum(), [x])
    return grad.detach(), hvp


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hessian_vector_product_matches_plain_torch(dtype, inplace, device):
    """A loss with a second derivative through the op, e.g. (loss + a^2) differentiated twice in a,
    used to give 2.0 where torch gives 2.245: the kernel's gradient was a constant to autograd."""
    logits, labels = make_inputs((3, 5, 40), dtype, device)
    weights = torch.rand(3, dtype=dtype, device=device) + 0.5

    def ours(x):
        return (epa_ext.sequence_logps(x * 1, labels, inplace_backward=inplace) * weights).sum()

    def plain(x):
        return (eager.sequence_logps(x, labels) * weights).sum()

    v = torch.randn_like(logits)
    grad, hvp = hessian_vector_product(ours, logits, v)
    truth_grad, truth_hvp = hessian_vector_product(plain, logits.double(), v.double())
    assert_close_to_truth(grad, truth_grad, dtype=dtype, what="first derivative")
    assert_close_to_truth(hvp, truth_hvp, dtype=dtype, what="Hessian-vector product")

    def scalar_second_derivative(fn, a):
        a = a.clone().requires_grad_()
        (first,) = torch.autograd.grad(fn(logits.to(a.dtype) * a) + a**2, [a], create_graph=True)
        (second,) = torch.autograd.grad(first, [a])
        return second

    a = torch.tensor(0.7, dtype=dtype, device=device)
    assert_close_to_truth(scalar_second_derivative(ours, a), scalar_second_derivative(plain, a.double()), dtype=dtype,
                          what="d2/da2 (loss(a * logits) + a^2)")


def test_third_derivative_matches_plain_torch():
    """The double backward is written with differentiable torch ops: a third derivative works too."""
    logits, labels = make_inputs((2, 3, 9), torch.float64, "cpu")

    def third(fn):
        a = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        (d1,) = torch.autograd.grad(fn(logits * a, labels).sum(), [a], create_graph=True)
        (d2,) = torch.autograd.grad(d1, [a], create_graph=True)
        (d3,) = torch.autograd.grad(d2, [a])
        return d3

    torch.testing.assert_close(third(epa_ext.token_logps), third(eager.token_logps))


def test_create_graph_without_a_second_derivative_keeps_the_kernel_gradient():
    """create_graph=True for another part of the graph (a gradient penalty elsewhere) is not refused
    and gives the same first derivative as without it."""
    logits, labels = make_inputs((2, 4, 33), torch.float32, "cpu")
    grads = []
    for create_graph in (False, True):
        x = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(epa_ext.sequence_logps(x, labels).sum(), [x], create_graph=create_graph)
        grads.append(grad.detach())
    assert torch.equal(grads[0], grads[1])


# --- inplace_backward=True: what it refuses --------------------------------------------------------


def produced_logits(shape=(3, 4, 20), dtype=torch.float64):
    """Logits computed from a leaf (as a model's lm_head output is), and that leaf."""
    source = torch.randn(shape, dtype=dtype, requires_grad=True)
    return source * 1, source


def test_inplace_backward_refuses_overlapping_rows():
    row = torch.randn(1, 1, 20, dtype=torch.float64, requires_grad=True)
    expanded = (row * 1).expand(3, 4, 20)  # every row is the same memory: each gradient would overwrite the others
    labels = torch.randint(0, 20, (3, 4))
    with pytest.raises(ValueError, match=r"token_logps: inplace_backward=True writes the gradient over logits, whose "
                                         r"rows share memory .*Pass inplace_backward=False"):
        epa_ext.token_logps(expanded, labels, inplace_backward=True)
    torch.testing.assert_close(epa_ext.token_logps(expanded, labels), eager.token_logps(expanded, labels))
    logps, lse = torch.ops.epa_ext.token_logps(expanded.detach(), labels, IGNORE_INDEX)
    for device_ in ("cpu", "meta"):  # the raw in-place op, kernel and fake
        args = [t.to(device_) for t in (torch.ones(3, 4, dtype=torch.float64), labels, lse, logps)]
        args.insert(1, row.detach().to(device_).expand(3, 4, 20))
        with pytest.raises(ValueError, match="token_logps_backward_: inplace_backward=True writes the gradient over"):
            torch.ops.epa_ext.token_logps_backward_(*args, IGNORE_INDEX)


def test_inplace_backward_refuses_leaves_and_their_views():
    leaf = torch.randn(3, 4, 20, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 20, (3, 4))
    for logits, what in ((leaf, "a leaf tensor"), (leaf[:, :3], "a view of a leaf tensor")):
        with pytest.raises(ValueError, match=f"inplace_backward=True would overwrite logits, {what}"):
            epa_ext.token_logps(logits, labels[:, : logits.shape[1]], inplace_backward=True)
    # A leaf that needs no gradient is never written: accepted.
    epa_ext.token_logps(leaf.detach(), labels, inplace_backward=True)


def test_inplace_backward_refuses_a_second_backward():
    logits, source = produced_logits()
    labels = torch.randint(0, 20, (3, 4))
    out = epa_ext.sequence_logps(logits, labels, inplace_backward=True).sum()
    (first,) = torch.autograd.grad(out, [source], retain_graph=True)
    truth = torch.autograd.grad(eager.sequence_logps(source, labels).sum(), [source])[0]
    torch.testing.assert_close(first, truth)
    with pytest.raises(RuntimeError, match="already overwrote the logits with their gradient.*Pass inplace_backward=False"):
        torch.autograd.grad(out, [source])


def test_inplace_backward_logits_saved_by_another_node():
    """sin() saves its input; the in-place backward, when it runs first, bumps the logits' version
    and autograd refuses to run sin's backward on the overwritten values."""
    logits, source = produced_logits()
    labels = torch.randint(0, 20, (3, 4))
    loss = logits.sin().sum() + epa_ext.sequence_logps(logits, labels, inplace_backward=True).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # Two in-place consumers of the same logits: the second one would read the first one's gradient.
    logits, source = produced_logits()
    loss = sum(epa_ext.sequence_logps(logits, labels, inplace_backward=True).sum() for _ in range(2))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- torch.func and forward-mode AD -----------------------------------------------------------------


def test_torch_func_differentiating_transforms_are_refused():
    logits, labels = make_inputs((3, 17), torch.float64, "cpu")
    fn = lambda x: epa_ext.sequence_logps(x, labels)  # noqa: E731
    transforms = {
        "grad": lambda: torch.func.grad(fn)(logits),
        "vjp": lambda: torch.func.vjp(fn, logits),
        "jacrev": lambda: torch.func.jacrev(fn)(logits),
        "hessian": lambda: torch.func.hessian(fn)(logits),
        "jacfwd": lambda: torch.func.jacfwd(fn)(logits),  # used to return a zero Jacobian without a word
        "jvp": lambda: torch.func.jvp(fn, (logits,), (torch.ones_like(logits),)),
        "grad of vmap": lambda: torch.func.grad(lambda x: torch.func.vmap(fn)(x[None]).sum())(logits),
    }
    for name, call in transforms.items():
        with pytest.raises(NotImplementedError, match=r"epa_ext.sequence_logps does not support torch.func's "
                                                      r"differentiating transforms .*Use torch.autograd.grad"):
            call()
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(logits, torch.ones_like(logits))
        with pytest.raises(NotImplementedError, match="does not support forward-mode AD"):
            epa_ext.token_logps(dual, labels)


def test_vmap_alone_is_supported():
    logits, labels = make_inputs((4, 3, 17), torch.float32, "cpu")
    batched = torch.func.vmap(lambda x, y: epa_ext.sequence_logps(x, y))(logits, labels)
    torch.testing.assert_close(batched, torch.stack([epa_ext.sequence_logps(x, y) for x, y in zip(logits, labels)]))
