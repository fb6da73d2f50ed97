"""TRL 1.16's DPOTrainer losses on per-sequence log-probs, framework-free: every ``loss_type`` it
trains, their mixtures (``loss_weights``), the f-divergence scores, ``label_smoothing`` where TRL
reads it, LD-DPO's per-token weights and WPO's per-pair weights.

Everything here is a function of tensors a fused kernel (or a chunked pass) can give without the
batch's [rows, T, V] logits: per-sequence log-probs of policy and reference ([B] each, B pairs),
completion token counts, and for WPO / LD-DPO per-token sums or weights. The numbers are those of
``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py, 1.16), term by term:

    chosen_logratios   = policy_chosen - ref_chosen          (likewise rejected)       [B]
    chosen_scores      = f'(exp(chosen_logratios))  (f_divergence_scores; reverse KL: the log-ratio)
    delta              = chosen_scores - rejected_scores                               [B]
    loss               = sum_k loss_weights[k] * mean_b per_sequence_loss_k[b] (* wpo_weights[b])

What TRL 1.16 does *not* have, so neither does this module: a running reward mean for ``bco_pair``
(older TRL versions shifted its rewards by one; 1.16's bco_pair is stateless and its checkpoints
hold no such state), label smoothing for ``sigmoid`` (cDPO; 1.16 ignores ``label_smoothing`` there),
and metrics that depend on the loss type (every metric it logs is the same for all types).

Imports: torch, the standard library and epa_ext.causal_lm (itself torch only), so that a trainer
of any framework can use it.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..causal_lm import logit_chunks

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The types TRL 1.16 allows with an f-divergence other than reverse KL: those whose loss reads only
# the chosen-minus-rejected score difference, where f-DPO's beta * log Z(x) term cancels.
F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop",
                                     "sft"})
# The types that take per-sequence completion token counts (TRL divides their scores by them).
TOKEN_COUNT_LOSS_TYPES = frozenset({"ipo", "sigmoid_norm"})
# The types that read label_smoothing in TRL 1.16; every other type ignores it there.
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"robust", "exo_pair", "aot", "aot_unpaired"})
# Sorting types: they pair the batch's i-th smallest chosen quantity with its i-th smallest rejected one,
# so a per-pair weight (WPO) has no pair to belong to.
SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
# alpha_divergence's exponent is clamped (in fp32) below this before exp, per the scores' dtype, so
# that exp stays finite once cast back (TRL 1.16's table; float64 added, as for float32).
_ALPHA_EXPONENT_MAX = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 80.0}


class UnsupportedCombinationError(ValueError, NotImplementedError):
    """An option combination TRL 1.16 refuses with NotImplementedError (WPO with a sorting loss):
    a ValueError here, as every bad configuration is, and still caught by code written for TRL."""


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class PairwiseSpec:
    """TRL 1.16 DPOConfig's loss fields (same names, defaults and meaning; ``loss_types`` is its
    ``loss_type``). A str loss_types is one type, as DPOConfig takes it. Checked on construction
    (``validate``): a spec that exists is one TRL trains.

    loss_weights: one weight per entry of loss_types (None: 1.0 each); a type may repeat, as in TRL.
    ld_alpha: LD-DPO's alpha (None: plain sums); it changes the inputs (``ld_token_weights``), not
        the loss formulas, so pairwise_loss only carries it for the caller.
    use_weighting: WPO; pairwise_loss then needs ``wpo_weights``.
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: float | None = None
    use_weighting: bool = False
    discopop_tau: float = 0.05

    def __post_init__(self):
        loss_types = self.loss_types
        if isinstance(loss_types, str):
            loss_types = (loss_types,)
        elif isinstance(loss_types, (list, tuple)):
            loss_types = tuple(loss_types)
        else:
            raise TypeError(f"loss_types must be a loss type name or a list of them; got {type(loss_types).__name__}")
        object.__setattr__(self, "loss_types", loss_types)
        if isinstance(self.loss_weights, (list, tuple)):
            object.__setattr__(self, "loss_weights", tuple(self.loss_weights))
        self.validate()

    @property
    def weights(self) -> tuple[float, ...]:
        """loss_weights, or 1.0 per loss type when None."""
        return tuple(float(w) for w in self.loss_weights) if self.loss_weights is not None \
            else (1.0,) * len(self.loss_types)

    def validate(self) -> None:
        """TypeError for a field of the wrong type, ValueError for a value or combination TRL 1.16
        refuses (UnsupportedCombinationError where it raises NotImplementedError); a UserWarning
        where TRL only warns (robust with label_smoothing outside [0, 0.5))."""
        if not self.loss_types:
            raise ValueError(f"loss_types must name at least one loss type, among {list(LOSS_TYPES)}")
        for loss_type in self.loss_types:
            if not isinstance(loss_type, str):
                raise TypeError(f"loss_types must hold loss type names (str); got {loss_type!r}")
            if loss_type not in LOSS_TYPES:
                raise ValueError(f"Unknown loss type in loss_types: {loss_type!r}. Should be one of {list(LOSS_TYPES)}")
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, tuple) or not all(_is_real(w) for w in self.loss_weights):
                raise TypeError(f"loss_weights must be a list of numbers (or None for 1.0 each); got "
                                f"{self.loss_weights!r}")
            if len(self.loss_weights) != len(self.loss_types):
                raise ValueError(f"`loss_weights` must have the same length as `loss_type` when combining multiple "
                                 f"losses. Got {len(self.loss_weights)} weights for {len(self.loss_types)} loss "
                                 f"types; give one weight per entry of loss_types")
        for name in ("beta", "label_smoothing", "f_alpha_divergence_coef", "discopop_tau"):
            if not _is_real(getattr(self, name)):
                raise TypeError(f"{name} must be a number; got {getattr(self, name)!r}")
        if self.ld_alpha is not None and not _is_real(self.ld_alpha):
            raise TypeError(f"ld_alpha must be a number (LD-DPO's alpha) or None; got {self.ld_alpha!r}")
        if not isinstance(self.use_weighting, bool):
            raise TypeError(f"use_weighting must be True or False; got {self.use_weighting!r}")
        if not isinstance(self.f_divergence_type, str) or self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(f"Unknown f_divergence_type: {self.f_divergence_type!r}. Should be one of "
                             f"{list(F_DIVERGENCE_TYPES)}")
        if self.f_divergence_type != "reverse_kl" and not set(self.loss_types) <= F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(f"`f_divergence_type='{self.f_divergence_type}'` is only supported for the following "
                             f"loss types: {sorted(F_DIVERGENCE_LOSS_TYPES)}. You provided {list(self.loss_types)}. "
                             "Use the default `f_divergence_type='reverse_kl'` with these losses.")
        if self.use_weighting and SORTING_LOSS_TYPES & set(self.loss_types):
            raise UnsupportedCombinationError(
                "use_weighting (WPO) is not implemented for 'aot' or 'aot_unpaired': those losses sort the batch, "
                "so a pair's weight would multiply another pair's loss term; set use_weighting=False or choose "
                "another loss type")
        if self.use_weighting and "sft" in self.loss_types:
            # TRL 1.16 multiplies its sft term (one scalar expanded over the batch) in place by the weights,
            # which PyTorch refuses, so it trains no such configuration and there is no number to match.
            raise ValueError("use_weighting (WPO) with the 'sft' loss type fails inside TRL 1.16's DPOTrainer "
                             "(in-place product on its expanded sft term); remove 'sft' from loss_types or set "
                             "use_weighting=False")
        if "exo_pair" in self.loss_types and self.label_smoothing == 0.0:
            raise ValueError("Label smoothing must be greater than 0.0 when using 'exo_pair' loss (label_smoothing is "
                             "EXO's epsilon). The EXO paper recommends a value of 1e-3.")
        if "robust" in self.loss_types and not 0.0 <= self.label_smoothing < 0.5:
            warnings.warn(f"The `label_smoothing` parameter should lie in [0.0, 0.5) for the 'robust' loss. You "
                          f"provided {self.label_smoothing}.", UserWarning, stacklevel=4)


def f_divergence_scores(logratios: Tensor, f_divergence_type: str, f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """[B] -> [B]: f'(t) at t = exp(logratios) = pi/pi_ref, the score f-DPO compares between the
    chosen and the rejected answer (reverse KL: log t itself).

        forward_kl        1 - 1/t                        = 1 - exp(-logratios)
        js_divergence     log(2t / (t + 1))              = log 2 + logsigmoid(logratios)
        alpha_divergence  (t^(a-1) - 1) / (a - 1)        exponent (a-1)*logratios clamped above in fp32
                          (80, or 11 for fp16, so exp stays finite in the input's dtype); a within
                          1e-6 of 1 is the limit log t.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(f_alpha_divergence_coef - 1.0) < 1e-6:
            return logratios
        exponent = ((f_alpha_divergence_coef - 1.0) * logratios).float()
        exponent = exponent.clamp(max=_ALPHA_EXPONENT_MAX[logratios.dtype])
        return (torch.exp(exponent) - 1.0).to(logratios.dtype) * (1.0 / (f_alpha_divergence_coef - 1.0))
    raise ValueError(f"Unknown f_divergence_type: {f_divergence_type!r}. Should be one of {list(F_DIVERGENCE_TYPES)}")


@dataclass
class _PairTerms:
    """What the loss formulas read, all [B]: log-probs as given, log-ratios, f-divergence scores."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_logratios: Tensor
    rejected_logratios: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    chosen_tokens: Tensor | None
    rejected_tokens: Tensor | None
    sft_loss: Tensor | None


def _smoothed_logistic(margin: Tensor, smoothing: float) -> Tensor:
    """-(1 - s) logsigmoid(m) - s logsigmoid(-m): the logistic loss with labels flipped w.p. s."""
    return -F.logsigmoid(margin) * (1 - smoothing) - F.logsigmoid(-margin) * smoothing


def _length_normalized_delta(terms: _PairTerms) -> Tensor:
    """Each score divided by its completion's token count (at least 1), chosen minus rejected."""
    return terms.chosen_scores / terms.chosen_tokens.clamp(min=1.0) \
        - terms.rejected_scores / terms.rejected_tokens.clamp(min=1.0)


def _sigmoid(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    return -F.logsigmoid(spec.beta * (t.chosen_scores - t.rejected_scores))


def _hinge(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    return torch.relu(1 - spec.beta * (t.chosen_scores - t.rejected_scores))


def _ipo(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    # IPO's squared loss on per-token (length-normalized) score differences; beta is IPO's tau.
    return (_length_normalized_delta(t) - 1 / (2 * spec.beta)) ** 2


def _exo_pair(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    # KL(q || p) over {chosen, rejected}: q = (sigmoid(m), sigmoid(-m)) the model's, p = (1 - eps, eps).
    margin = spec.beta * (t.chosen_scores - t.rejected_scores)
    epsilon = torch.tensor(spec.label_smoothing, device=margin.device)
    return torch.sigmoid(margin) * (F.logsigmoid(margin) - torch.log1p(-epsilon)) \
        + torch.sigmoid(-margin) * (F.logsigmoid(-margin) - torch.log(epsilon))


def _nca_pair(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    chosen_rewards, rejected_rewards = spec.beta * t.chosen_logratios, spec.beta * t.rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def _robust(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    # Unbiased under labels flipped with probability s = label_smoothing.
    margin, s = spec.beta * (t.chosen_scores - t.rejected_scores), spec.label_smoothing
    return (-(1 - s) * F.logsigmoid(margin) + s * F.logsigmoid(-margin)) / (1 - 2 * s)


def _bco_pair(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    # Each answer classified on its own reward (no running mean in TRL 1.16).
    return -F.logsigmoid(spec.beta * t.chosen_logratios) - F.logsigmoid(-spec.beta * t.rejected_logratios)


def _sppo_hard(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    # SPPO with hard win probabilities: chosen log-ratio pulled to 1/(2 beta), rejected to -1/(2 beta).
    return (t.chosen_logratios - 0.5 / spec.beta) ** 2 + (t.rejected_logratios + 0.5 / spec.beta) ** 2


def _aot(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    # Optimal transport between the batch's sorted policy and sorted reference chosen-minus-rejected gaps.
    policy_gaps, _ = torch.sort(t.policy_chosen - t.policy_rejected, dim=0)
    ref_gaps, _ = torch.sort(t.ref_chosen - t.ref_rejected, dim=0)
    return _smoothed_logistic(spec.beta * (policy_gaps - ref_gaps), spec.label_smoothing)


def _aot_unpaired(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    # As aot, between the sorted chosen log-ratios and the sorted rejected ones.
    chosen_sorted, _ = torch.sort(t.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(t.rejected_logratios, dim=0)
    return _smoothed_logistic(spec.beta * (chosen_sorted - rejected_sorted), spec.label_smoothing)


def _apo_zero(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    return 1 - torch.sigmoid(spec.beta * t.chosen_logratios) + torch.sigmoid(spec.beta * t.rejected_logratios)


def _apo_down(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    return torch.sigmoid(spec.beta * t.chosen_logratios) \
        + (1 - torch.sigmoid(spec.beta * (t.chosen_logratios - t.rejected_logratios)))


def _discopop(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    # Logistic and exponential losses blended by sigmoid(margin / tau).
    margin = spec.beta * (t.chosen_scores - t.rejected_scores)
    blend = torch.sigmoid(margin / spec.discopop_tau)
    return -F.logsigmoid(margin) * (1 - blend) + torch.exp(-margin) * blend


def _sft(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    # One batch-level number (token mean), spread over the batch so its mean is itself.
    return t.sft_loss.expand(t.policy_chosen.shape[0])


def _sigmoid_norm(spec: PairwiseSpec, t: _PairTerms) -> Tensor:
    return -F.logsigmoid(spec.beta * _length_normalized_delta(t))


_PER_SEQUENCE_LOSS: dict[str, Callable[[PairwiseSpec, _PairTerms], Tensor]] = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop, "sft": _sft, "sigmoid_norm": _sigmoid_norm,
}
assert tuple(_PER_SEQUENCE_LOSS) == LOSS_TYPES


def _check_sequences(batch: int, **tensors: Tensor | None) -> None:
    """Each given tensor is [batch]: a ValueError naming it otherwise (TypeError if not a tensor)."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B]; got {type(tensor).__name__}")
        if tensor.shape != (batch,):
            raise ValueError(f"{name} must have shape [B] = [{batch}] (one value per pair, as policy_chosen); got "
                             f"{tuple(tensor.shape)}")


def pairwise_loss(spec: PairwiseSpec, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                  ref_rejected: Tensor, *, chosen_tokens: Tensor | None = None, rejected_tokens: Tensor | None = None,
                  chosen_nll: Tensor | None = None, chosen_nll_tokens: Tensor | None = None,
                  wpo_weights: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(loss, per-sequence losses): TRL 1.16 DPOTrainer's loss for ``spec`` on one batch of B pairs.

    policy_chosen, policy_rejected, ref_chosen, ref_rejected: [B] sequence log-probs of the
        completions, summed over their tokens, or with ``spec.ld_alpha`` the LD-DPO sums
        sum_t ld_token_weights * log p_t (for policy and reference alike, as TRL computes both).
    chosen_tokens, rejected_tokens: [B] completion token counts, needed by 'ipo' and 'sigmoid_norm'
        (TRL counts the unshifted completion_mask: completion_mask.sum(1)); clamped at 1.
    chosen_nll, chosen_nll_tokens: [B] sum of -log p over each chosen completion's scored tokens
        (plain sums, never LD-weighted) and their count (the shifted mask), needed by 'sft', whose
        loss is the batch's token mean sum_b chosen_nll / sum_b chosen_nll_tokens.
    wpo_weights: [B] WPO's per-pair weight, needed iff spec.use_weighting:
        wpo_sequence_weights(chosen ...) * wpo_sequence_weights(rejected ...), without grad.

    Returns loss = sum_k w_k * mean_b(loss_k[b] * wpo_weights[b]), a scalar, and the per-sequence
    losses loss_k[b] (* wpo_weights[b]), [B] each, one per entry of spec.loss_types in its order (a
    tuple, not a dict: TRL lets a type repeat).
    """
    if not isinstance(spec, PairwiseSpec):
        raise TypeError(f"spec must be a PairwiseSpec; got {type(spec).__name__}")
    if not isinstance(policy_chosen, Tensor) or policy_chosen.dim() != 1:
        raise ValueError(f"policy_chosen must be a 1-D tensor [B] of sequence log-probs; got "
                         f"{getattr(policy_chosen, 'shape', type(policy_chosen).__name__)}")
    batch = policy_chosen.shape[0]
    _check_sequences(batch, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                     chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens, chosen_nll=chosen_nll,
                     chosen_nll_tokens=chosen_nll_tokens, wpo_weights=wpo_weights)
    loss_types = set(spec.loss_types)
    if loss_types & TOKEN_COUNT_LOSS_TYPES and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"loss types {sorted(loss_types & TOKEN_COUNT_LOSS_TYPES)} divide by completion lengths: "
                         "pass chosen_tokens and rejected_tokens (completion_mask.sum(1) of each half)")
    if "sft" in loss_types and (chosen_nll is None or chosen_nll_tokens is None):
        raise ValueError("the 'sft' loss type needs chosen_nll (sum of -log p over each chosen completion) and "
                         "chosen_nll_tokens (their token counts)")
    if spec.use_weighting != (wpo_weights is not None):
        raise ValueError("wpo_weights must be given exactly when spec.use_weighting is True (WPO); got "
                         f"use_weighting={spec.use_weighting} and wpo_weights "
                         f"{'given' if wpo_weights is not None else 'None'}")

    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    terms = _PairTerms(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
        chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
        chosen_scores=f_divergence_scores(chosen_logratios, spec.f_divergence_type, spec.f_alpha_divergence_coef),
        rejected_scores=f_divergence_scores(rejected_logratios, spec.f_divergence_type, spec.f_alpha_divergence_coef),
        chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
        sft_loss=chosen_nll.sum() / chosen_nll_tokens.sum() if "sft" in loss_types else None)

    per_sequence = []
    loss = None
    for loss_type, weight in zip(spec.loss_types, spec.weights):
        losses = _PER_SEQUENCE_LOSS[loss_type](spec, terms)
        if wpo_weights is not None:
            losses = losses * wpo_weights
        per_sequence.append(losses)
        term = losses.mean() * weight
        loss = term if loss is None else loss + term
    return loss, tuple(per_sequence)


def ld_token_weights(chosen_mask: Tensor, rejected_mask: Tensor, ld_alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO's per-token weights: (chosen [B, L], rejected [B, L']), float, without grad.

    chosen_mask, rejected_mask: which positions hold a scored completion token (TRL: the shifted
    completion_mask, [..., 1:]), for the same B pairs. A pair's shared length is
    min(chosen tokens, rejected tokens); a completion's first shared-length tokens weigh 1, the
    rest (its verbose tail) ld_alpha, non-completion positions 0. The LD-DPO log-prob is then
    sum_t weight_t * log p_t, for policy and reference alike.
    """
    if not _is_real(ld_alpha):
        raise TypeError(f"ld_alpha must be a number; got {ld_alpha!r}")
    if chosen_mask.dim() != 2 or rejected_mask.dim() != 2 or chosen_mask.shape[0] != rejected_mask.shape[0]:
        raise ValueError(f"chosen_mask and rejected_mask must be [B, L] masks of the same B pairs; got "
                         f"{tuple(chosen_mask.shape)} and {tuple(rejected_mask.shape)}")
    chosen_mask, rejected_mask = chosen_mask.detach().long(), rejected_mask.detach().long()
    shared = torch.minimum(chosen_mask.sum(1), rejected_mask.sum(1)).unsqueeze(1)

    def weights(mask: Tensor) -> Tensor:
        in_shared_part = mask.cumsum(1) <= shared
        return mask * torch.where(in_shared_part, 1.0, float(ld_alpha))

    return weights(chosen_mask), weights(rejected_mask)


@torch.no_grad()
def wpo_sequence_weights(logp_sums: Tensor, log_sum_sq_sums: Tensor, scored_tokens: Tensor) -> Tensor:
    """[N] WPO weight of each sequence: exp of the mean over its completion tokens of
    log p(y_t) - log sum_v p_v^2 (the token's log-prob under the policy, aligned by the
    distribution's self-probability), without grad.

    logp_sums: [N] sum over the completion of the policy's token log-probs (plain sums, not LD).
    log_sum_sq_sums: [N] sum over the same tokens of log sum_v p_v^2 (``log_sum_squared_probs``).
    scored_tokens: [N] their count (TRL: the shifted completion_mask), clamped at 1.
    A pair's weight is the product of its chosen and its rejected sequence's weights.
    """
    return torch.exp((logp_sums.detach() - log_sum_sq_sums.detach()) / scored_tokens.clamp(min=1))


@torch.no_grad()
def log_sum_squared_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None = None,
                          softcap: float | None = None) -> Tensor:
    """[N] fp32 per row of hidden [N, H]: log sum_v softmax(z)_v^2 = logsumexp(2z) - 2 logsumexp(z)
    for the logits z = hidden @ weight.T (+ bias), softcapped; without grad, in chunks of
    ``logit_chunks`` (never all [N, V] logits at once). hidden, weight, bias, softcap as
    causal_lm.head_inputs gives them (the model's logit scales folded in)."""
    hidden = hidden.detach()
    bias = None if bias is None else bias.detach()
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start, logits in logit_chunks(hidden, weight.detach(), bias, softcap):
        out[start:start + logits.shape[0]] = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
    return out
