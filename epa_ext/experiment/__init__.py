"""The known-reward experiment: does EPA learn the true reward with slope 1 where DPO does not?

On real preference data the true reward is unknown; here it is known exactly, so the implicit
reward r_θ(x, y) = β·log(π_θ(y|x) / π_ref(y|x)) that DPO and EPA learn can be compared with it.

- ``config``: every setting (the task, the reference, the methods, the sweeps' grids) as
  dataclasses, and `epa-demo`'s flags built from them.
- ``task``: the synthetic task (prompts and answers over a small alphabet, a hidden reward r*),
  the reference policy (a tiny Llama trained by SFT on a broad answer distribution), sampling,
  and the preference data built from the reference's own samples.
- ``metrics``: what is measured on held-out prompts (true reward and KL of the policy's samples,
  preference accuracy, the slope-1 metrics ρ and ε̂ of epa-spec.md section 7).
- ``pipeline``: settings x seeds trained with ``epa_ext.train`` and evaluated, every piece cached
  (reference, data, runs) so that a rerun reuses what it finished; the results dict.
- ``report`` and ``plots``: the tables (terminal and Markdown, the comparison with DPO) and plots.
- ``sweep``: the convergence, negatives and practical sweeps.
- ``run``: ``epa-demo`` (the default experiment that ``make demo`` runs, or ``--sweep NAME``).
"""
