"""The results as text: a fixed-width table for the terminal, Markdown tables for README, and the
comparison of every setting with DPO. All read results.json's content (``pipeline.collect``)."""

from __future__ import annotations

import math

# (metric, column title, decimals of the mean, decimals of the std)
COLUMNS = (("reward", "true reward", 3, 3), ("reward_well_formed", "r* well-formed", 3, 2),
           ("malformed", "malformed", 3, 3), ("kl", "KL", 2, 2), ("accuracy", "pref. acc.", 3, 3),
           ("rho", "ρ ↑", 3, 3), ("slope1_error", "ε̂ ↓", 3, 3), ("slope", "slope", 2, 2))
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
    """A Markdown table of every setting (mean ± std over seeds; malformed in %). leading: extra
    first columns as (title, function of the setting's entry in results['settings'])."""
    titles = ["setting", *(title for title, _ in leading), *(title for _, title, _, _ in columns)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for name, setting in results["settings"].items():
        cells = [setting["label"], *(str(value(setting)) for _, value in leading)]
        cells += [_mean_std(results["summary"][name][m], d, sd, percent=m == "malformed") for m, _, d, sd in columns]
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
