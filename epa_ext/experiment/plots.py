"""The known-reward experiment's plots, drawn from results.json's content.

- reward_vs_kl.png: true reward of each policy's samples against KL(π_θ ‖ π_ref), every seed and
  the mean ± std per method, with the best reward reachable at each KL (the tilted base
  distribution π_base·exp(r*/β') for a range of β') and the point the methods aim at (β' = β).
- slope1.png: ρ, ε̂ and preference accuracy per method (mean ± std over seeds).
- implicit_vs_true.png: r_θ against r* on held-out candidates (first seed), both centered per
  prompt, with the fitted slope (mean ± std over seeds); slope 1 through the origin is what a
  perfectly calibrated implicit reward gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .run import METHODS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: dict, out_dir: Path) -> list[Path]:
    """Writes the three plots into out_dir; returns their paths."""
    plt = _pyplot()
    names = list(results["summary"])
    colors = {name: plt.cm.tab10(i) for i, name in enumerate(names)}
    paths = [out_dir / "reward_vs_kl.png", out_dir / "slope1.png", out_dir / "implicit_vs_true.png"]

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
                    label=METHODS[name].label)
    ax.set_xlabel("KL(π_θ ‖ π_ref), nats per answer")
    ax.set_ylabel("true reward r* of the policy's samples")
    ax.set_title("Known-reward task: reward against KL (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    panels = [("rho", "Pearson ρ(r_θ, r*)  ↑"), ("slope1_error", "slope-1 error ε̂ = Var(r_θ − r*)  ↓"),
              ("accuracy", "preference accuracy  ↑")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    positions = np.arange(len(names))
    for ax, (metric, title) in zip(axes, panels):
        means = [results["summary"][n][metric][0] for n in names]
        stds = [results["summary"][n][metric][1] for n in names]
        ax.bar(positions, means, yerr=stds, color=[colors[n] for n in names], capsize=4)
        if metric == "slope1_error":
            ax.axhline(results["reference"]["slope1_error"], color="k", ls=":", lw=1, label="reference (r_θ = 0)")
            ax.legend(fontsize=8)
        ax.set_xticks(positions, [METHODS[n].label for n in names], rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)

    true = np.asarray(results["eval_true_rewards"])
    true = true - true.mean(axis=1, keepdims=True)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), constrained_layout=True, squeeze=False,
                             sharex=True, sharey=True)
    limit = np.abs(true).max() * 1.1
    for ax, name in zip(axes[0], names):
        implicit = np.asarray(results["runs"][name][0]["implicit_rewards"])
        implicit = implicit - implicit.mean(axis=1, keepdims=True)
        ax.scatter(true.ravel(), implicit.ravel(), s=5, alpha=0.4, color=colors[name])
        ax.plot([-limit, limit], [-limit, limit], "k--", lw=1)
        slope, slope_std = results["summary"][name]["slope"]
        ax.set_title(f"{METHODS[name].label}: slope {slope:.2f} ± {slope_std:.2f}", fontsize=10)
        ax.set_xlabel("r* (centered per prompt)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("r_θ = β·log π/π_ref (centered)")
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths
