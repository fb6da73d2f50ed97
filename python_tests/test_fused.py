"""fused_dpo_loss / fused_epa_loss: equal to the composition sequence_logps -> loss, in value and
d(logits), with and without the in-place backward."""

from __future__ import annotations

import pytest
import torch

import epa_ext
from epa_ext import IGNORE_INDEX, eager
from numerics import assert_close_to_truth, assert_paths_agree


def make_batch(candidates, prompts, seq_len, vocab, dtype, device, ignore_fraction=0.3):
    rows = candidates * prompts
    logits = (torch.randn(rows, seq_len, vocab, dtype=torch.float64) * 2).to(dtype).to(device)
    labels = torch.randint(0, vocab, (rows, seq_len))
    labels[torch.rand(rows, seq_len) < ignore_fraction] = IGNORE_INDEX
    labels[:, -1] = IGNORE_INDEX
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


def test_fused_epa_with_log_weights(device):
    logits, labels, ref = make_batch(5, 4, 7, 64, torch.float32, device)
    weights = torch.randn(4, 5, device=device)
    weights[2, 4] = float("-inf")
    for inplace in (False, True):
        check_fused(epa_ext.fused_epa_loss, eager.fused_epa_loss, logits, labels, ref, inplace=inplace,
                    num_candidates=5, num_strong=2, weak_weight=0.5, log_weights=weights)


@pytest.mark.parametrize("inplace", [False, True], ids=["new-buffer", "inplace"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_dpo_equals_composition(loss_type, inplace, dtype, device):
    logits, labels, ref = make_batch(2, 4, 11, 97, dtype, device)
    smoothing = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    beta = 0.5 if loss_type == "ipo" else 0.1
    check_fused(epa_ext.fused_dpo_loss, eager.fused_dpo_loss, logits, labels, ref, inplace=inplace,
                beta=beta, loss_type=loss_type, label_smoothing=smoothing)


def test_inplace_backward_writes_the_gradient_into_the_logits(device):
    _, labels, ref = make_batch(4, 2, 5, 33, torch.float32, device)
    hidden = torch.randn(8, 5, 16, device=device, requires_grad=True)
    head = torch.randn(33, 16, device=device) * 0.1
    produced = hidden @ head.T  # a non-leaf, as an lm_head produces
    storage = produced.data_ptr()
    loss, _ = epa_ext.fused_epa_loss(produced, labels, ref, num_candidates=4, inplace_backward=True)
    grads = torch.autograd.grad(loss, [produced], retain_graph=True)[0]
    assert grads.data_ptr() == storage  # no second logits-sized buffer
    assert torch.equal(produced.detach(), grads)
    # the gradient written in place is the one the new-buffer backward returns for the same logits
    fresh = (hidden @ head.T).detach().requires_grad_()
    expected = torch.autograd.grad(epa_ext.fused_epa_loss(fresh, labels, ref, num_candidates=4)[0], [fresh])[0]
    assert_paths_agree(grads, expected, what="d(logits) written in place")
    # The same gradient reaches the hidden states as without the in-place backward.
    h1 = hidden.detach().clone().requires_grad_()
    loss1, _ = epa_ext.fused_epa_loss(h1 @ head.T, labels, ref, num_candidates=4)
    loss1.backward()
    h2 = hidden.detach().clone().requires_grad_()
    loss2, _ = epa_ext.fused_epa_loss(h2 @ head.T, labels, ref, num_candidates=4, inplace_backward=True)
    loss2.backward()
    assert_paths_agree(h2.grad, h1.grad, what="d(hidden) through the in-place backward")


def test_inplace_backward_op_opcheck(device):
    logits, labels, _ = make_batch(2, 2, 3, 17, torch.float32, device)
    logps, lse = torch.ops.epa_ext.token_logps(logits, labels, IGNORE_INDEX)
    torch.library.opcheck(torch.ops.epa_ext.token_logps_backward_.default,
                          (torch.rand(labels.shape, device=device), logits.clone(), labels, lse, logps, IGNORE_INDEX))


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
    assert_paths_agree(results[1][0], results[0][0], what="compiled loss")
    assert_paths_agree(results[1][1], results[0][1], what="compiled d(logits)")


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
    with pytest.raises(TypeError, match="num_strong must be an int; got float"):
        epa_ext.fused_epa_loss(logits, labels, ref, num_candidates=3, num_strong=1.5)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor; got list"):
        epa_ext.fused_epa_loss(logits, labels, ref, num_candidates=3, mask=[[True, False, True]] * 2)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor; got list"):
        epa_ext.fused_dpo_loss(list(logits[:4]), labels[:4], ref[:4])
    with pytest.raises(ValueError, match="ref_logps must be on the device of logits"):
        epa_ext.fused_epa_loss(logits, labels, ref.to("meta"), num_candidates=3)
    with pytest.raises(ValueError, match=r"mask must be on the device of logits \(cpu\); got meta"):
        epa_ext.fused_epa_loss(logits, labels, ref, num_candidates=3,
                               mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(TypeError, match="ignore_index must be an int; got float"):
        epa_ext.fused_epa_loss(logits, labels, ref, num_candidates=3, ignore_index=1.5)
    # the options are checked up front, before the kernels read the logits (here: a bad label)
    out_of_range = labels.masked_fill(labels == IGNORE_INDEX, 99)
    with pytest.raises(TypeError, match=r"beta must be a real number \(float or int\); got str"):
        epa_ext.fused_dpo_loss(logits[:4], out_of_range[:4], ref[:4], beta="0.1")
    with pytest.raises(ValueError, match="weak_weight must be finite; got inf"):
        epa_ext.fused_epa_loss(logits, out_of_range, ref, num_candidates=3, weak_weight=float("inf"))


# --- the reference's form (issue 17) and the SFT term -------------------------------------------


def summed_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return eager.sequence_logps(logits.double(), labels)


def test_ipo_takes_summed_reference_log_probs_as_trl_does(device):
    """TRL 1.16 (dpo_trainer.py, loss_type "ipo"): scores are summed policy minus summed reference
    log-probs, divided by the completion-token count of each sequence."""
    gen = torch.Generator().manual_seed(11)
    prompts, seq_len, vocab = 3, 40, 50
    policy_logits = torch.randn(2 * prompts, seq_len, vocab, generator=gen, dtype=torch.float64)
    ref_logits = policy_logits + 0.3 * torch.randn(policy_logits.shape, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2 * prompts, seq_len), generator=gen)
    labels[:prompts, : seq_len // 2] = IGNORE_INDEX  # chosen answers shorter than the rejected ones
    labels[prompts:, : seq_len // 8] = IGNORE_INDEX
    ref_sums = summed_sequence_logps(ref_logits, labels)  # as sequence_logps / linear_sequence_logps return them
    counts = (labels != IGNORE_INDEX).sum(-1).double()
    scores = (summed_sequence_logps(policy_logits, labels) - ref_sums) / counts
    beta = 0.1
    trl = ((scores[:prompts] - scores[prompts:] - 1 / (2 * beta)) ** 2).mean()

    logits, ref = policy_logits.float().to(device), ref_sums.float().to(device)
    loss, _ = epa_ext.fused_dpo_loss(logits, labels.to(device), ref, loss_type="ipo", beta=beta)
    assert_close_to_truth(loss, trl, dtype=torch.float32, what="IPO with summed ref_logps")
    averaged_ref = (ref_sums / counts).float().to(device)
    loss_avg, _ = epa_ext.fused_dpo_loss(logits, labels.to(device), averaged_ref, loss_type="ipo", beta=beta,
                                         ref_logps_averaged=True)
    assert_close_to_truth(loss_avg, trl, dtype=torch.float32, what="IPO with ref_logps_averaged=True")
    # the old contract (a summed reference taken as if averaged) is far off: the 1704.75 vs 23.19
    old_scores = summed_sequence_logps(policy_logits, labels) / counts - ref_sums
    old = ((old_scores[:prompts] - old_scores[prompts:] - 1 / (2 * beta)) ** 2).mean()
    assert old.item() > 10 * trl.item()


def test_ref_logps_averaged_needs_an_averaging_loss():
    logits, labels, ref = make_batch(2, 2, 4, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="ref_logps_averaged=True says ref_logps are length-averaged"):
        epa_ext.fused_dpo_loss(logits, labels, ref, ref_logps_averaged=True)
    with pytest.raises(ValueError, match="ref_logps_averaged=True"):
        epa_ext.fused_epa_loss(logits, labels, ref, num_candidates=2, ref_logps_averaged=True)


def trl_sft_nll(token_logps: torch.Tensor, labels: torch.Tensor, prompts: int) -> torch.Tensor:
    """TRL 1.16's "sft" loss term: -chosen_per_token_logps[chosen_mask].mean()."""
    chosen_mask = labels[:prompts] != IGNORE_INDEX
    return -token_logps[:prompts][chosen_mask].mean()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("average", [False, True])
def test_sft_weight_adds_the_chosen_answers_nll(reduction, average, device):
    candidates, prompts, sft = 3, 4, 0.7
    logits, labels, ref = make_batch(candidates, prompts, 9, 40, torch.float32, device)
    labels[1] = IGNORE_INDEX  # a chosen answer without tokens
    options = dict(num_candidates=candidates, beta=0.2, reduction=reduction, average=average)
    check_fused(epa_ext.fused_epa_loss, eager.fused_epa_loss, logits, labels, ref, inplace=False,
                sft_weight=sft, **options)
    check_fused(epa_ext.fused_dpo_loss, eager.fused_dpo_loss, logits[: 2 * prompts], labels[: 2 * prompts],
                ref[: 2 * prompts], inplace=True, sft_weight=sft, beta=0.2, reduction=reduction, average=average)
    # the term itself: TRL's definition, added to every prompt's loss
    with_sft, _ = epa_ext.fused_epa_loss(logits, labels, ref, sft_weight=sft, **options)
    without, _ = epa_ext.fused_epa_loss(logits, labels, ref, **options)
    nll = trl_sft_nll(eager.token_logps(logits.double(), labels), labels, prompts)
    per_prompt = {"mean": 1, "sum": prompts, "none": torch.ones(prompts, dtype=torch.float64)}[reduction]
    assert_close_to_truth(with_sft - without, sft * nll * per_prompt, dtype=torch.float32, what="sft term")


@pytest.mark.parametrize("loss", ["dpo", "epa"])
def test_plain_losses_sft_term(loss, device):
    """The plain losses take the chosen answers' token counts; `average` says the log-probs are
    length-averaged, so the term is the same whichever form the loss is taken on."""
    gen = torch.Generator().manual_seed(2)
    prompts, candidates = 6, 3
    counts = torch.randint(0, 30, (prompts,), generator=gen).to(device)
    sums = (-torch.rand(prompts, candidates, generator=gen, dtype=torch.float64) * 40).to(device)
    ref = (-torch.rand(prompts, candidates, generator=gen, dtype=torch.float64) * 40).to(device)
    expected_nll = -sums[:, 0].sum() / counts.sum()
    for averaged in (False, True):
        policy = sums[:, 0] / counts.clamp_min(1) if averaged else sums[:, 0]
        if loss == "dpo":
            def ours(p, **kw):
                return epa_ext.dpo_loss(p, sums[:, 1].float(), ref[:, 0].float(), ref[:, 1].float(), **kw)
        else:
            def ours(p, **kw):
                return epa_ext.epa_loss(torch.cat([p[:, None], sums[:, 1:].float()], 1), ref.float(), **kw)
        x = policy.float().requires_grad_()
        term = ours(x, sft_weight=0.5, chosen_token_counts=counts, average=averaged) - ours(x)
        assert_close_to_truth(term, 0.5 * expected_nll, dtype=torch.float32, what=f"{loss} sft term")
        (grad,) = torch.autograd.grad(term, [x])
        expected_grad = -0.5 * (counts if averaged else torch.ones_like(counts)) / counts.sum()
        assert_close_to_truth(grad, expected_grad, dtype=torch.float32, what=f"{loss} sft gradient")


SFT_BAD = [
    (dict(sft_weight=-0.1), ValueError, "sft_weight must be a finite number >= 0; got -0.1"),
    (dict(sft_weight=float("nan")), ValueError, "sft_weight must be a finite number >= 0; got nan"),
    (dict(sft_weight=float("inf")), ValueError, "sft_weight must be a finite number >= 0; got inf"),
    (dict(sft_weight="0.1"), TypeError, "sft_weight must be a real number; got str"),
    (dict(sft_weight=0.5), ValueError, "chosen_token_counts is required when sft_weight > 0"),
    (dict(sft_weight=0.5, chosen_token_counts=[1, 2]), TypeError, "chosen_token_counts must be a torch.Tensor"),
    (dict(sft_weight=0.5, chosen_token_counts=torch.ones(3)), ValueError,
     r"chosen_token_counts must have shape \[B\] = \[4\]; got \[3\]"),
]


@pytest.mark.parametrize("options,error,pattern", SFT_BAD, ids=lambda v: str(v)[:40])
def test_sft_bad_options(options, error, pattern):
    pairs = [-torch.rand(4) for _ in range(4)]
    with pytest.raises(error, match=pattern):
        epa_ext.dpo_loss(*pairs, **options)
    with pytest.raises(error, match=pattern):
        epa_ext.epa_loss(torch.stack(pairs[:2], 1), torch.stack(pairs[2:], 1), **options)
    if "chosen_token_counts" not in options and options["sft_weight"] != 0.5:
        with pytest.raises(error, match=pattern):
            epa_ext.DPOLoss(**options)
        logits, labels, ref = make_batch(2, 2, 4, 10, torch.float32, "cpu")
        with pytest.raises(error, match=pattern):
            epa_ext.fused_dpo_loss(logits, labels, ref, **options)
