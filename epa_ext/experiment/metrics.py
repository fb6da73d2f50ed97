"""What the known-reward experiment measures on held-out prompts.

- Slope-1 metrics (epa-spec.md section 7) over candidate sets: for prompt x with candidates y_k,
  implicit rewards r_θ(x, y_k) = β·(log π_θ(y_k|x) − log π_ref(y_k|x)) against the true r*(x, y_k)
  (in the preference model's units, r*/τ):
  Pearson ρ(x) = corr_k(r_θ, r*) and slope-1 error ε̂(x) = Var_k(r_θ − r*), both averaged over
  prompts. ε̂ is 0 exactly when r_θ = r* + C(x) on the candidates: the relation the paper says
  EPA's energy-based objective recovers and DPO's need not. ε̂ splits exactly into a slope part
  (slope − 1)²·Var r* and a residual R ≥ 0 (``slope1_metrics``).
- Preference accuracy: over every pair of candidates of a prompt with different true rewards,
  how often r_θ orders them as r* does.
- The policy's own samples, drawn over its whole vocabulary (L + 1 tokens): their mean true
  reward (a malformed answer, not L letters and ``</s>``, scores as the worst answer), the share
  that is malformed, the mean true reward of the well-formed ones, and KL(π_θ ‖ π_ref) of those
  L + 1 tokens, estimated as the mean of log π_θ(y|x) − log π_ref(y|x) over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .task import KnownRewardTask, answer_logps, sample_answers


def slope1_metrics(implicit: Tensor, true: Tensor) -> dict[str, float]:
    """ρ, ε̂, the fitted slope, ε̂'s two parts and the preference accuracy of implicit rewards
    [n, C] against true rewards [n, C].

    ρ is averaged over the prompts where both rows vary (a constant row has no correlation; the
    count is returned as rho_prompts). Ties in r_θ count as half right.

    The split of ε̂ (keys true_variance V, slope_part, residual R). With both rewards centered per
    prompt, d_θ = r_θ − mean_k r_θ and d* = r* − mean_k r* (each [n, C]), every prompt has C
    candidates, so ε̂ = (1/(nC))·Σ_{x,k} (d_θ − d*)², and the slope is the pooled least-squares
    b = Σ d_θ·d* / Σ d*². Write d_θ − d* = (b − 1)·d* + e with e = d_θ − b·d*. The normal
    equation of b is Σ d*·e = 0, so the cross term of the square sums to 0 and

        ε̂ = (b − 1)²·V + R,   V = (1/(nC))·Σ d*² = mean_x Var_k r*,   R = (1/(nC))·Σ e² ≥ 0,

    exactly: V is the within-prompt variance of r* (1/C, not 1/(C − 1)) over the same
    candidates, averaged over prompts; R is what no common slope explains. The identity needs the
    slope pooled over prompts with the weights ε̂ gives them (equal, C candidates each); a mean of
    per-prompt slopes would leave a cross term. R is computed as its own sum of squares, so it is
    >= 0 and slope_part + residual equals ε̂ to rounding. Where r* is flat on every prompt
    (V = 0) the slope is undefined, the slope part is 0 and R = ε̂.
    """
    implicit, true = implicit.double(), true.double()
    di, dt = implicit - implicit.mean(1, keepdim=True), true - true.mean(1, keepdim=True)
    norms = di.norm(dim=1) * dt.norm(dim=1)
    varies = norms > 1e-12
    rho = (di * dt).sum(1)[varies] / norms[varies]
    slope1_error = (di - dt).pow(2).mean(1)
    # Least-squares slope of r_θ on r* with a free intercept per prompt, pooled over prompts: 1
    # is the paper's slope-1 relation.
    true_spread = dt.pow(2).sum()
    slope = (di * dt).sum() / true_spread if true_spread > 0 else torch.tensor(float("nan"))
    true_variance = dt.pow(2).mean()
    slope_part = (slope - 1) ** 2 * true_variance if true_spread > 0 else torch.zeros((), dtype=torch.float64)
    residual = (di - slope * dt).pow(2).mean() if true_spread > 0 else slope1_error.mean()
    true_gap = true[:, :, None] - true[:, None, :]
    implicit_gap = implicit[:, :, None] - implicit[:, None, :]
    ordered = true_gap > 0  # each pair with different true rewards, once
    agree = (implicit_gap[ordered] > 0).double() + 0.5 * (implicit_gap[ordered] == 0).double()
    return {"rho": float(rho.mean()) if varies.any() else float("nan"), "rho_prompts": int(varies.sum()),
            "slope1_error": float(slope1_error.mean()), "slope": float(slope), "accuracy": float(agree.mean()),
            "true_variance": float(true_variance), "slope_part": float(slope_part), "residual": float(residual)}


def slope1_split(slope1_error: float, slope: float, true_variance: float) -> tuple[float, float]:
    """(slope part, residual) of a stored ε̂ and slope, given V = mean_x Var_k r* on the same
    candidates: (b − 1)²·V and ε̂ − (b − 1)²·V (``slope1_metrics`` derives why the residual is
    the mean square of r_θ − b·r* centered per prompt, so >= 0 up to the stored numbers'
    rounding). For results written before slope1_metrics returned the two parts."""
    if true_variance < 0 or not math.isfinite(true_variance):
        raise ValueError(f"true_variance must be a finite variance >= 0; got {true_variance} (pass the reference's "
                         f"ε̂ or true_variance on the same candidates)")
    if true_variance == 0:
        return 0.0, slope1_error
    slope_part = (slope - 1) ** 2 * true_variance
    return slope_part, slope1_error - slope_part


@dataclass
class EvalSet:
    """Held-out prompts [n, P], candidates [n, C, L] sampled from the reference, their true rewards
    [n, C], and the reference's log-probs of the candidates [n, C]."""

    prompts: Tensor
    candidates: Tensor
    true_rewards: Tensor
    reference_logps: Tensor

    @classmethod
    def build(cls, task: KnownRewardTask, reference, num_prompts: int, num_candidates: int,
              generator: torch.Generator) -> EvalSet:
        prompts = task.sample_prompts(num_prompts, generator)
        flat = sample_answers(reference, task, prompts, num_candidates, generator)
        repeated = prompts.repeat_interleave(num_candidates, 0)
        return cls(prompts, flat.view(num_prompts, num_candidates, -1),
                   task.reward(repeated, flat).view(num_prompts, num_candidates),
                   answer_logps(reference, task, repeated, task.answer_tokens(flat)).view(num_prompts, num_candidates))


def evaluate_policy(policy, reference, task: KnownRewardTask, eval_set: EvalSet, *, beta: float,
                    temperature: float, num_samples: int, generator: torch.Generator) -> tuple[dict, Tensor]:
    """(every metric of the module docstring, the implicit rewards [n, C] of the candidates) for
    one policy. The reference itself may be passed: its implicit rewards are all 0, so its ρ is
    undefined and its ε̂ is Var_k(r*)."""
    n, c = eval_set.true_rewards.shape
    repeated = eval_set.prompts.repeat_interleave(c, 0)
    candidate_tokens = task.answer_tokens(eval_set.candidates.flatten(0, 1))
    policy_logps = answer_logps(policy, task, repeated, candidate_tokens).view(n, c)
    implicit = beta * (policy_logps - eval_set.reference_logps)
    metrics = slope1_metrics(implicit, eval_set.true_rewards / temperature)

    samples = sample_answers(policy, task, eval_set.prompts, num_samples, generator, letters_only=False)
    sample_prompts = eval_set.prompts.repeat_interleave(num_samples, 0)
    log_ratio = answer_logps(policy, task, sample_prompts, samples) - answer_logps(reference, task, sample_prompts,
                                                                                    samples)
    reward, well_formed = task.reward_of_tokens(sample_prompts, samples)
    metrics.update(reward=float(reward.mean()), kl=float(log_ratio.double().mean()),
                   malformed=float(1 - well_formed.double().mean()),
                   reward_well_formed=float(reward[well_formed].mean()) if well_formed.any() else float("nan"))
    return metrics, implicit
