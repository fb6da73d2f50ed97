"""The known-reward experiment: does EPA learn the true reward with slope 1 where DPO does not?

On real preference data the true reward is unknown; here it is known exactly, so the implicit
reward r_θ(x, y) = β·log(π_θ(y|x) / π_ref(y|x)) that DPO and EPA learn can be compared with it.

- ``task``: the synthetic task (prompts and answers over a small alphabet, a hidden reward r*),
  the reference policy (a tiny Llama trained by SFT on a broad answer distribution), sampling,
  and the preference data built from the reference's own samples.
- ``metrics``: what is measured on held-out prompts (true reward and KL of the policy's samples,
  preference accuracy, the slope-1 metrics ρ and ε̂ of epa-spec.md section 7).
- ``run``: DPO and EPA variants trained with ``epa_ext.train`` over several seeds; the table, the
  results JSON and the plots. ``epa-demo`` and ``make demo`` run it.
"""
