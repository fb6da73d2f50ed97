"""`epa-demo`: the known-reward experiment, DPO against EPA, end to end.

    epa-demo                                   # defaults: 5 methods x 3 seeds (~3 min on 2 CPU cores)
    epa-demo --seeds 0 --methods dpo epa_k3_m4 --steps 100     # a quicker look

1. The task and its reference policy (``task``): one tiny Llama trained by SFT on the broad base
   answer distribution, shared by every run, and held-out prompts with candidate answers sampled
   from it.
2. For each seed: preference data from the reference's samples (``write_preferences``), then each
   method trained on it by ``epa_ext.train`` with the same steps, batch, β and learning rate.
3. Each trained policy evaluated on the held-out prompts (``metrics``); a table of mean ± std over
   seeds, results.json, and plots: true reward against KL with the best reachable frontier,
   the slope-1 metrics per method, implicit against true reward.

A run that is killed keeps what it finished: the reference, each seed's data and each trained and
evaluated method are written atomically and reused by the next call with the same settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .metrics import EvalSet, evaluate_policy
from .task import (KnownRewardTask, ReferenceSpec, TaskSpec, answer_logps, base_nll_per_token, train_reference,
                   write_preferences)


@dataclass(frozen=True)
class Method:
    label: str
    loss: str
    num_strong: int
    num_weak: int


METHODS = {
    "dpo": Method("DPO", "dpo", 1, 0),
    "epa_k1": Method("EPA K=1 M=0", "epa", 1, 0),
    "epa_k3": Method("EPA K=3 M=0", "epa", 3, 0),
    "epa_k1_m4": Method("EPA K=1 M=4", "epa", 1, 4),
    "epa_k3_m4": Method("EPA K=3 M=4", "epa", 3, 4),
}
METRICS = ("reward", "reward_well_formed", "malformed", "kl", "accuracy", "rho", "slope1_error", "slope")


@dataclass
class ExperimentConfig:
    output_dir: str = "epa-demo-run"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-4
    beta: float = 1.0
    temperature: float = 1.0
    weak_weight: float = 1.0
    train_prompts: int = 2000
    candidates: int = 4
    eval_prompts: int = 256
    eval_candidates: int = 8
    policy_samples: int = 8
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    task: TaskSpec = field(default_factory=TaskSpec)
    device: str = "auto"
    workers: int | None = None  # training processes at once; None: one per core on CPU (at most 8), 1 on CUDA
    progress: bool = True

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose among {list(METHODS)}")
        if not self.seeds or not self.methods:
            raise ValueError("need at least one seed and one method")
        if self.candidates < 1 + max(METHODS[m].num_strong for m in self.methods):
            raise ValueError(f"--candidates {self.candidates} is too few for {max(METHODS[m].num_strong for m in self.methods)} "
                             f"strong negatives plus the chosen answer")
        for name in ("steps", "batch_size", "train_prompts", "eval_prompts", "policy_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.eval_candidates < 2:
            raise ValueError(f"--eval-candidates must be >= 2 (correlations need two); got {self.eval_candidates}")
        if self.beta <= 0 or self.temperature <= 0:
            raise ValueError("--beta and --temperature must be > 0")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1; got {self.workers}")


def _key(*parts) -> str:
    """A short hash of settings: a cached result is reused only under the same ones."""
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def _read_cached(path: Path, key: str) -> dict | None:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if payload.get("key") == key else None


def _load_model(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def prepare_reference(cfg: ExperimentConfig, task: KnownRewardTask, device: torch.device):
    """The SFT reference in output_dir/reference (trained once, then reused) and its summary."""
    directory = Path(cfg.output_dir) / "reference"
    key = _key(cfg.task, cfg.reference, device.type)
    summary = _read_cached(directory / "summary.json", key)
    if summary is None:
        started = time.perf_counter()
        model = train_reference(task, cfg.reference, seed=cfg.task.seed, device=device, progress=cfg.progress)
        model.save_pretrained(directory)
        task.tokenizer().save_pretrained(directory)
        generator = torch.Generator().manual_seed(cfg.task.seed + 1)
        prompts = task.sample_prompts(512, generator)
        answers = task.sample_base_answers(prompts, generator)
        nll = -answer_logps(model, task, prompts, task.answer_tokens(answers)).double().mean() / cfg.task.answer_length
        summary = {"key": key, "seconds": time.perf_counter() - started,
                   "nll_per_letter_on_base_samples": float(nll),
                   "base_entropy_per_letter": base_nll_per_token(task, prompts, answers)}
        _write_json(directory / "summary.json", summary)
    return _load_model(directory, device), summary


def _run_key(cfg: ExperimentConfig, method_name: str, seed: int, device: torch.device) -> str:
    return _key(cfg.task, cfg.reference, METHODS[method_name], seed, cfg.steps, cfg.batch_size, cfg.lr, cfg.beta,
                cfg.temperature, cfg.weak_weight, cfg.train_prompts, cfg.candidates, cfg.eval_prompts,
                cfg.eval_candidates, cfg.policy_samples, device.type)


def train_and_evaluate(cfg: ExperimentConfig, method_name: str, seed: int, data: Path, task, reference, eval_set,
                       device: torch.device) -> dict:
    """One method on one seed's data: epa_ext.train, then the held-out metrics (cached)."""
    from ..train.config import TrainConfig
    from ..train.trainer import run as train

    method = METHODS[method_name]
    run_dir = data.parent / method_name
    key = _run_key(cfg, method_name, seed, device)
    cached = _read_cached(run_dir / "eval.json", key)
    if cached is not None:
        return cached
    length = cfg.task.prompt_length + cfg.task.answer_length + 3
    train_cfg = TrainConfig(
        model=str(Path(cfg.output_dir) / "reference"), dataset=str(data), output_dir=str(run_dir),
        loss=method.loss, beta=cfg.beta, num_strong=method.num_strong, num_weak=method.num_weak,
        weak_weight=cfg.weak_weight, max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, eval_fraction=0.0,
        max_length=length, max_prompt_length=cfg.task.prompt_length + 2, ref="precompute",
        logging_steps=max(cfg.steps // 20, 1), seed=seed, device=device.type)
    train_cfg.validate()
    started = time.perf_counter()
    records = train(train_cfg)
    seconds = time.perf_counter() - started
    policy = _load_model(run_dir / "final", device)
    metrics, implicit = evaluate_policy(policy, reference, task, eval_set, beta=cfg.beta, temperature=cfg.temperature,
                                        num_samples=cfg.policy_samples,
                                        generator=torch.Generator().manual_seed(10_000 + seed))
    train_metrics = [r for r in records if "loss" in r]
    result = {"key": key, "method": method_name, "seed": seed, "train_seconds": seconds, **metrics,
              "final_train_loss": train_metrics[-1]["loss"] if train_metrics else None,
              "implicit_rewards": _rounded(implicit[:64])}
    _write_json(run_dir / "eval.json", result)
    return result


def _rounded(rewards: torch.Tensor) -> list[list[float]]:
    """The first prompts' rewards for the scatter plot, to 4 decimals (results.json stays small)."""
    return [[round(v, 4) for v in row] for row in rewards.tolist()]


def _mean_std(values: list[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [float("nan"), float("nan")]
    return [statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0]


def _worker_init(threads: int) -> None:
    """A training process: its share of the cores, and no per-run progress bars (the parent shows
    one bar over all runs)."""
    torch.set_num_threads(threads)
    sys.stderr = open(os.devnull, "w")


def _train_in_worker(cfg: ExperimentConfig, method_name: str, seed: int, data: Path, eval_set: EvalSet,
                     device_type: str) -> dict:
    device = torch.device(device_type)
    reference = _load_model(Path(cfg.output_dir) / "reference", device)
    return train_and_evaluate(cfg, method_name, seed, data, KnownRewardTask(cfg.task), reference, eval_set, device)


def train_all(cfg: ExperimentConfig, jobs: list[tuple[int, str, Path]], task, reference, eval_set,
              device: torch.device) -> dict[tuple[int, str], dict]:
    """Every (seed, method, data) job's results. Finished ones come from their cache; the others
    are trained in cfg.workers processes at once (the tiny models keep one core busy each: two
    single-threaded runs side by side took 26 s where one after the other took 2 x 22 s with two
    threads each), or in this process with the trainer's progress bars when there is one worker."""
    from tqdm.auto import tqdm

    results = {}
    pending = []
    for seed, name, data in jobs:
        cached = _read_cached(data.parent / name / "eval.json", _run_key(cfg, name, seed, device))
        if cached is not None:
            results[seed, name] = cached
        else:
            pending.append((seed, name, data))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cfg.workers or (1 if device.type == "cuda" else min(cores, 8))
    workers = min(workers, len(pending))
    if workers <= 1:
        for i, (seed, name, data) in enumerate(pending, 1):
            _say(cfg, f"[{i}/{len(pending)}] seed {seed}: {METHODS[name].label}")
            results[seed, name] = train_and_evaluate(cfg, name, seed, data, task, reference, eval_set, device)
        return results
    _say(cfg, f"training {len(pending)} runs, {workers} at a time")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(max(cores // workers, 1),)) as pool:
        futures = {pool.submit(_train_in_worker, cfg, name, seed, data, eval_set, device.type): (seed, name)
                   for seed, name, data in pending}
        bar = tqdm(total=len(futures), desc="training runs", disable=not cfg.progress, dynamic_ncols=True)
        for future in as_completed(futures):
            seed, name = futures[future]
            result = results[seed, name] = future.result()
            bar.update(1)
            bar.write(f"  seed {seed}, {METHODS[name].label}: trained in {result['train_seconds']:.0f} s; true reward "
                      f"{result['reward']:.3f}, ρ {result['rho']:.3f}, ε̂ {result['slope1_error']:.3f}")
        bar.close()
    return results


def run_experiment(cfg: ExperimentConfig) -> dict:
    """Runs everything cfg asks for; returns (and writes to output_dir/results.json) the results."""
    cfg.validate()
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    task = KnownRewardTask(cfg.task)

    _say(cfg, f"[setup] reference policy: tiny Llama (hidden {cfg.reference.hidden_size}, {cfg.reference.layers} "
              f"layers) by SFT on the base distribution, {cfg.reference.steps} steps ({device.type})")
    reference, reference_summary = prepare_reference(cfg, task, device)
    eval_set = EvalSet.build(task, reference, cfg.eval_prompts, cfg.eval_candidates,
                             torch.Generator().manual_seed(cfg.task.seed + 2))
    reference_metrics, _ = evaluate_policy(reference, reference, task, eval_set, beta=cfg.beta,
                                           temperature=cfg.temperature, num_samples=cfg.policy_samples,
                                           generator=torch.Generator().manual_seed(cfg.task.seed + 3))

    data_summaries, jobs = {}, []
    for seed in cfg.seeds:
        data = out / f"seed{seed}" / "preferences.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data_key = _key(cfg.task, cfg.reference, device.type, seed, cfg.train_prompts, cfg.candidates, cfg.temperature)
        summary = _read_cached(data.parent / "preferences.json", data_key)
        if summary is None or not data.exists():
            generator = torch.Generator().manual_seed(seed)
            summary = {"key": data_key, **write_preferences(data, task, reference, task.sample_prompts(
                cfg.train_prompts, generator), cfg.candidates, cfg.temperature, generator)}
            _write_json(data.parent / "preferences.json", summary)
        data_summaries[seed] = summary
        jobs += [(seed, name, data) for name in cfg.methods]
    finished = train_all(cfg, jobs, task, reference, eval_set, device)
    runs = {name: [finished[seed, name] for seed in cfg.seeds] for name in cfg.methods}

    frontier = [task.optimum(eval_set.prompts, b) for b in (math.inf, 8, 4, 2, 1.5, 1, 0.75, 0.5, 0.35, 0.25)]
    optimum_reward, optimum_kl = task.optimum(eval_set.prompts, cfg.beta)
    results = {
        "config": dataclasses.asdict(cfg),
        "device": device.type,
        "reference": {**reference_summary, **reference_metrics},
        "optimum": {"beta": cfg.beta, "reward": optimum_reward, "kl": optimum_kl},
        "frontier": [{"reward": r, "kl": k} for r, k in frontier],
        "data": data_summaries,
        "runs": runs,
        "summary": {name: {metric: _mean_std([r[metric] for r in runs[name]]) for metric in METRICS}
                    for name in cfg.methods},
        "eval_true_rewards": _rounded(eval_set.true_rewards[:64] / cfg.temperature),
        "seconds": time.perf_counter() - started,
    }
    _write_json(out / "results.json", results)
    return results


def _say(cfg: ExperimentConfig, message: str) -> None:
    if cfg.progress:
        print(message, flush=True)


def format_table(results: dict) -> str:
    """The results as a fixed-width table: mean ± std over seeds."""
    seeds = len(results["config"]["seeds"])
    columns = ("true reward", "r* well-formed", "malformed", "KL", "pref. acc.", "ρ", "ε̂ (slope 1)")
    header = f"{'method':<14}" + "".join(f"{c:>16}" for c in columns)
    lines = [f"held-out prompts: {results['config']['eval_prompts']}, mean ± std over {seeds} seed(s); "
             f"β = {results['config']['beta']}", header, "-" * len(header)]
    ref = results["reference"]
    cells = (ref["reward"], ref["reward_well_formed"], ref["malformed"], 0.0, None, None, ref["slope1_error"])
    lines.append(f"{'reference':<14}" + "".join(f"{'-' if v is None else f'{v:.3f}':>16}" for v in cells))
    for name, summary in results["summary"].items():
        cells = "".join(f"{mean:>9.3f} ± {std:<4.2f}" if math.isfinite(mean) else f"{'-':>16}"
                        for mean, std in (summary[m] for m in METRICS if m != "slope"))
        lines.append(f"{METHODS[name].label:<14}{cells}")
    opt = results["optimum"]
    cells = (opt["reward"], opt["reward"], 0.0, opt["kl"], None, 1.0, 0.0)
    lines.append(f"{'optimum π*':<14}" + "".join(f"{'' if v is None else f'{v:.3f}':>16}" for v in cells))
    lines.append("optimum π* ∝ π_base·exp(r*/β): the policy every method aims at (exact, from the base "
                 "distribution the reference imitates). Malformed answers score as the worst answer.")
    return "\n".join(lines)


def compare_with_dpo(results: dict) -> list[str]:
    """One line per EPA method: its difference from DPO in each metric, and whether that exceeds
    the seeds' spread (|difference| > the two standard deviations added)."""
    summary = results["summary"]
    if "dpo" not in summary:
        return []
    better_if_higher = {"reward": True, "reward_well_formed": True, "malformed": False, "accuracy": True, "rho": True,
                        "slope1_error": False}
    lines = []
    for name in summary:
        if name == "dpo":
            continue
        parts = []
        for metric, higher in better_if_higher.items():
            (m, s), (d, ds) = summary[name][metric], summary["dpo"][metric]
            if not (math.isfinite(m) and math.isfinite(d)):
                continue
            if abs(m - d) < 5e-4:  # below the printed precision
                parts.append(f"{metric} {m:.3f} vs {d:.3f} (equal)")
                continue
            verdict = "better" if (m > d) == higher else "worse"
            spread = "" if abs(m - d) > s + ds else ", within the seeds' spread"
            parts.append(f"{metric} {m:.3f} vs {d:.3f} ({verdict}{spread})")
        lines.append(f"{METHODS[name].label} vs DPO: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="epa-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = ExperimentConfig()
    parser.add_argument("--output-dir", default=defaults.output_dir, help="where everything is written (and reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=defaults.seeds, help="training seeds")
    parser.add_argument("--methods", nargs="+", default=defaults.methods, choices=list(METHODS),
                        help="methods to train (epa_kK_mM: K strong, M weak negatives)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per method and seed")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="prompts per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW, cosine)")
    parser.add_argument("--beta", type=float, default=defaults.beta, help="β of r_θ = β·log(π/π_ref)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="τ of the preference draw: chosen ∝ exp(r*/τ)")
    parser.add_argument("--weak-weight", type=float, default=defaults.weak_weight,
                        help="weight of each weak negative in EPA's partition sum")
    parser.add_argument("--train-prompts", type=int, default=defaults.train_prompts, help="preference rows per seed")
    parser.add_argument("--candidates", type=int, default=defaults.candidates,
                        help="reference answers per training prompt (the chosen one and its strong negatives)")
    parser.add_argument("--eval-prompts", type=int, default=defaults.eval_prompts, help="held-out prompts")
    parser.add_argument("--reference-steps", type=int, default=defaults.reference.steps, help="SFT steps of the reference")
    parser.add_argument("--device", default=defaults.device, choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=None,
                        help="training processes at once (default: one per core on CPU, at most 8; 1 on CUDA)")
    args = parser.parse_args(argv)
    cfg = ExperimentConfig(output_dir=args.output_dir, seeds=args.seeds, methods=args.methods, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, beta=args.beta, temperature=args.temperature,
                           weak_weight=args.weak_weight, train_prompts=args.train_prompts,
                           candidates=args.candidates, eval_prompts=args.eval_prompts,
                           reference=dataclasses.replace(defaults.reference, steps=args.reference_steps),
                           device=args.device, workers=args.workers)
    try:
        results = run_experiment(cfg)
    except ValueError as error:
        raise SystemExit(f"epa-demo: {error}") from None
    from .plots import plot_results

    paths = plot_results(results, Path(cfg.output_dir))
    print("\n" + format_table(results))
    for line in compare_with_dpo(results):
        print(line)
    print(f"\n{results['seconds']:.0f} s on {results['device']}. Results: {Path(cfg.output_dir) / 'results.json'}")
    for path in paths:
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
