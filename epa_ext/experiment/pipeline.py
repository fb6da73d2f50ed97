"""The experiment's pieces, each computed once and reused by any later call with the same settings.

A *setting* is a method and the ExperimentConfig it is trained under (its weak weight, SFT term,
reference, steps, ...); a *run* is one setting on one seed. ``execute`` runs settings x seeds:

    output_dir/reference-<key>/          the SFT reference (model, tokenizer, summary.json)
    output_dir/data/seed<S>-<key>/       that seed's preference rows from that reference
    output_dir/runs/<setting>-seed<S>/   epa_ext.train's output for the run, and eval.json

Every piece is written atomically with a key (a hash of the settings it depends on) and reused
only under the same key, so a killed call loses at most the runs in progress, and a changed
setting retrains only what depends on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from ..train.config import TrainConfig
from ..train.trainer import run as train
from .config import METRICS, ExperimentConfig, Method
from .metrics import EvalSet, evaluate_policy
from .task import KnownRewardTask, answer_logps, base_nll_per_token, train_reference, write_preferences


@dataclass(frozen=True)
class Setting:
    """One method under one configuration; name is its key in the results."""

    name: str
    label: str
    method: Method
    cfg: ExperimentConfig


def _key(*parts) -> str:
    """A short hash of settings: a cached result is reused only under the same ones."""
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def _read_cached(path: Path, key: str) -> dict | None:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if payload.get("key") == key else None


def load_model(path: Path, device: torch.device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --- where each piece lives, and its key ----------------------------------------------------------


def reference_key(cfg: ExperimentConfig, device: torch.device) -> str:
    return _key(cfg.task, cfg.reference, device.type)


def reference_dir(cfg: ExperimentConfig, device: torch.device) -> Path:
    return Path(cfg.output_dir) / f"reference-{reference_key(cfg, device)[:8]}"


def _data_key(cfg: ExperimentConfig, seed: int, device: torch.device) -> str:
    parts = [reference_key(cfg, device), seed, cfg.train_prompts, cfg.candidates, cfg.temperature]
    if cfg.data_model != "pool":  # (pool data keep their keys)
        parts.append(cfg.data_model)
    return _key(*parts)


def data_path(cfg: ExperimentConfig, seed: int, device: torch.device) -> Path:
    return Path(cfg.output_dir) / "data" / f"seed{seed}-{_data_key(cfg, seed, device)[:8]}" / "preferences.jsonl"


def run_dir(setting: Setting, seed: int) -> Path:
    return Path(setting.cfg.output_dir) / "runs" / f"{setting.name}-seed{seed}"


def run_key(setting: Setting, seed: int, device: torch.device) -> str:
    """Everything a run's numbers depend on (not where or how fast it runs)."""
    cfg, method = setting.cfg, setting.method
    parts = [_data_key(cfg, seed, device), method.loss, method.num_strong, method.num_weak, cfg.steps, cfg.batch_size,
             cfg.lr, cfg.scheduler, cfg.beta, cfg.weak_weight if method.num_weak else None, cfg.sft_weight,
             cfg.eval_prompts, cfg.eval_candidates, cfg.policy_samples, cfg.eval_every]
    if method.num_weak and cfg.weak_correction != "none":  # (runs without it keep their keys)
        parts += [cfg.weak_correction, cfg.weak_correction_prompts if cfg.weak_correction == "estimated" else None]
    if method.num_weak and cfg.weak_source != "any":  # (the same: runs with today's source keep their keys)
        parts.append(cfg.weak_source)
    return _key(*parts)


# --- the reference, the data and the held-out set -------------------------------------------------


def prepare_reference(cfg: ExperimentConfig, task: KnownRewardTask, device: torch.device):
    """(the SFT reference, trained once and then loaded, and its summary)."""
    directory, key = reference_dir(cfg, device), reference_key(cfg, device)
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
        summary = {"key": key, "steps": cfg.reference.steps, "seconds": time.perf_counter() - started,
                   "nll_per_letter_on_base_samples": float(nll),
                   "base_entropy_per_letter": base_nll_per_token(task, prompts, answers)}
        write_json(directory / "summary.json", summary)
    return load_model(directory, device), summary


def prepare_data(cfg: ExperimentConfig, seed: int, task: KnownRewardTask, reference, device: torch.device) -> dict:
    """That seed's preference rows (written once); returns their summary."""
    path, key = data_path(cfg, seed, device), _data_key(cfg, seed, device)
    summary = _read_cached(path.with_suffix(".json"), key)
    if summary is None or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(seed)
        prompts = task.sample_prompts(cfg.train_prompts, generator)
        summary = {"key": key, **write_preferences(path, task, reference, prompts, cfg.candidates, cfg.temperature,
                                                   generator, data_model=cfg.data_model)}
        write_json(path.with_suffix(".json"), summary)
    return summary


def build_eval_set(cfg: ExperimentConfig, task: KnownRewardTask, reference) -> EvalSet:
    """Held-out prompts (the same for every reference: the generator draws them first) and
    candidates sampled from this reference."""
    return EvalSet.build(task, reference, cfg.eval_prompts, cfg.eval_candidates,
                         torch.Generator().manual_seed(cfg.task.seed + 2))


# --- one run --------------------------------------------------------------------------------------


def train_and_evaluate(setting: Setting, seed: int, task: KnownRewardTask, reference, eval_set: EvalSet,
                       device: torch.device) -> dict:
    """One setting on one seed: epa_ext.train, then the held-out metrics of the final policy (and
    of every eval_every checkpoint: ``curve``). Cached in the run's eval.json."""
    cfg, method = setting.cfg, setting.method
    directory, key = run_dir(setting, seed), run_key(setting, seed, device)
    cached = _read_cached(directory / "eval.json", key)
    if cached is not None:
        return cached
    shutil.rmtree(directory, ignore_errors=True)  # a run that was killed, or trained under other settings
    extra = {}
    if cfg.sft_weight:
        if "sft_weight" not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ValueError("--sft-weight needs epa-train's sft_weight option, which this version of "
                             "epa_ext.train lacks; run without it")
        extra["sft_weight"] = cfg.sft_weight
    corrected = method.num_weak and cfg.weak_correction != "none"
    if corrected:
        extra["weak_correction"] = "importance"
        extra["weak_correction_prompts"] = cfg.weak_correction_prompts
    if method.num_weak:
        extra["weak_source"] = cfg.weak_source
    train_cfg = TrainConfig(
        model=str(reference_dir(cfg, device)), dataset=str(data_path(cfg, seed, device)), output_dir=str(directory),
        loss=method.loss, beta=cfg.beta, num_strong=method.num_strong, num_weak=method.num_weak,
        weak_weight=cfg.weak_weight, max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
        scheduler=cfg.scheduler, eval_fraction=0.0, max_length=cfg.task.prompt_length + cfg.task.answer_length + 3,
        max_prompt_length=cfg.task.prompt_length + 2, ref="precompute", logging_steps=max(cfg.steps // 100, 1),
        save_steps=cfg.eval_every, seed=seed, device=device.type,
        # The reference's samples can repeat an answer; epa-train refuses a rejected answer equal to
        # the chosen one as bad data, and here drops such rows instead (it counts them).
        skip_bad_rows=True, **extra)
    train_cfg.validate()
    started = time.perf_counter()
    records = train(train_cfg, weak_proposal=task.weak_proposal() if corrected and cfg.weak_correction == "exact"
                    else None)
    seconds = time.perf_counter() - started

    def evaluate(model_dir: Path) -> tuple[dict, torch.Tensor]:
        return evaluate_policy(load_model(model_dir, device), reference, task, eval_set, beta=cfg.beta,
                               temperature=cfg.temperature, num_samples=cfg.policy_samples,
                               generator=torch.Generator().manual_seed(10_000 + seed))

    losses = [[r["step"], r["loss"]] for r in records if "loss" in r]
    metrics, implicit = evaluate(directory / "final")
    result = {"key": key, "setting": setting.name, "seed": seed, "train_seconds": seconds, **metrics,
              "final_train_loss": losses[-1][1] if losses else None, "train_loss": losses,
              # what epa_ext.train recorded it trained with
              "train_config": json.loads((directory / "config.json").read_text()),
              "implicit_rewards": rounded(implicit[:64])}
    checkpoints = sorted((int(p.name.split("-")[1]), p) for p in directory.glob("checkpoint-*"))
    if cfg.eval_every:
        # The last step's checkpoint (epa-train writes one for --resume) is the final policy, evaluated above.
        result["curve"] = [{"step": step, **evaluate(path)[0]} for step, path in checkpoints if step < cfg.steps] + \
                          [{"step": cfg.steps, **metrics}]
    for _, path in checkpoints:  # a run here is never resumed (a killed one trains again); final/ stays
        shutil.rmtree(path)
    write_json(directory / "eval.json", result)
    return result


def rounded(rewards: torch.Tensor) -> list[list[float]]:
    """The first prompts' rewards for the scatter plot, to 4 decimals (results.json stays small)."""
    return [[round(v, 4) for v in row] for row in rewards.tolist()]


def mean_std(values: list[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [float("nan"), float("nan")]
    return [statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0]


# --- many runs ------------------------------------------------------------------------------------


def _worker_init(threads: int) -> None:
    """A training process: its share of the cores, and no per-run progress bars (the parent shows
    one bar over all runs)."""
    torch.set_num_threads(threads)
    sys.stderr = open(os.devnull, "w")


def _train_in_worker(setting: Setting, seed: int, eval_set: EvalSet, device_type: str) -> dict:
    device = torch.device(device_type)
    reference = load_model(reference_dir(setting.cfg, device), device)
    return train_and_evaluate(setting, seed, KnownRewardTask(setting.cfg.task), reference, eval_set, device)


@dataclass
class Prepared:
    """What the runs share, per reference (by reference key)."""

    references: dict[str, dict]  # summary and the reference's own metrics
    eval_sets: dict[str, EvalSet]
    data: dict[str, dict[int, dict]]  # reference key -> seed -> data summary


def prepare(settings: list[Setting], seeds: list[int], device: torch.device) -> Prepared:
    """Each distinct reference of the settings (trained or loaded), its held-out set and metrics,
    and each seed's preference data from it."""
    prepared = Prepared({}, {}, {})
    for setting in settings:
        cfg = setting.cfg
        rk = reference_key(cfg, device)
        if rk not in prepared.references:
            task = KnownRewardTask(cfg.task)
            say(cfg, f"[setup] reference policy: tiny Llama (hidden {cfg.reference.hidden_size}, "
                     f"{cfg.reference.layers} layers) by SFT on the base distribution, {cfg.reference.steps} steps "
                     f"({device.type})")
            reference, summary = prepare_reference(cfg, task, device)
            eval_set = build_eval_set(cfg, task, reference)
            metrics, _ = evaluate_policy(reference, reference, task, eval_set, beta=cfg.beta,
                                         temperature=cfg.temperature, num_samples=cfg.policy_samples,
                                         generator=torch.Generator().manual_seed(cfg.task.seed + 3))
            prepared.references[rk] = {**summary, **metrics,
                                       "eval_true_rewards": rounded(eval_set.true_rewards[:64] / cfg.temperature)}
            prepared.eval_sets[rk] = eval_set
            prepared.data[rk] = {seed: prepare_data(cfg, seed, task, reference, device) for seed in seeds}
    return prepared


def execute(settings: list[Setting], seeds: list[int], prepared: Prepared, device: torch.device, *,
            workers: int | None, threads: int | None, progress: bool) -> dict[str, list[dict]]:
    """Every setting on every seed: {setting name: [result per seed]}. Finished runs come from
    their cache; the others are trained in ``workers`` processes at once (the tiny models keep
    one core busy each: two single-threaded runs side by side took 26 s where one after the other
    took 2 x 22 s with two threads each), with a progress bar over the runs."""
    from tqdm.auto import tqdm

    results: dict[tuple[str, int], dict] = {}
    pending = []
    for setting in settings:
        for seed in seeds:
            cached = _read_cached(run_dir(setting, seed) / "eval.json", run_key(setting, seed, device))
            if cached is not None:
                results[setting.name, seed] = cached
            else:
                pending.append((setting, seed))
    if pending:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(workers or (1 if device.type == "cuda" else min(cores, 8)), len(pending))
        threads = threads or max(cores // workers, 1)
        bar = tqdm(total=len(settings) * len(seeds), initial=len(results), desc="runs", disable=not progress,
                   dynamic_ncols=True)
        bar.write(f"training {len(pending)} runs ({len(results)} reused), {workers} at a time, {threads} thread(s) "
                  f"each")
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                 initargs=(threads,)) as pool:
            futures = {pool.submit(_train_in_worker, setting, seed,
                                   prepared.eval_sets[reference_key(setting.cfg, device)], device.type):
                       (setting, seed) for setting, seed in pending}
            for future in as_completed(futures):
                setting, seed = futures[future]
                result = results[setting.name, seed] = future.result()
                bar.update(1)
                bar.write(f"  {setting.label}, seed {seed}: trained in {result['train_seconds']:.0f} s; true reward "
                          f"{result['reward']:.3f}, ρ {result['rho']:.3f}, ε̂ {result['slope1_error']:.3f}")
        bar.close()
    return {s.name: [results[s.name, seed] for seed in seeds] for s in settings}


def collect(base: ExperimentConfig, settings: list[Setting], runs: dict[str, list[dict]], prepared: Prepared,
            device: torch.device, seconds: float) -> dict:
    """The results of settings x seeds as one JSON-able dict (what results.json holds)."""
    task = KnownRewardTask(base.task)
    prompts = next(iter(prepared.eval_sets.values())).prompts
    frontier = [task.optimum(prompts, b) for b in (math.inf, 8, 4, 2, 1.5, 1, 0.75, 0.5, 0.35, 0.25)]
    optimum_reward, optimum_kl = task.optimum(prompts, base.beta)
    base_reference = reference_key(base, device)
    return {
        "config": dataclasses.asdict(base),
        "device": device.type,
        "references": prepared.references,
        "reference": prepared.references.get(base_reference) or next(iter(prepared.references.values())),
        "optimum": {"beta": base.beta, "reward": optimum_reward, "kl": optimum_kl},
        "frontier": [{"reward": r, "kl": k} for r, k in frontier],
        "data": {rk: {str(seed): s for seed, s in per_seed.items()} for rk, per_seed in prepared.data.items()},
        "settings": {s.name: {"label": s.label, "method": dataclasses.asdict(s.method),
                              "reference": reference_key(s.cfg, device), "steps": s.cfg.steps,
                              "weak_weight": s.cfg.weak_weight, "sft_weight": s.cfg.sft_weight,
                              "weak_correction": s.cfg.weak_correction,
                              "reference_steps": s.cfg.reference.steps} for s in settings},
        "runs": runs,
        "summary": {name: {metric: mean_std([r[metric] for r in per_seed]) for metric in METRICS}
                    for name, per_seed in runs.items()},
        "seconds": seconds,
    }


def run_settings(base: ExperimentConfig, settings: list[Setting]) -> dict:
    """Prepares, trains (or reuses) and evaluates settings x base.seeds; returns the results (not
    written: the caller names the file)."""
    started = time.perf_counter()
    Path(base.output_dir).mkdir(parents=True, exist_ok=True)
    device = resolve_device(base.device)
    caller_threads = torch.get_num_threads()
    if base.threads:  # the reference's SFT and the evaluations here, as in the training processes
        torch.set_num_threads(base.threads)
    try:
        prepared = prepare(settings, base.seeds, device)
        runs = execute(settings, base.seeds, prepared, device, workers=base.workers, threads=base.threads,
                       progress=base.progress)
        return collect(base, settings, runs, prepared, device, time.perf_counter() - started)
    finally:  # a caller in the same process (a test, a notebook) keeps its own thread count
        torch.set_num_threads(caller_threads)


def say(cfg: ExperimentConfig, message: str) -> None:
    if cfg.progress:
        print(message, flush=True)
