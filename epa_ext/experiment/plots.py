"""The known-reward experiment's plots, drawn from results.json's content.

- reward_vs_kl.png: true reward of each policy's samples against KL(π_θ ‖ π_ref), every seed and
  the mean ± std per method, with the best reward reachable at each KL (the tilted base
  distribution π_base·exp(r*/β') for a range of β') and the point the methods aim at (β' = β).
- slope1.png: ρ, ε̂ and preference accuracy per method (mean ± std over seeds).
- implicit_vs_true.png: r_θ against r* on held-out candidates (first seed), both centered per
  prompt, with the fitted slope (mean ± std over seeds); slope 1 through the origin is what a
  perfectly calibrated implicit reward gives.

For the sweeps (sweep.py):

- curves.png (convergence): the training loss and the held-out ε̂, slope, ρ, true reward and KL
  over steps, one line per setting.
- negatives_vs_m.png, negatives_vs_k.png (negatives): ε̂, slope and ρ against the number of weak
  negatives M (symmetric log scale, so M = 0 shows) and against K, with DPO (mean ± std band) and
  the target π* as horizontal lines.
- weak_correction_vs_m.png (weak-correction): ε̂, slope, true reward and KL against M for each
  weak-correction variant, with the slope the bias formula predicts without the correction.
- eps_vs_m.png (ipm): ε̂ against M for K = 1 and K = 3, one line per weak-correction variant,
  with DPO and the design note's population prediction for K = 3 with exact q.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .report import IPM_POPULATION_K3_EXACT, population_eps_hat


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Writes fig to path (110 dpi, as every plot here) and frees it; returns path."""
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _colors(plt, names: list[str]) -> dict:
    cmap = plt.cm.tab10 if len(names) <= 10 else plt.cm.tab20
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def plot_results(results: dict, out_dir: Path, scatter: bool = True) -> list[Path]:
    """Writes reward_vs_kl.png, slope1.png and (scatter=True) implicit_vs_true.png into out_dir;
    returns their paths."""
    plt = _pyplot()
    names = list(results["summary"])
    labels = {name: results["settings"][name]["label"] for name in names}
    colors = _colors(plt, names)
    paths = [out_dir / "reward_vs_kl.png", out_dir / "slope1.png"] + ([out_dir / "implicit_vs_true.png"] if scatter
                                                                       else [])

    fig, ax = plt.subplots(figsize=(6.4, 4.6), constrained_layout=True)
    frontier = results["frontier"]
    ax.plot([p["kl"] for p in frontier], [p["reward"] for p in frontier], "k--", lw=1,
            label="best reachable (π_base·exp(r*/β'))")
    opt = results["optimum"]
    ax.plot(opt["kl"], opt["reward"], "k*", ms=12, label=f"target π* (β = {opt['beta']:g})")
    ax.plot(0, results["reference"]["reward"], "ks", ms=7, label="reference")
    for name in names:
        runs = results["runs"][name]
        ax.scatter([r["kl"] for r in runs], [r["reward"] for r in runs], color=colors[name], alpha=0.35, s=18)
        (kl, kl_std), (reward, reward_std) = results["summary"][name]["kl"], results["summary"][name]["reward"]
        ax.errorbar(kl, reward, xerr=kl_std, yerr=reward_std, fmt="o", color=colors[name], capsize=3,
                    label=labels[name])
    ax.set_xlabel("KL(π_θ ‖ π_ref), nats per answer")
    ax.set_ylabel("true reward r* of the policy's samples")
    ax.set_title("Known-reward task: reward against KL (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(names) > 6 else 8)
    _save(plt, fig, paths[0])

    panels = [("rho", "Pearson ρ(r_θ, r*)  ↑"), ("slope1_error", "slope-1 error ε̂ = Var(r_θ − r*)  ↓"),
              ("accuracy", "preference accuracy  ↑")]
    fig, axes = plt.subplots(1, 3, figsize=(max(13, 1.1 * len(names) * 3), 3.8), constrained_layout=True)
    positions = np.arange(len(names))
    for ax, (metric, title) in zip(axes, panels):
        means = [results["summary"][n][metric][0] for n in names]
        stds = [results["summary"][n][metric][1] for n in names]
        ax.bar(positions, means, yerr=stds, color=[colors[n] for n in names], capsize=4)
        if metric == "slope1_error":
            ax.axhline(results["reference"]["slope1_error"], color="k", ls=":", lw=1, label="reference (r_θ = 0)")
            ax.legend(fontsize=8)
        ax.set_xticks(positions, [labels[n] for n in names], rotation=30 if len(names) > 5 else 20, fontsize=8,
                      ha="right")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, paths[1])

    if scatter:
        _plot_implicit_vs_true(plt, results, names, labels, colors, paths[2])
    return paths


def _plot_implicit_vs_true(plt, results: dict, names: list[str], labels: dict, colors: dict, path: Path) -> None:
    columns = min(len(names), 5)
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), constrained_layout=True,
                             squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        reference = results["references"][results["settings"][name]["reference"]]
        true = np.asarray(reference["eval_true_rewards"])
        true = true - true.mean(axis=1, keepdims=True)
        limit = np.abs(true).max() * 1.1
        implicit = np.asarray(results["runs"][name][0]["implicit_rewards"])
        implicit = implicit - implicit.mean(axis=1, keepdims=True)
        ax.scatter(true.ravel(), implicit.ravel(), s=5, alpha=0.4, color=colors[name])
        ax.plot([-limit, limit], [-limit, limit], "k--", lw=1)
        slope, slope_std = results["summary"][name]["slope"]
        ax.set_title(f"{labels[name]}: slope {slope:.2f} ± {slope_std:.2f}", fontsize=10)
        ax.set_xlabel("r* (centered per prompt)")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("r_θ = β·log π/π_ref (centered)")
    _save(plt, fig, path)


CURVE_PANELS = (("train_loss", "training loss (mean over the interval)"), ("slope1_error", "ε̂ (held-out) ↓"),
                ("slope", "fitted slope (1: slope-1)"), ("rho", "ρ (held-out) ↑"),
                ("reward", "true reward of samples ↑"), ("kl", "KL(π_θ ‖ π_ref)"))


def plot_curves(results: dict, out_dir: Path) -> list[Path]:
    """curves.png: each setting's training loss and held-out metrics over steps (every seed's
    curve; the loss averaged over each evaluation interval)."""
    plt = _pyplot()
    names = [n for n in results["runs"] if "curve" in results["runs"][n][0]]
    colors = _colors(plt, names)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), constrained_layout=True)
    for name in names:
        for i, run in enumerate(results["runs"][name]):
            steps = [p["step"] for p in run["curve"]]
            label = results["settings"][name]["label"] if i == 0 else None
            for ax, (metric, _) in zip(axes.flat, CURVE_PANELS):
                values = interval_losses(run["train_loss"], steps) if metric == "train_loss" else \
                    [p[metric] for p in run["curve"]]
                ax.plot(steps, values, "-o", ms=2.5, lw=1.2, color=colors[name], label=label)
    opt = results["optimum"]
    targets = {"slope1_error": 0.0, "slope": 1.0, "rho": 1.0, "reward": opt["reward"], "kl": opt["kl"]}
    for ax, (metric, title) in zip(axes.flat, CURVE_PANELS):
        if metric in targets:
            ax.axhline(targets[metric], color="k", ls="--", lw=1, label="target π*" if metric == "slope" else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    axes.flat[2].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Convergence: lr {results['config']['lr']:g} ({results['config']['scheduler']}), batch "
                 f"{results['config']['batch_size']}, {results['config']['train_prompts']} training prompts")
    path = out_dir / "curves.png"
    return [_save(plt, fig, path)]


def interval_losses(losses: list[list[float]], steps: list[int]) -> list[float]:
    """The mean of the logged training losses [[step, loss], ...] in each interval (previous
    step, step] of steps."""
    means, start = [], 0
    for end in steps:
        window = [loss for step, loss in losses if start < step <= end]
        means.append(float(np.mean(window)) if window else float("nan"))
        start = end
    return means


def _baselines(ax, results: dict, metric: str, target: float) -> None:
    """DPO's mean ± std as a band and the target π* as a line."""
    if "dpo" in results["summary"]:
        mean, std = results["summary"]["dpo"][metric]
        ax.axhline(mean, color="tab:red", lw=1.2, label="DPO")
        ax.axhspan(mean - std, mean + std, color="tab:red", alpha=0.15)
    ax.axhline(target, color="k", ls="--", lw=1, label="target π*")


NEGATIVES_PANELS = (("slope1_error", "slope-1 error ε̂ ↓", 0.0), ("slope", "fitted slope of r_θ on r*", 1.0),
                    ("rho", "Pearson ρ(r_θ, r*) ↑", 1.0))


def plot_negatives(results: dict, out_dir: Path) -> list[Path]:
    """negatives_vs_m.png (ε̂, slope, ρ against M at the sweep's K) and negatives_vs_k.png (against
    K at each M of the K sweep), mean ± std over seeds."""
    grid = results["config"]["negatives"]
    epa = {(s["method"]["num_strong"], s["method"]["num_weak"]): name
           for name, s in results["settings"].items() if s["method"]["loss"] == "epa"}
    title = "EPA's reward recovery against the number of negatives"
    return [
        _against_negatives(results, out_dir / "negatives_vs_m.png", "weak negatives M (symmetric log scale)",
                           [(f"EPA K={grid['num_strong']}", [(m, epa[grid["num_strong"], m]) for m in grid["num_weak"]])],
                           NEGATIVES_PANELS, title, log_x=True),
        _against_negatives(results, out_dir / "negatives_vs_k.png", "strong negatives K",
                           [(f"EPA M={m}", [(k, epa[k, m]) for k in grid["strong_values"]])
                            for m in grid["strong_at_weak"]], NEGATIVES_PANELS, title, log_x=False),
    ]


WEAK_CORRECTION_PANELS = (("slope1_error", "slope-1 error ε̂ ↓", 0.0), ("slope", "fitted slope of r_θ on r*", 1.0),
                          ("reward", "true reward of samples ↑", None), ("kl", "KL(π_θ ‖ π_ref)", None))


def plot_weak_correction(results: dict, out_dir: Path) -> list[Path]:
    """weak_correction_vs_m.png: ε̂, slope, true reward and KL against M for each weak-correction
    variant (all start from the one M = 0 run), and the slope the bias formula predicts for the
    uncorrected runs (dashed)."""
    series = [(f"{variant}", [(m, name) for m, name in points]) for variant, points in
              results["weak_correction"]["series"].items()]
    predicted = results["weak_correction"]["predicted_slope_uncorrected"]
    extra = {"slope": ("bias formula, uncorrected", [(int(m), v) for m, v in predicted.items()])}
    return [_against_negatives(results, out_dir / "weak_correction_vs_m.png", "weak negatives M (symmetric log scale)",
                               series, WEAK_CORRECTION_PANELS, "Importance-corrected weak negatives",
                               log_x=True, extra_lines=extra)]


def _against_negatives(results: dict, path: Path, xlabel: str, series: list, panels: tuple, title: str, *,
                       log_x: bool, extra_lines: dict | None = None) -> Path:
    """One figure of panels (metric, title, target or None) against a number of negatives; series:
    [(label, [(x, setting name)])], mean ± std over seeds; extra_lines: metric -> (label, [(x, y)])."""
    plt = _pyplot()
    seeds = len(results["config"]["seeds"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), constrained_layout=True)
    for ax, (metric, panel_title, target) in zip(axes, panels):
        if target is not None:
            _baselines(ax, results, metric, target)
        for label, points in series:
            xs = [x for x, _ in points]
            means = [results["summary"][name][metric][0] for _, name in points]
            stds = [results["summary"][name][metric][1] for _, name in points]
            ax.errorbar(xs, means, yerr=stds, fmt="-o", capsize=3, label=label)
        if extra_lines and metric in extra_lines:
            label, points = extra_lines[metric]
            ax.plot([x for x, _ in points], [y for _, y in points], "k:", marker="x", label=label)
        if log_x:
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks(xs, [str(x) for x in xs])
        else:
            ax.set_xticks(xs)
        ax.set_xlabel(xlabel)
        ax.set_title(panel_title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} ({results['config']['steps']} steps, mean ± std over {seeds} seed(s))")
    _save(plt, fig, path)
    return path


IPM_VARIANT_LABELS = {"none": "uncorrected", "exact": "exact q (q_base)", "estimated": "estimated q"}


def plot_ipm(results: dict, out_dir: Path) -> list[Path]:
    """eps_vs_m.png: ε̂ against the weak negatives M (symmetric log scale, so M = 0 shows), one
    panel per K of the ipm grid and one line per weak-correction variant, mean ± std over seeds.
    Every variant starts from the one M = 0 run (EPA K = 3 M = 0; for K = 1 it is DPO, the same
    loss). DPO's mean ± std is a band; in the K = 3 panel the design note's population minimiser
    with exact q (report.IPM_POPULATION_K3_EXACT, as ε̂ on the held-out candidates) is dotted.
    Settings the results lack are left out of their line."""
    plt = _pyplot()
    grid, summary = results["config"]["ipm_grid"], results["summary"]
    strong_values = grid["strong_values"]
    seeds = len(results["config"]["seeds"])
    fig, axes = plt.subplots(1, len(strong_values), figsize=(5.4 * len(strong_values), 4.8), layout="constrained",
                             squeeze=False, sharey=True)
    for ax, k in zip(axes[0], strong_values):
        _baselines(ax, results, "slope1_error", 0.0)
        at_zero = "dpo" if k == 1 else f"epa_k{k}_m0"
        for variant in grid["variants"]:
            points = [(m, at_zero if m == 0 else f"epa_k{k}_m{m}_{variant}") for m in grid["num_weak"]]
            points = [(m, name) for m, name in points if name in summary]
            ax.errorbar([m for m, _ in points], [summary[name]["slope1_error"][0] for _, name in points],
                        yerr=[summary[name]["slope1_error"][1] for _, name in points], fmt="-o", capsize=3,
                        label=IPM_VARIANT_LABELS[variant])
        if k == 3:
            candidates = results["config"]["eval_candidates"]
            predicted = sorted(IPM_POPULATION_K3_EXACT.items())
            ax.plot([m for m, _ in predicted], [population_eps_hat(eps, candidates) for _, (_, eps) in predicted],
                    "k:", marker="x", label=f"population minimiser, exact q (design note; ε̂ = "
                                            f"{candidates - 1}/{candidates}·ε)")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(grid["num_weak"], [str(m) for m in grid["num_weak"]])
        ax.set_xlabel("weak negatives M (symmetric log scale)")
        ax.set_title(f"EPA K={k}" + (" (M = 0: DPO)" if k == 1 else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("slope-1 error ε̂ ↓")
    # One legend below the panels (the last panel's lines: K = 3 has the prediction too), where
    # it hides no point.
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(f"ipm data: ε̂ against weak negatives ({results['config']['steps']} steps, mean ± std over "
                 f"{seeds} seed(s))")
    path = out_dir / "eps_vs_m.png"
    return [_save(plt, fig, path)]
