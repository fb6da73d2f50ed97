"""training_curves.png: loss, reward accuracy and reward margin against the step, training and
evaluation, so a run can be judged at a glance."""

from __future__ import annotations

from pathlib import Path

PANELS = [("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
          ("rewards/chosen", "reward of chosen")]


def plot_training_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2), constrained_layout=True)
    for ax, (key, title) in zip(axes, PANELS):
        for prefix, style in (("", "-"), ("eval/", "o--")):
            points = [(r["step"], r[prefix + key]) for r in records if prefix + key in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label="eval" if prefix else "train", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
