"""The results as text: a fixed-width table for the terminal, Markdown tables for README, and the
comparison of every setting with DPO. All read results.json's content (``pipeline.collect``)."""

from __future__ import annotations

import math

# (metric, column title, decimals of the mean, decimals of the std)
COLUMNS = (("reward", "true reward", 3, 3), ("reward_well_formed", "r* well-formed", 3, 2),
           ("malformed", "malformed", 3, 3), ("kl", "KL", 2, 2), ("accuracy", "pref. acc.", 3, 3),
           ("rho", "ρ ↑", 3, 3), ("slope1_error", "ε̂ ↓", 3, 3), ("slope", "slope", 2, 2))
# The sweeps' tables (sweep.py) add ε̂'s two parts after it (metrics.slope1_metrics: ε̂ = (slope − 1)²·Var r* + R).
_AFTER_EPS_HAT = [metric for metric, _, _, _ in COLUMNS].index("slope1_error") + 1
SWEEP_COLUMNS = COLUMNS[:_AFTER_EPS_HAT] + (("slope_part", "ε̂ slope part", 3, 3), ("residual", "ε̂ residual", 3, 3)) \
    + COLUMNS[_AFTER_EPS_HAT:]
# Which way is better, for the comparison with DPO (a lower KL at the same reward is better; the
# slope is judged through ε̂, which is 0 only at slope 1).
HIGHER_IS_BETTER = {"reward": True, "reward_well_formed": True, "malformed": False, "kl": False, "accuracy": True,
                    "rho": True, "slope1_error": False}


def _mean_std(mean_std: list[float], decimals: int, std_decimals: int, percent: bool = False) -> str:
    mean, std = mean_std
    if not math.isfinite(mean):
        return "–"
    if percent:
        return f"{100 * mean:.1f} ± {100 * std:.1f} %"
    return f"{mean:.{decimals}f} ± {std:.{std_decimals}f}"


def format_table(results: dict, columns=COLUMNS) -> str:
    """Fixed-width: one row per setting (mean ± std over seeds), the reference and the target π*."""
    seeds = len(results["config"]["seeds"])
    width = max(len("optimum π*"), *(len(s["label"]) for s in results["settings"].values())) + 2
    header = f"{'setting':<{width}}" + "".join(f"{title:>17}" for _, title, _, _ in columns)
    lines = [f"held-out prompts: {results['config']['eval_prompts']}, mean ± std over {seeds} seed(s); "
             f"β = {results['config']['beta']}", header, "-" * len(header)]
    ref, opt = results["reference"], results["optimum"]
    fixed = {"reference": {"reward": ref["reward"], "reward_well_formed": ref["reward_well_formed"],
                           "malformed": ref["malformed"], "kl": 0.0, "slope1_error": ref["slope1_error"]},
             "optimum π*": {"reward": opt["reward"], "reward_well_formed": opt["reward"], "malformed": 0.0,
                            "kl": opt["kl"], "rho": 1.0, "slope1_error": 0.0, "slope": 1.0}}
    lines.append(f"{'reference':<{width}}" + "".join(
        f"{fixed['reference'][m]:>17.3f}" if m in fixed["reference"] else f"{'–':>17}" for m, _, _, _ in columns))
    for name, setting in results["settings"].items():
        cells = "".join(f"{_mean_std(results['summary'][name][m], d, sd):>17}" for m, _, d, sd in columns)
        lines.append(f"{setting['label']:<{width}}{cells}")
    lines.append(f"{'optimum π*':<{width}}" + "".join(
        f"{fixed['optimum π*'][m]:>17.3f}" if m in fixed["optimum π*"] else f"{'':>17}" for m, _, _, _ in columns))
    lines.append("optimum π* ∝ π_base·exp(r*/β): the policy every method aims at (exact, from the base "
                 "distribution the reference imitates). Malformed answers score as the worst answer.")
    return "\n".join(lines)


def markdown_table(results: dict, columns=COLUMNS, leading: tuple = ()) -> str:
    """A Markdown table of every setting (mean ± std over seeds; malformed in %; "–" for a metric
    the summary lacks). leading: extra first columns as (title, function of the setting's entry in
    results['settings'])."""
    titles = ["setting", *(title for title, _ in leading), *(title for _, title, _, _ in columns)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    missing = [math.nan, math.nan]
    for name, setting in results["settings"].items():
        cells = [setting["label"], *(str(value(setting)) for _, value in leading)]
        cells += [_mean_std(results["summary"][name].get(m, missing), d, sd, percent=m == "malformed")
                  for m, _, d, sd in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare_with_dpo(results: dict) -> list[str]:
    """One line per other setting: its difference from DPO in each metric, and whether that
    exceeds the seeds' spread (|difference| > the two standard deviations added)."""
    summary = results["summary"]
    if "dpo" not in summary:
        return []
    lines = []
    for name, setting in results["settings"].items():
        if name == "dpo":
            continue
        parts = []
        for metric, higher in HIGHER_IS_BETTER.items():
            (m, s), (d, ds) = summary[name][metric], summary["dpo"][metric]
            if not (math.isfinite(m) and math.isfinite(d)):
                continue
            if abs(m - d) < 5e-4:  # below the printed precision
                parts.append(f"{metric} {m:.3f} vs {d:.3f} (equal)")
                continue
            verdict = "better" if (m > d) == higher else "worse"
            spread = "" if abs(m - d) > s + ds else ", within the seeds' spread"
            parts.append(f"{metric} {m:.3f} vs {d:.3f} ({verdict}{spread})")
        lines.append(f"{setting['label']} vs DPO: " + "; ".join(parts))
    return lines


# --- the ipm sweep's predictions (docs/known_reward/sweeps/README.md, "ipm sweep (issue 36): plan") ---------------

# The design note ../shared/docs/weak-negatives.md, section "Model B, 'IPM'": population minimisers
# of EPA K = 3 with exactly corrected weak negatives (slope, ε) by M. M = 0 is r* + C(x) (slope 1,
# ε 0; the same section's first point). M = 256's slope is 1.01 there (1.00 is M = 1024's).
IPM_POPULATION_K3_EXACT = {0: (1.0, 0.0), 1: (1.04, 0.005), 4: (1.09, 0.034), 16: (1.11, 0.050), 64: (1.04, 0.006),
                           256: (1.01, 0.0003)}


def population_eps_hat(eps: float, eval_candidates: int) -> float:
    """The ε̂ on C held-out candidates that a population ε gives: the note's ε is the variance of
    r − r* under μ (its notation paragraph: "eps-hat on 8 candidates is 7/8 of it"), ε̂ the
    within-prompt variance with 1/C over C candidates drawn from μ, whose mean is (C − 1)/C of it."""
    return eps * (eval_candidates - 1) / eval_candidates


# The plan's prediction rows: (plan row, what the plan expects here, [(setting name, population
# (slope, ε) or None, the note's finite-data ε or None)]). The finite-data ε are the note's
# ("Model B", 15 prompt sets x 256 examples, 12 seeds), another data size than this sweep's.
IPM_PREDICTIONS = (
    ("DPO, EPA K = 1 M = 0", "slope near 1 (if trained to convergence); ε̂ above K = 3's",
     [("dpo", (1.0, 0.0), 0.111)]),
    ("EPA K = 3 M = 0", "the M = 0 baseline; lower ε̂ than DPO", [("epa_k3_m0", (1.0, 0.0), 0.070)]),
    ("K = 3, exact q", "a hump: ε̂ above M = 0 at M = 4-16, below it from M = 64 on, lowest at M = 256",
     [(f"epa_k3_m{m}_exact", IPM_POPULATION_K3_EXACT[m], finite)
      for m, finite in ((1, 0.073), (4, 0.097), (16, 0.112), (64, 0.055), (256, 0.045))]),
    ("K = 1, exact q, M = 256", "well below DPO", [("epa_k1_m256_exact", None, 0.045)]),
    ("K = 3, uncorrected", "ε̂ and slope rising with M (population: r* + log μ − log(K μ + M q)), worst at M = 256",
     [(f"epa_k3_m{m}_none", None, finite) for m, finite in ((1, 0.076), (4, 0.146), (16, 0.329), (64, 0.500),
                                                            (256, None))]),
    ("estimated q", "between uncorrected and exact q (as in the weak-correction sweep)",
     [(f"epa_k3_m{m}_estimated", None, None) for m in (1, 4, 16, 64, 256)]),
)


def ipm_predictions_markdown(results: dict) -> str:
    """The ipm sweep's predicted against measured: one row per setting of each plan row, with the
    design note's population slope and ε (and the ε̂ that ε gives on the held-out candidates),
    its finite-data ε, and the measured slope, ε̂ and residual R (mean ± std over seeds; "not run"
    for a setting the results lack)."""
    candidates = results["config"]["eval_candidates"]
    titles = ["plan row", "setting", "population slope, ε (note)", f"population ε̂ = {candidates - 1}/{candidates}·ε",
              "finite-data ε (note)", "measured slope", "measured ε̂", "measured ε̂ residual", "expected here"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    summary, settings = results["summary"], results["settings"]
    missing = [math.nan, math.nan]
    for plan_row, expected, rows in IPM_PREDICTIONS:
        for index, (name, population, finite) in enumerate(rows):
            if name in summary:
                measured = [_mean_std(summary[name].get(metric, missing), d, sd)
                            for metric, d, sd in (("slope", 2, 2), ("slope1_error", 3, 3), ("residual", 3, 3))]
            else:
                measured = ["not run"] * 3
            cells = [plan_row if index == 0 else "", settings[name]["label"] if name in settings else name,
                     f"{population[0]:.2f}, {population[1]:g}" if population else "–",
                     f"{population_eps_hat(population[1], candidates):.4g}" if population else "–",
                     f"{finite:.3f}" if finite is not None else "–", *measured, expected if index == 0 else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
