"""dpo_loss / epa_loss (and their modules and metrics) against the float64 reference."""

from __future__ import annotations

import math

import pytest
import torch

import epa_ext
from epa_ext import eager
from numerics import TOLERANCES, assert_close_to_truth, assert_rounded_once

LOSS_TYPES = ["sigmoid", "robust", "hinge", "ipo"]
REDUCTIONS = ["mean", "sum", "none"]
INPUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_logps(*shape, dtype=torch.float32, device="cpu", scale=20.0):
    return (-torch.rand(*shape, dtype=torch.float64) * scale).to(dtype).to(device)


def compare(ours_fn, ref_fn, inputs, *, dtype, what):
    """Value and input gradients of ours_fn against ref_fn on float64 copies of the same inputs. The
    kernels upcast their inputs exactly and compute in fp32, so values match float64 to fp32
    precision for every input dtype; gradients are returned in the input dtype, rounded once."""
    ours_in = [t.clone().requires_grad_() for t in inputs]
    truth_in = [t.double().requires_grad_() for t in inputs]
    ours, truth = ours_fn(*ours_in), ref_fn(*truth_in)
    upstream = torch.rand(truth.shape, dtype=torch.float64) + 0.5
    ours.backward(upstream.to(ours.dtype).to(ours.device))
    truth.backward(upstream.to(truth.device))
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to_truth(ours, truth, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                          what=f"{what} value")
    for i, (a, b) in enumerate(zip(ours_in, truth_in)):
        assert a.grad.dtype == dtype
        assert_rounded_once(a.grad, b.grad, dtype=dtype, what=f"{what} grad of input {i}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", INPUT_DTYPES + [torch.float64], ids=str)
def test_dpo_matches_reference(loss_type, reduction, dtype, device):
    smoothing = 0.15 if loss_type in ("sigmoid", "robust") else 0.0
    beta = 0.1 if loss_type != "ipo" else 0.5
    inputs = [random_logps(37, dtype=dtype, device=device) for _ in range(4)]
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=smoothing, reduction=reduction)
    compare(lambda *t: epa_ext.dpo_loss(*t, **options), lambda *t: eager.dpo_loss(*t, **options), inputs,
            dtype=dtype, what=f"dpo {loss_type}")


EPA_CASES = [  # (C, num_strong, weak_weight, with_mask)
    (2, None, 1.0, False),
    (4, None, 1.0, False),
    (6, 2, 1.0, False),
    (6, 1, 0.25, True),
    (9, 3, 2.0, True),
    (5, 4, 1.0, True),
    (4, 1, 0.0, False),
]


def make_mask(batch, candidates, device):
    mask = torch.rand(batch, candidates) > 0.3
    mask[:, 0] = True
    mask[0, 1:] = False  # a prompt with no negative at all: loss 0, gradient 0
    return mask.to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", EPA_CASES, ids=str)
@pytest.mark.parametrize("dtype", INPUT_DTYPES + [torch.float64], ids=str)
def test_epa_matches_reference(case, reduction, dtype, device):
    candidates, num_strong, weak_weight, with_mask = case
    mask = make_mask(11, candidates, device) if with_mask else None
    options = dict(beta=0.2, num_strong=num_strong, weak_weight=weak_weight, mask=mask, reduction=reduction)
    inputs = [random_logps(11, candidates, dtype=dtype, device=device) for _ in range(2)]
    compare(lambda *t: epa_ext.epa_loss(*t, **options), lambda *t: eager.epa_loss(*t, **options), inputs,
            dtype=dtype, what=f"epa {case}")


def test_epa_with_one_strong_negative_is_dpo_sigmoid(device):
    """Both ops against DPO's float64 definition, so each other within fp32 precision."""
    inputs = [random_logps(64, device=device) for _ in range(4)]
    leaves = [t.clone().requires_grad_() for t in inputs]
    truth_leaves = [t.double().requires_grad_() for t in inputs]
    chosen, rejected, ref_chosen, ref_rejected = leaves
    truth = eager.dpo_loss(*truth_leaves, beta=0.3, reduction="none")
    truth_grads = torch.autograd.grad(truth.sum(), truth_leaves[:2])
    dpo = epa_ext.dpo_loss(*leaves, beta=0.3, reduction="none")
    epa = epa_ext.epa_loss(torch.stack([chosen, rejected], 1), torch.stack([ref_chosen, ref_rejected], 1), beta=0.3,
                           reduction="none")
    for name, loss in (("dpo", dpo), ("epa", epa)):
        assert_close_to_truth(loss, truth, dtype=torch.float32, what=f"{name} value")
        for grad, truth_grad in zip(torch.autograd.grad(loss.sum(), [chosen, rejected]), truth_grads):
            assert_close_to_truth(grad, truth_grad, dtype=torch.float32, what=f"{name} gradient")


def test_epa_row_shift_invariance_and_zero_sum_gradient(device):
    policy, ref = random_logps(16, 7, device=device), random_logps(16, 7, device=device)
    shift = torch.randn(16, 1, device=device) * 50
    mask = make_mask(16, 7, device)
    options = dict(beta=0.5, num_strong=3, weak_weight=0.7, mask=mask, reduction="none")
    p = policy.double().requires_grad_()
    truth = eager.epa_loss(p, ref.double(), **options)
    (truth_grad,) = torch.autograd.grad(truth.sum(), [p])
    for p in (policy, policy + shift):  # the shifted rows have scores in the tens: their fp32 error
        p = p.clone().requires_grad_()
        loss = epa_ext.epa_loss(p, ref, **options)
        (grad,) = torch.autograd.grad(loss.sum(), [p])
        inputs_scale = 0.5 * float((p - ref).abs().max())
        assert_close_to_truth(loss, truth, dtype=torch.float32, inputs_scale=inputs_scale, what="loss")
        assert_close_to_truth(grad, truth_grad, dtype=torch.float32, inputs_scale=inputs_scale, what="gradient")
        # each row of d loss / d policy is beta * (softmax - onehot): it sums to zero
        assert_close_to_truth(grad.sum(1), torch.zeros(16), dtype=torch.float32, inputs_scale=inputs_scale,
                              what="row sums of the gradient")


def test_epa_masked_candidates_contribute_nothing(device):
    policy, ref = random_logps(8, 6, device=device), random_logps(8, 6, device=device)
    mask = make_mask(8, 6, device)
    p = policy.clone().requires_grad_()
    losses = epa_ext.epa_loss(p, ref, num_strong=2, weak_weight=0.5, mask=mask, reduction="none")
    losses.sum().backward()
    assert torch.equal(p.grad[~mask], torch.zeros_like(p.grad[~mask]))
    assert losses[0].item() == 0.0  # row 0 has no negative present
    policy_poisoned = policy.masked_fill(~mask, 1e30)  # values of absent candidates never matter
    torch.testing.assert_close(epa_ext.epa_loss(policy_poisoned, ref, num_strong=2, weak_weight=0.5, mask=mask,
                                                reduction="none"), losses.detach())
    for i in range(8):  # each row equals EPA on its present candidates alone
        keep = mask[i]
        strong_kept = int(keep[1:3].sum())
        if keep.sum() < 2:
            continue
        sub_options = dict(num_strong=strong_kept, weak_weight=0.5) if strong_kept else dict(num_strong=None)
        if strong_kept == 0:  # only weak negatives present: they keep their weight
            scores = 0.1 * (policy[i, keep] - ref[i, keep]) + torch.tensor([0.0] + [math.log(0.5)] * (int(keep.sum()) - 1),
                                                                            device=device)
            expected = torch.logsumexp(scores, 0) - scores[0]
        else:
            expected = epa_ext.epa_loss(policy[i, keep][None], ref[i, keep][None], **sub_options)
        assert_close_to_truth(losses[i], expected, dtype=torch.float32, what=f"row {i}")


def test_epa_unit_weak_weight_is_cross_entropy(device):
    policy, ref = random_logps(10, 8, device=device), random_logps(10, 8, device=device)
    loss = epa_ext.epa_loss(policy, ref, beta=0.4, num_strong=2, weak_weight=1.0)
    ce = torch.nn.functional.cross_entropy(0.4 * (policy - ref), torch.zeros(10, dtype=torch.long, device=device))
    torch.testing.assert_close(loss, ce)


def test_large_rewards_stay_finite(device):
    # |beta * h| in the hundreds: exp would overflow fp32 if formed directly.
    policy = torch.tensor([[0.0, -3000.0, 2500.0], [-4000.0, 0.0, 0.0]], device=device)
    ref = torch.zeros_like(policy)
    for loss_type in LOSS_TYPES:
        p = policy[:, :2].clone().requires_grad_()
        loss = epa_ext.dpo_loss(p[:, 0], p[:, 1], ref[:, 0], ref[:, 1], beta=0.2, loss_type=loss_type, reduction="sum")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(p.grad).all(), loss_type
        truth = eager.dpo_loss(*(t.double() for t in (p[:, 0], p[:, 1], ref[:, 0], ref[:, 1])), beta=0.2,
                                   loss_type=loss_type, reduction="sum")
        assert_close_to_truth(loss, truth, dtype=torch.float32, inputs_scale=0.2 * 4000, what=loss_type)
    p = policy.clone().requires_grad_()
    loss = epa_ext.epa_loss(p, ref, beta=0.2, num_strong=1, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    assert_close_to_truth(loss, eager.epa_loss(policy.double(), ref.double(), beta=0.2, num_strong=1, reduction="sum"),
                          dtype=torch.float32, inputs_scale=0.2 * 4000, what="epa")


def test_two_disjoint_pairs_dpo_is_flat_epa_is_not():
    """epa-spec section 7: pairs a > b and c > d. Shifting (r_c, r_d) together leaves DPO's loss
    unchanged; EPA, with the other pair's answers as weak negatives, has a unique minimum."""
    base = torch.tensor([2.0, 0.0, 1.0, -1.0], dtype=torch.float64)  # log-ratios h of a, b, c, d
    shifts = torch.linspace(-6, 6, 49, dtype=torch.float64)
    dpo_values, epa_values = [], []
    zeros = torch.zeros(2, dtype=torch.float64)
    for t in shifts:
        h = base + torch.tensor([0, 0, 1, 1], dtype=torch.float64) * t
        a, b, c, d = h
        dpo_values.append(epa_ext.dpo_loss(torch.stack([a, c]), torch.stack([b, d]), zeros, zeros, beta=1.0).item())
        rows = torch.stack([torch.stack([a, b, c, d]), torch.stack([c, d, a, b])])  # [positive, strong, weak, weak]
        epa_values.append(epa_ext.epa_loss(rows, torch.zeros_like(rows), beta=1.0, num_strong=1).item())
    dpo_values, epa_values = torch.tensor(dpo_values, dtype=torch.float64), torch.tensor(epa_values, dtype=torch.float64)
    assert dpo_values.max() - dpo_values.min() < TOLERANCES[torch.float64][1]  # flat to float64 rounding (values ~1)
    assert epa_values.max() - epa_values.min() > 0.5
    assert (epa_values[2:] - 2 * epa_values[1:-1] + epa_values[:-2]).min() > 0  # strictly convex along the shift
    assert 0 < int(epa_values.argmin()) < len(shifts) - 1  # an interior, unique minimum


# First and second derivatives (the second through create_graph=True) against finite differences.
CHECKS = [torch.autograd.gradcheck, torch.autograd.gradgradcheck]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_gradcheck(loss_type, check, device):
    inputs = [random_logps(6, dtype=torch.float64, device=device, scale=3.0).requires_grad_() for _ in range(4)]
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    assert check(
        lambda *t: epa_ext.dpo_loss(*t, beta=0.7, loss_type=loss_type, label_smoothing=smoothing, reduction="none"),
        inputs,
    )


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_epa_gradcheck(check, device):
    policy, ref = (random_logps(5, 6, dtype=torch.float64, device=device, scale=3.0).requires_grad_() for _ in range(2))
    mask = make_mask(5, 6, device)
    assert check(
        lambda p, r: epa_ext.epa_loss(p, r, beta=0.7, num_strong=2, weak_weight=0.3, mask=mask, reduction="none"),
        (policy, ref),
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_opcheck(loss_type, device):
    inputs = [random_logps(9, device=device).requires_grad_() for _ in range(4)]
    torch.library.opcheck(torch.ops.epa_ext.dpo_loss.default, (*inputs, 0.1, loss_type, 0.0))


@pytest.mark.parametrize("with_mask", [False, True])
def test_epa_opcheck(with_mask, device):
    policy, ref = random_logps(7, 5, device=device).requires_grad_(), random_logps(7, 5, device=device)
    mask = make_mask(7, 5, device) if with_mask else None
    torch.library.opcheck(torch.ops.epa_ext.epa_loss.default, (policy, ref, mask, 0.1, 2, 0.5))
    _, lse = torch.ops.epa_ext.epa_loss(policy.detach(), ref, mask, 0.1, 2, 0.5)
    torch.library.opcheck(torch.ops.epa_ext.epa_loss_backward.default,
                          (torch.rand(7, device=device), policy.detach(), ref, mask, lse, 0.1, 2, 0.5))


def test_losses_compile_fullgraph(device):
    pc, pr, rc, rr = [random_logps(8, device=device) for _ in range(4)]
    policy, ref = random_logps(8, 5, device=device), random_logps(8, 5, device=device)
    mask = make_mask(8, 5, device)

    def both(pc, pr, policy):
        dpo = epa_ext.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type="robust", label_smoothing=0.1)
        epa = epa_ext.epa_loss(policy, ref, beta=0.2, num_strong=2, weak_weight=0.5, mask=mask)
        return dpo + epa

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (both, compiled):
        args = [t.clone().requires_grad_() for t in (pc, pr, policy)]
        out = fn(*args)
        out.backward()
        results.append([out.detach()] + [a.grad for a in args])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_modules_match_functions():
    inputs = [random_logps(5) for _ in range(4)]
    module = epa_ext.DPOLoss(beta=0.3, loss_type="robust", label_smoothing=0.2, reduction="sum")
    torch.testing.assert_close(module(*inputs), epa_ext.dpo_loss(*inputs, beta=0.3, loss_type="robust",
                                                                 label_smoothing=0.2, reduction="sum"))
    policy, ref = random_logps(5, 4), random_logps(5, 4)
    module = epa_ext.EPALoss(beta=0.3, num_strong=1, weak_weight=0.5)
    torch.testing.assert_close(module(policy, ref), epa_ext.epa_loss(policy, ref, beta=0.3, num_strong=1,
                                                                     weak_weight=0.5))
    assert "weak_weight=0.5" in repr(module)


def test_preference_metrics():
    policy = torch.tensor([[-1.0, -3.0, -2.0, -9.0], [-5.0, -1.0, -4.0, -2.0]])
    ref = torch.tensor([[-2.0, -2.0, -2.0, -2.0], [-2.0, -2.0, -2.0, -2.0]])
    metrics = epa_ext.preference_metrics(policy, ref, beta=0.5, num_strong=2)
    rewards = 0.5 * (policy - ref)  # [[0.5, -0.5, 0, -3.5], [-1.5, 0.5, -1, 0]]
    expected = {
        "rewards/chosen": rewards[:, 0].mean(),
        "rewards/rejected": rewards[:, 1:3].mean(),
        "rewards/margins": (rewards[:, :1] - rewards[:, 1:3]).mean(),
        "rewards/accuracies": torch.tensor(0.5),  # row 0 beats both, row 1 beats neither
        "logps/chosen": policy[:, 0].mean(),
        "logps/rejected": policy[:, 1:3].mean(),
        "rewards/weak": rewards[:, 3].mean(),
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key], value, msg=key)
    # DPO pairs: TRL's definitions
    pairs = epa_ext.preference_metrics(policy[:, :2], ref[:, :2], beta=0.5)
    torch.testing.assert_close(pairs["rewards/accuracies"], (rewards[:, 0] > rewards[:, 1]).float().mean())
    assert "rewards/weak" not in pairs
    # masked strong negatives are left out
    mask = torch.tensor([[True, False, True, True], [True, True, True, True]])
    masked = epa_ext.preference_metrics(policy, ref, beta=0.5, num_strong=2, mask=mask)
    torch.testing.assert_close(masked["rewards/rejected"], torch.tensor([0.0, 0.5, -1.0]).mean())


METRICS_BAD = [  # (policy, ref, mask), error type, pattern
    ((torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(1, 3, dtype=torch.bool)), ValueError,
     r"mask must have the shape of policy_logps \(\[4, 3\]\); got \[1, 3\]"),  # broadcasting reweighted the means
    ((torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 4, dtype=torch.bool)), ValueError,
     r"mask must have the shape of policy_logps"),
    ((torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 3)), TypeError,
     "mask must be a bool tensor; got torch.float32"),
    ((torch.zeros(4, 3), torch.zeros(4, 3, device="meta"), None), ValueError,
     r"ref_logps must be on the device of policy_logps \(cpu\); got meta"),
    ((torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool, device="meta")), ValueError,
     r"mask must be on the device of policy_logps \(cpu\); got meta"),
    ((torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3), None), TypeError,
     "policy_logps must be a floating-point tensor of log-probs; got torch.int64"),
    ((torch.zeros(4, 1), torch.zeros(4, 1), None), ValueError, r"policy_logps must have shape \[B, C\] with C >= 2"),
    ((torch.zeros(4, 3), torch.zeros(4, 2), None), ValueError, "ref_logps must have the shape of policy_logps"),
    (([[0.0, 0.0]], torch.zeros(1, 2), None), TypeError, "policy_logps must be a torch.Tensor; got list"),
]


@pytest.mark.parametrize("inputs,error,pattern", METRICS_BAD, ids=lambda v: str(v)[:40])
def test_preference_metrics_bad_input(inputs, error, pattern):
    """Issue 15: preference_metrics is held to the losses' checks (a [1, C] mask used to broadcast
    and report an accuracy of 2.0)."""
    policy, ref, mask = inputs
    with pytest.raises(error, match=pattern):
        epa_ext.preference_metrics(policy, ref, mask=mask)


BAD_OPTIONS = [  # (options, error type, pattern), for dpo_loss and DPOLoss
    (dict(beta=0.0), ValueError, r"beta must be > 0.0; got 0.0"),
    (dict(beta=-1.0), ValueError, "beta must be > 0.0"),
    (dict(beta=float("inf")), ValueError, "beta must be finite; got inf"),
    (dict(beta=float("nan")), ValueError, "beta must be finite; got nan"),
    (dict(beta="0.1"), TypeError, r"beta must be a real number \(float or int\); got str '0.1'"),
    (dict(beta=True), TypeError, "beta must be a real number .*; got bool"),
    (dict(label_smoothing=0.5), ValueError, r"label_smoothing must be < 0.5; got 0.5"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be >= 0.0; got -0.1"),
    (dict(label_smoothing=float("nan")), ValueError, "label_smoothing must be finite"),
    (dict(loss_type="kto"), ValueError, "loss_type must be one of"),
    (dict(loss_type=None), TypeError, "loss_type must be a string"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(loss_type="hinge", label_smoothing=0.1), ValueError,
     "label_smoothing applies to loss_type 'sigmoid' and 'robust'"),
]


@pytest.mark.parametrize("options,error,pattern", BAD_OPTIONS)
def test_dpo_bad_options(options, error, pattern):
    inputs = [random_logps(3) for _ in range(4)]
    with pytest.raises(error, match=pattern):
        epa_ext.dpo_loss(*inputs, **options)
    if "reduction" not in options:
        with pytest.raises(error, match=pattern):
            epa_ext.DPOLoss(**options)


BAD_EPA_OPTIONS = [  # (options, error type, pattern), for epa_loss and EPALoss
    (dict(beta=float("inf")), ValueError, "beta must be finite; got inf"),
    (dict(beta="0.1"), TypeError, "beta must be a real number"),
    (dict(weak_weight=float("inf")), ValueError, "weak_weight must be finite; got inf"),
    (dict(weak_weight=-1.0), ValueError, r"weak_weight must be >= 0.0; got -1.0"),
    (dict(num_strong=1.5), TypeError, "num_strong must be an int; got float 1.5"),
    (dict(num_strong=2.0), TypeError, "num_strong must be an int; got float 2.0"),
    (dict(num_strong=True), TypeError, "num_strong must be an int; got bool"),
    (dict(num_strong=0), ValueError, r"num_strong must lie in \[1, C - 1\] = \[1, 4\]; got 0"),
]


@pytest.mark.parametrize("options,error,pattern", BAD_EPA_OPTIONS)
def test_epa_bad_options(options, error, pattern):
    policy, ref = random_logps(4, 5), random_logps(4, 5)
    with pytest.raises(error, match=pattern):
        epa_ext.epa_loss(policy, ref, **options)
    with pytest.raises(error, match=pattern.replace(r"lie in \[1, C - 1\] = \[1, 4\]", "be >= 1")):
        epa_ext.EPALoss(**options)(policy, ref)


def test_raw_ops_check_their_options():
    """The C++ checks behind the Python ones: finite beta and weak_weight (CPU kernel and fake)."""
    policy = random_logps(3, 4)
    for device_ in ("cpu", "meta"):
        p = policy.to(device_)
        with pytest.raises(ValueError, match=r"dpo_loss: beta must be a number in \[1.17\d*e-38, 3.40\d*e\+38\] "
                           r"\(float32's normal range, in which the loss is computed\); got inf"):
            torch.ops.epa_ext.dpo_loss(p[:, 0], p[:, 1], p[:, 2], p[:, 3], float("inf"), "sigmoid", 0.0)
        with pytest.raises(ValueError, match="epa_loss: weak_weight must be a finite number >= 0; got inf"):
            torch.ops.epa_ext.epa_loss(p, p, None, 0.1, 1, float("inf"))
        _, lse = torch.ops.epa_ext.epa_loss(p, p, None, 0.1, 1, 1.0)
        with pytest.raises(TypeError, match="epa_loss_backward: grad_losses must be a floating-point tensor"):
            torch.ops.epa_ext.epa_loss_backward(torch.ones(3, dtype=torch.long, device=device_), p, p, None, lse,
                                                0.1, 1, 1.0)
        with pytest.raises(ValueError, match=r"epa_loss_backward: lse must have shape \[B\] = \[3\]"):
            torch.ops.epa_ext.epa_loss_backward(torch.ones(3, device=device_), p, p, None, lse[:2], 0.1, 1, 1.0)


@pytest.mark.parametrize("device_", ["cpu", "meta"])
def test_dpo_bad_tensors(device_):
    good = random_logps(3, device=device_)
    with pytest.raises(ValueError, match=r"ref_rejected must have the shape of policy_chosen \(\[3\]\)"):
        epa_ext.dpo_loss(good, good, good, random_logps(4, device=device_))
    with pytest.raises(ValueError, match="policy_chosen must have shape \\[B\\]"):
        epa_ext.dpo_loss(*[random_logps(3, 2, device=device_) for _ in range(4)])
    with pytest.raises(TypeError, match="ref_chosen must be a floating-point tensor"):
        epa_ext.dpo_loss(good, good, good.long(), good)
    with pytest.raises(TypeError, match="ref_rejected must be a torch.Tensor; got list"):
        epa_ext.dpo_loss(good, good, good, [0.0, 0.0, 0.0])


def test_dpo_devices_must_match():
    cpu, meta = random_logps(3), random_logps(3, device="meta")
    with pytest.raises(ValueError, match=r"ref_chosen must be on the device of policy_chosen \(cpu\); got meta"):
        epa_ext.dpo_loss(cpu, cpu, meta, cpu)
    with pytest.raises(ValueError, match=r"policy_rejected must be on the device of policy_chosen \(meta\); got cpu"):
        epa_ext.dpo_loss(meta, cpu, meta, meta)


@pytest.mark.parametrize("device_", ["cpu", "meta"])
def test_epa_bad_input(device_):
    policy, ref = random_logps(4, 5, device=device_), random_logps(4, 5, device=device_)
    with pytest.raises(ValueError, match=r"num_strong must lie in \[1, C - 1\] = \[1, 4\]; got 5"):
        epa_ext.epa_loss(policy, ref, num_strong=5)
    with pytest.raises(ValueError, match=r"ref_logps must have the shape of policy_logps"):
        epa_ext.epa_loss(policy, ref[:, :4])
    mask = torch.ones(4, 5, dtype=torch.bool, device=device_)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        epa_ext.epa_loss(policy, ref, mask=mask.float())
    with pytest.raises(TypeError, match="mask must be a torch.Tensor; got list"):
        epa_ext.epa_loss(policy, ref, mask=[[True] * 5] * 4)
    with pytest.raises(ValueError, match="beta must be > 0"):
        epa_ext.EPALoss(beta=0)
    with pytest.raises(ValueError, match=r"policy_logps must have shape \[B, C\]"):
        epa_ext.epa_loss(policy[0], ref[0])
    with pytest.raises(ValueError, match=r"policy_logps needs at least 2 candidates"):
        torch.ops.epa_ext.epa_loss(policy[:, :1], ref[:, :1], None, 0.1, 1, 1.0)


def test_epa_mask_must_keep_the_chosen_answer():
    policy, ref = random_logps(4, 5), random_logps(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2, 0] = False
    with pytest.raises(ValueError, match=r"mask\[:, 0\] must be True .* row 2"):
        epa_ext.epa_loss(policy, ref, mask=mask)


def test_epa_devices_must_match():
    policy, ref = random_logps(4, 5), random_logps(4, 5)
    with pytest.raises(ValueError, match="ref_logps must be on the device of policy_logps"):
        epa_ext.epa_loss(policy, ref.to("meta"))
    with pytest.raises(ValueError, match="ref_logps must be on the device of policy_logps"):
        epa_ext.epa_loss(policy.to("meta"), ref)
    with pytest.raises(ValueError, match="mask must be on the device of policy_logps"):
        epa_ext.epa_loss(policy, ref, mask=torch.ones(4, 5, dtype=torch.bool, device="meta"))


# --- second and higher derivatives ---------------------------------------------------------------


def second_derivative(loss_fn, inputs, a0):
    """d2/da2 of loss_fn(a * inputs) + a^2 (a scalar), through create_graph=True."""
    a = torch.tensor(a0, dtype=inputs[0].dtype, requires_grad=True)
    (first,) = torch.autograd.grad(loss_fn(*(a * t for t in inputs)) + a**2, [a], create_graph=True)
    (second,) = torch.autograd.grad(first, [a])
    return second


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_second_derivative_matches_plain_torch(dtype):
    """Used to be 2.0 (the a^2 term alone) where torch gives 2.245: the kernel's slopes were a
    constant to autograd. Also the same tensor passed twice, whose partials must add up once."""
    inputs = [random_logps(9, dtype=dtype, scale=3.0) for _ in range(4)]
    for loss_type in LOSS_TYPES:
        options = dict(beta=0.7, loss_type=loss_type)
        ours = second_derivative(lambda *t: epa_ext.dpo_loss(*t, **options), inputs, 0.8)
        truth = second_derivative(lambda *t: eager.dpo_loss(*t, **options), [t.double() for t in inputs], 0.8)
        assert_close_to_truth(ours, truth, dtype=dtype, what=loss_type)
    twice = second_derivative(lambda p, r: epa_ext.dpo_loss(p, p, r, r * 2), inputs[:2], 0.8)
    twice_truth = second_derivative(lambda p, r: eager.dpo_loss(p, p, r, r * 2), [t.double() for t in inputs[:2]], 0.8)
    assert_close_to_truth(twice, twice_truth, dtype=dtype, what="one tensor passed twice")
    policy, ref = random_logps(5, 4, dtype=dtype, scale=3.0), random_logps(5, 4, dtype=dtype, scale=3.0)
    options = dict(beta=0.5, num_strong=2, weak_weight=0.5)
    ours = second_derivative(lambda p, r: epa_ext.epa_loss(p, r, **options), [policy, ref], 1.2)
    truth = second_derivative(lambda p, r: eager.epa_loss(p, r, **options), [policy.double(), ref.double()], 1.2)
    assert_close_to_truth(ours, truth, dtype=dtype, what="epa")


@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_losses_first_derivative_is_the_same_under_create_graph(dtype):
    """create_graph=True takes the differentiable path; its first derivative is the kernel's, in
    the input's dtype, rounded once."""
    policy, ref = random_logps(6, 5, dtype=dtype), random_logps(6, 5, dtype=dtype)

    def loss_fn(module, p, r):
        return module.epa_loss(p, r, num_strong=2) + module.dpo_loss(p[:, 0], p[:, 1], r[:, 0], r[:, 1])

    p = policy.double().requires_grad_()
    (truth,) = torch.autograd.grad(loss_fn(eager, p, ref.double()), [p])
    for create_graph in (False, True):
        p = policy.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss_fn(epa_ext, p, ref), [p], create_graph=create_graph)
        assert grad.dtype == dtype
        assert_rounded_once(grad, truth, dtype=dtype, what=f"create_graph={create_graph}")


def test_losses_refuse_torch_func_grad():
    policy, ref = random_logps(3, 4), random_logps(3, 4)
    with pytest.raises(NotImplementedError, match="epa_ext.epa_loss does not support torch.func"):
        torch.func.grad(lambda p: epa_ext.epa_loss(p, ref))(policy)
    with pytest.raises(NotImplementedError, match="epa_ext.dpo_loss does not support torch.func"):
        torch.func.hessian(lambda p: epa_ext.dpo_loss(p[:, 0], p[:, 1], ref[:, 0], ref[:, 1]))(policy)


# --- non-finite log-probs ---------------------------------------------------------------------------

NON_FINITE = [float("inf"), float("-inf"), float("nan")]


def values_and_grads(fn, tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out.sum(), leaves)


def assert_same_non_finite_semantics(ours, truth, what):
    (value, grads), (truth_value, truth_grads) = ours, truth
    torch.testing.assert_close(value.double(), truth_value, equal_nan=True, msg=lambda m: f"{what} value: {m}")
    for i, (g, t) in enumerate(zip(grads, truth_grads)):
        torch.testing.assert_close(g.double(), t, equal_nan=True, msg=lambda m: f"{what} grad {i}: {m}")


@pytest.mark.parametrize("bad", NON_FINITE, ids=str)
def test_dpo_non_finite_log_probs_are_plain_torchs_per_pair(bad, device):
    """Each of the four inputs at +-inf or NaN in pair 1: that pair's loss and gradient are plain
    torch's (e.g. +inf for a reference log-prob of +inf), the other pairs are untouched."""
    for loss_type in LOSS_TYPES:
        smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
        options = dict(beta=0.5, loss_type=loss_type, label_smoothing=smoothing, reduction="none")
        for position in range(4):
            inputs = [random_logps(3, dtype=torch.float64, device=device, scale=3.0) for _ in range(4)]
            inputs[position][1] = bad
            ours = values_and_grads(lambda *t: epa_ext.dpo_loss(*t, **options), inputs)
            truth = values_and_grads(lambda *t: eager.dpo_loss(*t, **options), inputs)
            assert_same_non_finite_semantics(ours, truth, f"{loss_type}, input {position} = {bad}")
            assert torch.isfinite(ours[0][[0, 2]]).all()


@pytest.mark.parametrize("bad", NON_FINITE, ids=str)
def test_epa_non_finite_log_probs_are_plain_torchs_per_row(bad, device):
    """policy or reference log-prob at +-inf or NaN in row 1, in the chosen, a strong or a weak
    column: the row's loss and gradient are plain torch's (torch.logsumexp's +inf included: a
    reference log-prob of -inf on a negative gives +inf, not NaN), the other rows untouched."""
    options = dict(beta=0.5, num_strong=1, weak_weight=0.5, reduction="none")
    for which in range(2):
        for column in range(3):
            inputs = [random_logps(3, 3, dtype=torch.float64, device=device, scale=3.0) for _ in range(2)]
            inputs[which][1, column] = bad
            ours = values_and_grads(lambda *t: epa_ext.epa_loss(*t, **options), inputs)
            truth = values_and_grads(lambda *t: eager.epa_loss(*t, **options), inputs)
            assert_same_non_finite_semantics(ours, truth, f"{'policy ref'.split()[which]}[1, {column}] = {bad}")
            assert torch.isfinite(ours[0][[0, 2]]).all()
            assert all(torch.isfinite(g[[0, 2]]).all() for g in ours[1])


# --- per-candidate log-weights (importance weights of weak negatives) -----------------------------


def make_log_weights(batch, candidates, device, *, absent=True, dtype=torch.float32):
    """Finite log-weights of either sign in every column, and (absent) some -inf negatives."""
    weights = torch.randn(batch, candidates, dtype=torch.float64)
    if absent:
        weights[1:, 1:][torch.rand(batch - 1, candidates - 1) < 0.2] = float("-inf")
    return weights.to(dtype).to(device)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", EPA_CASES, ids=str)
@pytest.mark.parametrize("dtype", INPUT_DTYPES + [torch.float64], ids=str)
def test_epa_log_weights_match_reference(case, reduction, dtype, device):
    """Value and the gradients of policy, reference and log-weights (softmax - onehot(0)),
    together with weak_weight and mask."""
    candidates, num_strong, weak_weight, with_mask = case
    mask = make_mask(11, candidates, device) if with_mask else None
    options = dict(beta=0.2, num_strong=num_strong, weak_weight=weak_weight, mask=mask, reduction=reduction)
    inputs = [random_logps(11, candidates, dtype=dtype, device=device) for _ in range(2)]
    inputs.append(make_log_weights(11, candidates, device, dtype=dtype))
    compare(lambda p, r, w: epa_ext.epa_loss(p, r, log_weights=w, **options),
            lambda p, r, w: eager.epa_loss(p, r, log_weights=w, **options), inputs, dtype=dtype,
            what=f"epa log_weights {case}")


def test_epa_log_weights_of_minus_inf_are_a_mask_and_add_to_weak_weight(device):
    policy, ref = random_logps(9, 6, device=device), random_logps(9, 6, device=device)
    mask = make_mask(9, 6, device)
    absent = torch.zeros(9, 6, device=device).masked_fill(~mask, float("-inf"))
    options = dict(beta=0.3, num_strong=2, reduction="none")
    by_mask = values_and_grads(lambda p: epa_ext.epa_loss(p, ref, mask=mask, **options), [policy])
    by_weights = values_and_grads(lambda p: epa_ext.epa_loss(p, ref, log_weights=absent, **options), [policy])
    assert torch.equal(by_mask[0], by_weights[0]) and torch.equal(by_mask[1][0], by_weights[1][0])
    # weak_weight alpha is log(alpha) on the weak columns: given as log-weights, the same loss
    weak_columns = torch.zeros(9, 6, device=device)
    weak_columns[:, 3:] = math.log(0.25)
    torch.testing.assert_close(epa_ext.epa_loss(policy, ref, log_weights=weak_columns, **options),
                               epa_ext.epa_loss(policy, ref, weak_weight=0.25, **options))
    # both given, they add
    torch.testing.assert_close(epa_ext.epa_loss(policy, ref, weak_weight=0.5, log_weights=weak_columns, **options),
                               epa_ext.epa_loss(policy, ref, weak_weight=0.125, **options))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_epa_log_weights_gradcheck(check, device):
    policy, ref, weights = (random_logps(5, 6, dtype=torch.float64, device=device, scale=3.0).requires_grad_()
                            for _ in range(3))
    mask = make_mask(5, 6, device)
    assert check(lambda p, r, w: epa_ext.epa_loss(p, r, beta=0.7, num_strong=2, weak_weight=0.3, mask=mask,
                                                  log_weights=w, reduction="none"), (policy, ref, weights))


def test_epa_log_weights_opcheck_and_compile(device):
    policy, ref = random_logps(7, 5, device=device).requires_grad_(), random_logps(7, 5, device=device)
    weights = make_log_weights(7, 5, device).requires_grad_()
    mask = make_mask(7, 5, device)
    torch.library.opcheck(torch.ops.epa_ext.epa_loss.default, (policy, ref, mask, 0.1, 2, 0.5, weights))
    _, lse = torch.ops.epa_ext.epa_loss(policy.detach(), ref, mask, 0.1, 2, 0.5, weights.detach())
    torch.library.opcheck(torch.ops.epa_ext.epa_loss_backward.default,
                          (torch.rand(7, device=device), policy.detach(), ref, mask, lse, 0.1, 2, 0.5, weights.detach()))

    def loss(p, w):
        return epa_ext.epa_loss(p, ref, beta=0.2, num_strong=2, mask=mask, log_weights=w)

    results = [values_and_grads(fn, [policy.detach(), weights.detach()])
               for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager"))]
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b)


def _log_weights_with(value, row, column, batch=4, candidates=5):
    weights = torch.zeros(batch, candidates)
    weights[row, column] = value
    return weights


BAD_LOG_WEIGHTS = [  # (log_weights, error type, pattern)
    (_log_weights_with(float("nan"), 2, 3), ValueError,
     r"log_weights must be finite, or -inf for an absent negative .*; got nan at \[2, 3\]"),
    (_log_weights_with(float("inf"), 1, 4), ValueError, r"got inf at \[1, 4\]"),
    (_log_weights_with(float("-inf"), 3, 0), ValueError, r"\(column 0, the chosen answer, finite\); got -inf at \[3, 0\]"),
    (torch.zeros(4, 4), ValueError, r"log_weights must have the shape of policy_logps \(\[4, 5\]\); got \[4, 4\]"),
    (torch.zeros(4, 5, dtype=torch.long), TypeError, "log_weights must be a floating-point tensor; got Long"),
    ([[0.0] * 5] * 4, TypeError, "log_weights must be a torch.Tensor; got list"),
]


@pytest.mark.parametrize("log_weights,error,pattern", BAD_LOG_WEIGHTS, ids=[b[2][:40] for b in BAD_LOG_WEIGHTS])
def test_epa_bad_log_weights(log_weights, error, pattern):
    policy, ref = random_logps(4, 5), random_logps(4, 5)
    with pytest.raises(error, match=pattern):
        epa_ext.epa_loss(policy, ref, num_strong=2, log_weights=log_weights)


def test_epa_log_weights_of_masked_candidates_never_matter():
    policy, ref = random_logps(4, 5), random_logps(4, 5)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2, 3] = False
    poisoned = _log_weights_with(float("nan"), 2, 3)
    torch.testing.assert_close(epa_ext.epa_loss(policy, ref, mask=mask, log_weights=poisoned),
                               epa_ext.epa_loss(policy, ref, mask=mask))


def test_epa_log_weights_device_and_meta():
    policy, ref = random_logps(4, 5), random_logps(4, 5)
    with pytest.raises(ValueError, match=r"log_weights must be on the device of policy_logps \(cpu\); got meta"):
        epa_ext.epa_loss(policy, ref, log_weights=torch.zeros(4, 5, device="meta"))
    meta = policy.to("meta")
    with pytest.raises(ValueError, match=r"epa_loss: log_weights must have the shape of policy_logps"):
        torch.ops.epa_ext.epa_loss(meta, meta, None, 0.1, 1, 1.0, torch.zeros(4, 4, device="meta"))
    with pytest.raises(TypeError, match="epa_loss_backward: log_weights must be a floating-point tensor"):
        torch.ops.epa_ext.epa_loss_backward(torch.ones(4, device="meta"), meta, meta, None, torch.ones(4, device="meta"),
                                            0.1, 1, 1.0, torch.zeros(4, 5, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("call,old,new", [
    (lambda t: epa_ext.dpo_loss(t, t, t, t, averaged=True), "averaged", "average"),
    (lambda t: epa_ext.epa_loss(t.view(2, 2), t.view(2, 2), averaged=True), "averaged", "average"),
    (lambda t: epa_ext.DPOLoss()(t, t, t, t, averaged=True), "averaged", "average"),
])
def test_an_old_argument_name_is_refused_naming_the_new_one(call, old, new):
    """One name per concept: length averaging is `average` everywhere (it was `averaged` here)."""
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{old}': it is called '{new}' now"):
        call(torch.zeros(4))
