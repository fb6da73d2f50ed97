"""softcap: logits -> c * tanh(logits / c) (Gemma-2/3's final_logit_softcapping) on every op that
reads or forms logits: token_logps / sequence_logps (and their backward ops, in place too),
fused_dpo_loss / fused_epa_loss, linear_sequence_logps and both paths of fused_linear_*_loss,
against the plain-torch definitions of epa_ext.eager."""

from __future__ import annotations

import pytest
import torch
from test_fused import check_fused, make_batch
from test_linear import grads_of, loss_functions, make_groups, op_args, small_batch
from test_logps import DTYPES, check_against_reference, make_inputs

import epa_ext
from epa_ext import IGNORE_INDEX, eager
from numerics import GRADCHECK, assert_close_to_truth, assert_paths_agree

# Logits of scale 8 against a cap of 5: most of them are in the bent part of tanh.
CAP = 5.0
SCALE = 8.0


@pytest.mark.parametrize("shape", [(37, 123), (3, 17, 123), (2, 5, 50257), (1, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logps_match_reference(shape, dtype, device):
    logits, labels = make_inputs(shape, dtype, device, scale=SCALE)
    check_against_reference(logits, labels, softcap=CAP, what=f"softcap {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_and_strided_logits(dtype, device):
    logits, labels = make_inputs((3, 11, 301), dtype, device, scale=SCALE)
    check_against_reference(logits[:, :-1], labels[:, :-1], softcap=CAP, inplace_backward=True, what="in place")


def test_float64(device):
    logits, labels = make_inputs((3, 9, 257), torch.float64, device, scale=SCALE)
    x, y = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = epa_ext.token_logps(x, labels, softcap=CAP)
    truth = eager.token_logps(y, labels, softcap=CAP)
    assert ours.dtype == torch.float64
    ours.sum().backward()
    truth.sum().backward()
    assert_close_to_truth(ours, truth, dtype=torch.float64)
    assert_close_to_truth(x.grad, y.grad, dtype=torch.float64)


@pytest.mark.parametrize("cap", [1e-3, 1e4, 1e30], ids=str)
def test_caps_far_from_the_logits(cap, device):
    """A cap far below the logits (every logit saturated) or far above them (capping changes
    nothing): tanh(z / c) keeps its relative accuracy for tiny z / c, where 1 - 2 / (1 + exp(2z / c))
    would round to 0 and a large cap would multiply that back into the logits."""
    logits, labels = make_inputs((3, 7, 1000), torch.float32, device, scale=SCALE)
    check_against_reference(logits, labels, softcap=cap, what=f"cap {cap}")


def test_logits_far_beyond_the_cap_stay_finite_and_exact(device):
    """|z| = 1e4 against a cap of 30 (Gemma-2's): the capped logit is +-30 exactly and its slope
    1 - tanh^2 is exactly 0 in fp32 and fp64 alike, so those columns get no gradient; +-inf logits
    are capped to +-30 as plain torch caps them, and a NaN logit makes its row NaN."""
    cap = 30.0
    logits, labels = make_inputs((4, 6, 500), torch.float32, device, scale=3.0)
    spikes = torch.rand(logits.shape, device=device) < 0.05
    logits = torch.where(spikes, torch.sign(torch.randn_like(logits)) * 1e4, logits)
    kept = labels.clamp(min=0)
    logits[0, 0, kept[0, 0]] = 1e4  # a target far beyond the cap
    logits[1, 2, :] = -1e4  # a whole row of them: uniform after capping
    logits[2, 3, 7] = float("inf")
    logits[3, 1, 9] = float("-inf")
    check_against_reference(logits, labels, softcap=cap, what="+-1e4 and +-inf")
    x = logits.clone().requires_grad_()
    out = epa_ext.token_logps(x, labels, softcap=cap)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    beyond = logits.abs() >= 1e4
    assert torch.equal(x.grad[beyond], torch.zeros_like(x.grad[beyond]))

    labels[1, 4] = 3
    logits[1, 4, 11] = float("nan")
    out = epa_ext.token_logps(logits, labels, softcap=cap)
    assert out[1, 4].isnan() and torch.isfinite(out[1, :4]).all()
    assert_close_to_truth(out, eager.token_logps(logits.double(), labels, softcap=cap), dtype=torch.float32,
                          inputs_scale=cap, what="a NaN logit")


@pytest.mark.parametrize("check", [torch.autograd.gradcheck, torch.autograd.gradgradcheck], ids=lambda c: c.__name__)
def test_gradcheck_float64(check, device):
    """First and second derivatives (the second through the definition: the capped double
    backward) against finite differences."""
    logits, labels = make_inputs((2, 4, 7), torch.float64, device, scale=SCALE)
    x = logits.clone().requires_grad_()
    assert check(lambda t: epa_ext.sequence_logps(t, labels, average=True, softcap=CAP), (x,), **GRADCHECK)
    assert check(lambda t: epa_ext.token_logps(t, labels, softcap=CAP), (x,), **GRADCHECK)


def test_second_derivative_matches_plain_torch(device):
    """Hessian-vector product of a capped sequence loss, through create_graph=True."""
    logits, labels = make_inputs((2, 5, 19), torch.float64, device, scale=SCALE)
    direction = torch.randn_like(logits)
    results = []
    for fn in (epa_ext.sequence_logps, eager.sequence_logps):
        x = logits.clone().requires_grad_()
        values = fn(x, labels, softcap=CAP)
        (grad,) = torch.autograd.grad((values ** 2).sum(), [x], create_graph=True)
        (hvp,) = torch.autograd.grad((grad * direction).sum(), [x])
        results.append(hvp)
    assert_close_to_truth(results[0], results[1], dtype=torch.float64)


def test_opcheck(device):
    logits, labels = make_inputs((2, 5, 33), torch.float32, device, scale=SCALE)
    torch.library.opcheck(torch.ops.epa_ext.token_logps.default,
                          (logits.clone().requires_grad_(), labels, IGNORE_INDEX, False, CAP))
    logps, lse = torch.ops.epa_ext.token_logps(logits, labels, IGNORE_INDEX, False, CAP)
    grad = torch.randn(labels.shape, device=device)
    torch.library.opcheck(torch.ops.epa_ext.token_logps_backward.default,
                          (grad, logits, labels, lse, logps, IGNORE_INDEX, CAP))
    torch.library.opcheck(torch.ops.epa_ext.token_logps_backward_.default,
                          (grad, logits.clone(), labels, lse, logps, IGNORE_INDEX, CAP))
    hidden, weight, bias, labels, ref = small_batch(device)
    rows, row_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    torch.library.opcheck(torch.ops.epa_ext.linear_token_logps.default,
                          (rows.clone().requires_grad_(), weight.clone().requires_grad_(), bias, row_labels,
                           IGNORE_INDEX, 3, True, CAP))
    logps, lse = torch.ops.epa_ext.linear_token_logps(rows, weight, bias, row_labels, IGNORE_INDEX, 3, True, CAP)
    torch.library.opcheck(torch.ops.epa_ext.linear_token_logps_backward.default,
                          (torch.randn_like(logps), rows, weight, bias, row_labels, lse, logps, IGNORE_INDEX, 3,
                           [True, True, True], True, CAP))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    torch.library.opcheck(torch.ops.epa_ext.linear_dpo_loss.default,
                          (*op_args("dpo", *leaves, labels, ref, [True] * 3), CAP))
    torch.library.opcheck(torch.ops.epa_ext.linear_epa_loss.default,
                          (*op_args("epa", *leaves, labels, ref, [True] * 3), None, CAP))


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_losses_from_logits(inplace, dtype, device):
    logits, labels, ref = make_batch(4, 3, 9, 131, dtype, device)
    logits = logits * SCALE / 2
    check_fused(epa_ext.fused_epa_loss, eager.fused_epa_loss, logits, labels, ref, inplace=inplace, num_candidates=4,
                num_strong=2, weak_weight=0.5, softcap=CAP)
    check_fused(epa_ext.fused_dpo_loss, eager.fused_dpo_loss, logits[:6], labels[:6], ref[:6], inplace=inplace,
                loss_type="ipo", beta=0.5, softcap=CAP)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_sequence_logps(dtype, device):
    hidden, weight, bias, labels, _ = make_groups([[5, 3], [2, 6]], 24, 97, dtype, device)
    weight = weight * SCALE  # logits of magnitude ~10: the cap of 5 bites

    def ours(h, w, b):
        return epa_ext.linear_sequence_logps(h, w, labels, bias=b, max_chunk_tokens=4, softcap=CAP)

    def plain(h, w, b):
        return eager.linear_sequence_logps(h, w, labels, b, softcap=CAP)

    value, grads = grads_of(ours, [hidden, weight, bias])
    truth, truth_grads = grads_of(plain, [t.double() for t in (hidden, weight, bias)])
    in_dtype, in_dtype_grads = grads_of(plain, [hidden, weight, bias])
    assert_close_to_truth(value, truth, dtype=dtype, plain=in_dtype, what="sequence logps", inputs_scale=CAP * 5)
    for name, g, t, p in zip(("hidden", "weight", "bias"), grads, truth_grads, in_dtype_grads):
        assert_close_to_truth(g, t, dtype=dtype, plain=p, what=f"d({name})", inputs_scale=CAP)


CASES = [
    ("dpo", dict(loss_type="sigmoid", label_smoothing=0.1)),
    ("epa", dict(num_candidates=4, num_strong=2, weak_weight=0.5, mask=True, sft_weight=0.4)),
]


@pytest.mark.parametrize("budget", [None, 7], ids=["whole-groups", "groups-in-pieces"])
@pytest.mark.parametrize("kind,options", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_losses_both_paths(kind, options, budget, dtype, device):
    """The three-matmul path (pieces of a group recomputed included) and the recomputing one."""
    candidates = 2 if kind == "dpo" else options["num_candidates"]
    lengths = [[6 + (b + c) % 4 for c in range(candidates)] for b in range(4)]
    hidden, weight, bias, labels, ref = make_groups(lengths, 16, 50, dtype, device)
    weight = weight * SCALE
    prompts = hidden.shape[0] // candidates
    options = {**options, "softcap": CAP}
    plain = loss_functions(kind, options, labels, ref, prompts, device)[1]
    truth, truth_grads = grads_of(plain, [t.double() for t in (hidden, weight, bias)])
    in_dtype, in_dtype_grads = grads_of(plain, [hidden, weight, bias])
    for differentiable in (False, True):
        ours = loss_functions(kind, options, labels, ref, prompts, device, max_chunk_tokens=budget,
                              differentiable_logps=differentiable)[0]
        value, grads = grads_of(ours, [hidden, weight, bias])
        what = f"{kind} {'recomputing' if differentiable else 'three-matmul'}"
        assert_close_to_truth(value, truth, dtype=dtype, plain=in_dtype, what=f"{what} loss", inputs_scale=CAP)
        for name, g, t, p in zip(("hidden", "weight", "bias"), grads, truth_grads, in_dtype_grads):
            assert_close_to_truth(g, t, dtype=dtype, plain=p, what=f"{what} d({name})", inputs_scale=CAP)


def test_compile_fullgraph(device):
    logits, labels, ref = make_batch(4, 2, 6, 40, torch.float32, device)
    hidden, weight, bias, hidden_labels, hidden_ref = small_batch(device)

    def step(x, h, w):
        epa, _ = epa_ext.fused_epa_loss(x, labels, ref, num_candidates=4, softcap=CAP)
        tokens = epa_ext.token_logps(x, labels, softcap=CAP).mean()
        linear, _ = epa_ext.fused_linear_epa_loss(h, w, hidden_labels, hidden_ref, bias=bias, num_candidates=2,
                                                  softcap=CAP)
        return epa + tokens + linear * 2

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        results.append(grads_of(fn, [logits * SCALE, hidden, weight]))
    assert_paths_agree(results[1][0], results[0][0], what="compiled loss")
    for a, b in zip(results[1][1], results[0][1]):
        assert_paths_agree(a, b, what="compiled gradient")


def _public_calls():
    """Every public function that takes softcap, each as call(softcap)."""
    logits, labels, ref = make_batch(2, 2, 4, 17, torch.float32, "cpu")
    hidden, weight, bias, hidden_labels, hidden_ref = small_batch("cpu")
    return {
        "token_logps": lambda c: epa_ext.token_logps(logits, labels, softcap=c),
        "sequence_logps": lambda c: epa_ext.sequence_logps(logits, labels, softcap=c),
        "fused_dpo_loss": lambda c: epa_ext.fused_dpo_loss(logits, labels, ref, softcap=c),
        "fused_epa_loss": lambda c: epa_ext.fused_epa_loss(logits, labels, ref, num_candidates=2, softcap=c),
        "linear_sequence_logps": lambda c: epa_ext.linear_sequence_logps(hidden, weight, hidden_labels, softcap=c),
        "fused_linear_dpo_loss": lambda c: epa_ext.fused_linear_dpo_loss(hidden, weight, hidden_labels, hidden_ref,
                                                                         softcap=c),
        "fused_linear_epa_loss": lambda c: epa_ext.fused_linear_epa_loss(hidden, weight, hidden_labels, hidden_ref,
                                                                         num_candidates=2, softcap=c),
    }


BAD_SOFTCAPS = [  # (softcap, error type, pattern)
    (0.0, ValueError, r"softcap must be > 0.0; got 0.0"),
    (-30.0, ValueError, r"softcap must be > 0.0; got -30.0"),
    (float("inf"), ValueError, "softcap must be finite; got inf"),
    (float("nan"), ValueError, "softcap must be finite; got nan"),
    (1e-40, ValueError, r"softcap must be in \[1.17\d*e-38, 3.40\d*e\+38\] \(float32's normal range"),
    # above float32's largest number the kernels' cap is inf and every log-prob NaN
    (1e39, ValueError, r"softcap must be in \[1.17\d*e-38, 3.40\d*e\+38\] .*; got 1e\+39"),
    (1e300, ValueError, r"softcap must be in \[1.17\d*e-38, 3.40\d*e\+38\] .*; got 1e\+300"),
    (torch.tensor(30.0), TypeError, r"softcap must be a real number \(float or int\); got Tensor"),
    ("30", TypeError, r"softcap must be a real number \(float or int\); got str '30'"),
    (True, TypeError, "softcap must be a real number .*; got bool"),
]


@pytest.mark.parametrize("softcap,error,pattern", BAD_SOFTCAPS, ids=[str(b[0]) for b in BAD_SOFTCAPS])
def test_bad_softcap_is_refused_by_every_function(softcap, error, pattern):
    for name, call in _public_calls().items():
        with pytest.raises(error, match=pattern):
            call(softcap)
        assert call(30) is not None, name  # an int is a real number


@pytest.mark.parametrize("device_", ["cpu", "meta"])
def test_raw_ops_refuse_bad_softcap(device_):
    """The C++ checks (CPU) and the fake kernels (meta) behind the Python ones."""
    logits, labels = make_inputs((2, 3, 11), torch.float32, device_)
    hidden, weight, bias, hidden_labels, ref = (t if t is None else t.to(device_) for t in small_batch("cpu"))
    logps, lse = torch.ops.epa_ext.token_logps(logits, labels, IGNORE_INDEX)
    # C++ prints 0 and 1.17549e-38 where Python prints 0.0 and 1.1754943508222875e-38
    pattern = (r"softcap must be None or a number in \[1.17\d*e-38, 3.40\d*e\+38\] \(float32's normal range; .*\); "
               r"got -?(0|1|inf|nan|1e\+39)")
    for bad in (0.0, -1.0, float("inf"), float("nan"), 1e39):
        calls = [
            lambda: torch.ops.epa_ext.token_logps(logits, labels, IGNORE_INDEX, False, bad),
            lambda: torch.ops.epa_ext.token_logps_backward(torch.ones_like(logps), logits, labels, lse, logps,
                                                           IGNORE_INDEX, bad),
            lambda: torch.ops.epa_ext.token_logps_backward_(torch.ones_like(logps), logits.clone(), labels, lse, logps,
                                                            IGNORE_INDEX, bad),
            lambda: torch.ops.epa_ext.linear_token_logps(hidden[0], weight, bias, hidden_labels[0], IGNORE_INDEX, 0,
                                                         True, bad),
            lambda: torch.ops.epa_ext.linear_dpo_loss(*op_args("dpo", hidden, weight, bias, hidden_labels, ref,
                                                               [False] * 3), bad),
            lambda: torch.ops.epa_ext.linear_epa_loss(*op_args("epa", hidden, weight, bias, hidden_labels, ref,
                                                               [False] * 3), None, bad),
        ]
        for call in calls:
            with pytest.raises(ValueError, match=pattern):
                call()
