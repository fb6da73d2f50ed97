"""`epa-demo --sweep NAME`: the experiment over a grid of settings, resumable like the default run.

- ``convergence``: a few methods trained long at a constant learning rate, evaluated every
  ``eval_every`` steps: the loss and the held-out metrics over steps, from which the other sweeps'
  step count is chosen.
- ``negatives`` (the paper's claim): EPA with K strong negatives and each M of
  ``--negatives-num-weak`` weak ones, then each K of ``--negatives-strong-values`` at the M of
  ``--negatives-strong-at-weak``; DPO as the baseline. Does ε̂ fall towards 0 and the slope rise
  towards 1 as M grows?
- ``practical``: can EPA keep its reward recovery and match DPO's true reward and KL? DPO, DPO +
  SFT (TRL's RPO), and EPA at each weak weight α with and without the SFT term; then the same on
  a longer-trained reference. Every setting has the same steps, batch and learning rate.
- ``weak-correction`` (issue 25): EPA with K strong negatives and each M weak ones, uncorrected,
  corrected with the task's exact q and with epa-train's estimate of it; next to the uncorrected
  runs, the slope that the bias formula r_θ = r* + log μ − log(K μ + M q) + C predicts on the
  held-out candidates. Does the correction make ε̂ fall with M?
- ``ipm`` (issue 36): the same variants on data from the energy-based model itself (--data-model
  ipm, weak negatives from rejected answers), with K = 1 and 3 and M up to 256, and DPO. Do many
  importance-weighted weak negatives make ε̂ fall there, as derived? Its table.md also compares
  the plan's predictions with the measured numbers, and eps_vs_m.png draws ε̂ against M.

Every sweep's table splits ε̂ into its slope part (slope − 1)²·Var r* and residual R
(metrics.slope1_metrics); ``render_sweep_table`` adds the split to a results.json written before it.

Each sweep's defaults (below) differ from the default run's where the sweep needs it; a flag given
on the command line wins. The grid itself is set by the --negatives-* and --practical-* flags.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import math

import torch

from .config import ExperimentConfig, parse_method
from .metrics import slope1_metrics, slope1_split
from .pipeline import Setting, build_eval_set, mean_std, prepare_reference, resolve_device, run_settings, write_json
from .task import KnownRewardTask
from .report import COLUMNS, SWEEP_COLUMNS, ipm_predictions_markdown, markdown_table

# Shared by the negatives and practical sweeps, chosen before either was run
# (docs/known_reward/README.md: "How the step count was chosen"): the convergence sweep's curves
# flatten by SWEEP_STEPS at a constant learning rate, and the sweeps then decay it (cosine) over
# those steps. 8000 prompts per seed keep SWEEP_STEPS x 16 prompts within a few epochs, so longer
# training does not turn into memorizing the training prompts.
SWEEP_STEPS = 1000
SWEEP_TRAIN_PROMPTS = 8000
# One training process with one thread: the machine is shared, and the tiny models gain little
# from a second thread.
_ONE_AT_A_TIME = {"workers": 1, "threads": 1}


def method_settings(cfg: ExperimentConfig) -> list[Setting]:
    """cfg.methods, each under cfg (the default run's settings)."""
    return [Setting(name, parse_method(name).label, parse_method(name), cfg) for name in cfg.methods]


def negatives_settings(cfg: ExperimentConfig) -> list[Setting]:
    grid = cfg.negatives
    pairs = [(grid.num_strong, m) for m in grid.num_weak]
    pairs += [(k, m) for m in grid.strong_at_weak for k in grid.strong_values if (k, m) not in pairs]
    methods = [parse_method("dpo")] + [parse_method(f"epa_k{k}_m{m}") for k, m in pairs]
    return [Setting(m.name, m.label, m, cfg) for m in methods]


def practical_settings(cfg: ExperimentConfig) -> list[Setting]:
    grid = cfg.practical
    epa = parse_method(grid.method)
    sft_weights = [0.0, grid.sft_weight] if grid.sft_weight else [0.0]
    long_reference = dataclasses.replace(cfg, reference=dataclasses.replace(cfg.reference,
                                                                            steps=grid.long_reference_steps))

    def settings_on(base: ExperimentConfig, weak_weights: list[float], suffix: str, label_suffix: str):
        out = []
        for sft in sft_weights:
            sft_name, sft_label = ("_sft", f" + SFT {sft:g}") if sft else ("", "")
            dpo_label = f"DPO + SFT {sft:g} (RPO)" if sft else "DPO"
            out.append(Setting(f"dpo{sft_name}{suffix}", dpo_label + label_suffix, parse_method("dpo"),
                               dataclasses.replace(base, sft_weight=sft)))
            out += [Setting(f"{epa.name}_a{alpha:g}{sft_name}{suffix}", f"{epa.label} α={alpha:g}{sft_label}"
                            f"{label_suffix}", epa, dataclasses.replace(base, weak_weight=alpha, sft_weight=sft))
                    for alpha in weak_weights]
        return out

    return settings_on(cfg, grid.weak_weights, "", "") + settings_on(
        long_reference, grid.long_reference_weak_weights, "_longref", f", ref. {grid.long_reference_steps} steps")


CORRECTION_LABELS = {"none": "uncorrected", "exact": "exact q", "estimated": "estimated q"}


def corrected_settings(method, variants: list[str], cfg: ExperimentConfig) -> list[Setting]:
    """method under each weak-correction variant (once, uncorrected, without weak negatives)."""
    m = method.num_weak
    return [Setting(method.name if not m else f"{method.name}_{variant}",
                    method.label if not m else f"{method.label}, {CORRECTION_LABELS[variant]}",
                    method, dataclasses.replace(cfg, weak_correction=variant))
            for variant in (variants if m else ["none"])]


def weak_correction_settings(cfg: ExperimentConfig) -> list[Setting]:
    grid = cfg.weak_correction_grid
    return [setting for m in grid.num_weak
            for setting in corrected_settings(parse_method(f"epa_k{grid.num_strong}_m{m}"), grid.variants, cfg)]


def ipm_settings(cfg: ExperimentConfig) -> list[Setting]:
    grid = cfg.ipm_grid
    dpo = parse_method("dpo")
    return [Setting(dpo.name, dpo.label, dpo, cfg)] + [
        setting for k in grid.strong_values for m in grid.num_weak if (k, m) != (1, 0)  # EPA K=1 M=0 is DPO
        for setting in corrected_settings(parse_method(f"epa_k{k}_m{m}"), grid.variants, cfg)]


def weak_correction_summary(cfg: ExperimentConfig) -> dict:
    """The runs of each variant by M (each starting from the one M = 0 run) and, for the
    uncorrected ones, the slope and ε̂ that the bias formula predicts on the held-out candidates:
    r = r*/τ + log μ − log(K μ + M q), with μ = π_ref (the candidates' reference log-probs) and q
    the task's exact answer mixture (base marginal)."""
    grid = cfg.weak_correction_grid
    device = resolve_device(cfg.device)
    task = KnownRewardTask(cfg.task)
    reference, _ = prepare_reference(cfg, task, device)
    eval_set = build_eval_set(cfg, task, reference)
    n, c = eval_set.true_rewards.shape
    log_mu = eval_set.reference_logps.double()
    log_q = task.base_marginal_logps(eval_set.candidates.flatten(0, 1)).view(n, c)
    true = eval_set.true_rewards / cfg.temperature
    predicted = {}
    for m in grid.num_weak:
        bias = (log_mu - torch.logaddexp(math.log(grid.num_strong) + log_mu, math.log(m) + log_q) if m
                else torch.zeros_like(log_mu))
        predicted[str(m)] = slope1_metrics(true + bias, true)
    series = {CORRECTION_LABELS[variant]: [(m, f"epa_k{grid.num_strong}_m{m}" + (f"_{variant}" if m else ""))
                                           for m in grid.num_weak] for variant in grid.variants}
    return {"series": series,
            "predicted_slope_uncorrected": {m: p["slope"] for m, p in predicted.items()},
            "predicted_slope1_error_uncorrected": {m: p["slope1_error"] for m, p in predicted.items()}}


@dataclass(frozen=True)
class Sweep:
    name: str
    defaults: dict[str, Any]  # ExperimentConfig fields, below the command line's flags
    settings: Callable[[ExperimentConfig], list[Setting]]


SWEEPS = {
    "convergence": Sweep("convergence", {"methods": ["dpo", "epa_k3", "epa_k3_m4", "epa_k3_m16"], "seeds": [0],
                                         "steps": 3000, "scheduler": "constant", "eval_every": 150,
                                         "train_prompts": SWEEP_TRAIN_PROMPTS, **_ONE_AT_A_TIME},
                         method_settings),
    "negatives": Sweep("negatives", {"steps": SWEEP_STEPS, "train_prompts": SWEEP_TRAIN_PROMPTS, **_ONE_AT_A_TIME},
                       negatives_settings),
    "practical": Sweep("practical", {"steps": SWEEP_STEPS, "train_prompts": SWEEP_TRAIN_PROMPTS, **_ONE_AT_A_TIME},
                       practical_settings),
    "weak-correction": Sweep("weak-correction", {"steps": SWEEP_STEPS, "train_prompts": SWEEP_TRAIN_PROMPTS,
                                                 **_ONE_AT_A_TIME}, weak_correction_settings),
    # The plan's settings (docs/known_reward/sweeps/README.md, "ipm sweep"), fixed before any run:
    # few prompts per prompt letter set, and a batch of 4 so that the M = 256 runs fit the budget;
    # 1000 steps as amended after the convergence check (the loss flattens only once memorised).
    "ipm": Sweep("ipm", {"data_model": "ipm", "weak_source": "rejected", "steps": 1000, "batch_size": 4,
                         "train_prompts": 512, "lr": 3e-4, "workers": 2, "threads": 1}, ipm_settings),
}


def sweep_defaults(name: str) -> ExperimentConfig:
    """The config a sweep starts from before the command line's flags."""
    return dataclasses.replace(ExperimentConfig(output_dir=f"epa-demo-sweep-{name}"), **SWEEPS[name].defaults)


def run_sweep(name: str, cfg: ExperimentConfig) -> tuple[dict, list[Path]]:
    """Runs (or reuses) every setting of sweep `name` on cfg.seeds; writes results.json, table.md
    and the plots into cfg.output_dir. Returns (results, paths written)."""
    from .plots import plot_curves, plot_ipm, plot_negatives, plot_results, plot_weak_correction

    cfg.validate()
    settings = SWEEPS[name].settings(cfg)
    results = {"sweep": name, **run_settings(cfg, settings)}
    # Finished runs come back from their eval.json, which runs evaluated before ε̂'s split existed lack.
    add_slope1_split(results)
    if name == "weak-correction":
        results["weak_correction"] = weak_correction_summary(cfg)
    out = Path(cfg.output_dir)
    write_json(out / "results.json", results)
    (out / "table.md").write_text(sweep_markdown(results) + "\n")
    paths = [out / "results.json", out / "table.md", *plot_results(results, out, scatter=False)]
    if name == "convergence":
        paths += plot_curves(results, out)
    if name == "negatives":
        paths += plot_negatives(results, out)
    if name == "weak-correction":
        paths += plot_weak_correction(results, out)
    if name == "ipm":
        paths += plot_ipm(results, out)
    return results, paths


SPLIT = ("slope_part", "residual")


def add_slope1_split(results: dict) -> dict:
    """Fills in ε̂'s slope part and residual (metrics.slope1_metrics) for every run that lacks
    them, and their mean ± std over seeds in results['summary']; returns results, changed in place.

    A run's split follows from its stored ε̂ and slope and V = mean_x Var_k r* on the held-out
    candidates of its setting's reference (metrics.slope1_split). V is the reference's
    true_variance, or for results written before that key its ε̂: the reference's implicit rewards
    are all 0 (its slope is stored as exactly 0), so its ε̂ is V on the same candidates.
    """
    for name, runs in results["runs"].items():
        reference = results["references"][results["settings"][name]["reference"]]
        true_variance = reference.get("true_variance", reference["slope1_error"])
        for run in runs:
            if not all(key in run for key in SPLIT):
                run["slope_part"], run["residual"] = slope1_split(run["slope1_error"], run["slope"], true_variance)
        for key in SPLIT:
            results["summary"][name][key] = mean_std([run[key] for run in runs])
    return results


def render_sweep_table(directory: Path) -> Path:
    """Rewrites directory/table.md from directory/results.json with ε̂'s split filled in
    (add_slope1_split), for sweeps written before the split existed; results.json is left as it
    is. Returns the table's path."""
    results = json.loads((Path(directory) / "results.json").read_text())
    path = Path(directory) / "table.md"
    path.write_text(sweep_markdown(add_slope1_split(results)) + "\n")
    return path


def _method_of(setting: dict):
    return setting["method"]


def _epa_value(setting: dict, key: str):
    """An EPA setting's K or M (key num_strong or num_weak); "–" for DPO."""
    method = _method_of(setting)
    return method[key] if method["loss"] == "epa" else "–"


def sweep_markdown(results: dict) -> str:
    """The sweep's tables in Markdown (what docs/known_reward/README.md shows): every setting with
    ε̂'s slope part and residual next to it (the summary's, as add_slope1_split fills them; "–"
    where it lacks them), and for ipm the plan's predictions against the measured numbers."""
    seeds = len(results["config"]["seeds"])
    lines = [f"{results['sweep']} sweep: mean ± std over {seeds} seed(s); {results['config']['steps']} steps, "
             f"{results['config']['train_prompts']} training prompts per seed, scheduler "
             f"{results['config']['scheduler']}; {results['seconds']:.0f} s on {results['device']}", ""]
    if results["sweep"] == "negatives":
        leading = (("K", lambda s: _method_of(s)["num_strong"] if _method_of(s)["loss"] == "epa" else "–"),
                   ("M", lambda s: _method_of(s)["num_weak"] if _method_of(s)["loss"] == "epa" else "–"))
        lines.append(markdown_table(results, SWEEP_COLUMNS, leading=leading))
    elif results["sweep"] == "weak-correction":
        predicted = results["weak_correction"]["predicted_slope_uncorrected"]

        def predicted_slope(setting):
            m = _method_of(setting)["num_weak"]
            return f"{predicted[str(m)]:.2f}" if setting["weak_correction"] == "none" or m == 0 else "–"

        leading = (("M", lambda s: _method_of(s)["num_weak"]),
                   ("correction", lambda s: CORRECTION_LABELS[s["weak_correction"]] if _method_of(s)["num_weak"]
                    else "–"),
                   ("predicted slope", predicted_slope))
        lines.append(markdown_table(results, SWEEP_COLUMNS, leading=leading))
    elif results["sweep"] == "ipm":
        leading = (("K", lambda s: _epa_value(s, "num_strong")), ("M", lambda s: _epa_value(s, "num_weak")),
                   ("correction", lambda s: CORRECTION_LABELS[s["weak_correction"]] if _method_of(s)["num_weak"]
                    else "–"))
        lines.append(markdown_table(results, SWEEP_COLUMNS, leading=leading))
        lines += ["", "Predicted (design note ../shared/docs/weak-negatives.md, \"Model B\") against measured:", "",
                  ipm_predictions_markdown(results)]
    elif results["sweep"] == "practical":
        leading = (("α", lambda s: f"{s['weak_weight']:g}" if _method_of(s)["num_weak"] else "–"),
                   ("SFT", lambda s: f"{s['sft_weight']:g}"), ("ref. steps", lambda s: s["reference_steps"]))
        lines.append(markdown_table(results, SWEEP_COLUMNS, leading=leading))
    else:
        lines.append(markdown_table(results, SWEEP_COLUMNS))
        lines += ["", curves_markdown(results)]
    return "\n".join(lines)


def curves_markdown(results: dict, metrics=("slope1_error", "rho", "slope", "reward", "kl")) -> str:
    """Per setting of a convergence sweep (first seed): the metrics at each evaluated step."""
    lines = []
    titles = {m: title for m, title, _, _ in COLUMNS}
    for name, setting in results["settings"].items():
        curve = results["runs"][name][0]["curve"]
        lines += [f"{setting['label']} (seed {results['runs'][name][0]['seed']})", "",
                  "| step | " + " | ".join(titles[m] for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
        lines += ["| " + " | ".join([str(point["step"]), *(f"{point[m]:.3f}" for m in metrics)]) + " |"
                  for point in curve]
        lines.append("")
    return "\n".join(lines)
