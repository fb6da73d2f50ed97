"""The benchmarks run end to end on tiny sizes (their numbers are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CUDA, PREFS

BENCH = Path(__file__).resolve().parents[1] / "bench"
REAL_DATA_TINY = ["--hidden", "16", "--layers", "1", "--vocab", "600", "--batch", "4", "--max-length", "64",
                  "--max-prompt-length", "32", "--warmup", "0", "--reps", "2", "--share-batches", "2"]


def run(args, cwd):
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize(
    "script,args,expected_providers",
    [
        ("bench_logps.py", ["--tokens", "64", "--seq-len", "16", "--vocab", "300", "--reps", "2", "--providers",
                            "eager", "epa_ext"], {"eager", "epa_ext"}),
        ("bench_logps.py", ["--tokens", "64", "--seq-len", "16", "--vocab", "300", "--reps", "2", "--modes", "full",
                            "--softcap", "30", "--providers", "eager", "epa_ext", "epa_ext-nocap"],
         {"eager", "epa_ext", "epa_ext-nocap"}),
        ("bench_losses.py", ["--seq-len", "8", "--vocab", "100", "--reps", "2"], {"eager", "epa_ext", "epa_ext inplace"}),
        ("bench_fused_linear.py", ["--tokens", "1024", "--hidden", "8", "--vocab", "50", "--reps", "2",
                                   "--max-chunk-tokens", "64"],
         {"eager", "liger", "recompute", "epa_ext", "epa_ext@64"}),
        ("bench_train_step.py", ["--hidden", "16", "--layers", "1", "--vocab", "64", "--seq-len", "16", "--reps", "2"],
         {"eager", "epa_ext"}),
        ("bench_real_data.py", [*REAL_DATA_TINY, "--dataset", str(PREFS)],
         {"padded", "length-grouped", "padding-free", "TRL DPOTrainer"}),
        ("bench_real_data.py", [*REAL_DATA_TINY, "--dataset", str(PREFS), "--mode", "rows"],
         {"rows <= 1 x max-length", "rows <= 2 x max-length", "rows <= 4 x max-length", "one row"}),
    ],
)
def test_benchmark_writes_a_report(script, args, expected_providers, tmp_path):
    out = run([str(BENCH / script), *args, "--out", str(tmp_path)], cwd=tmp_path)
    assert "wrote" in out
    (report_path,) = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["device"] and report["torch"]
    assert {row["provider"] for row in report["results"]} == expected_providers
    assert all(row["median_ms"] > 0 for row in report["results"])
    if script == "bench_fused_linear.py":  # the allocator-level CPU peak, next to the resident one
        assert all(row["peak_allocated_mib"] > 0 for row in report["results"])
    if script == "bench_train_step.py":  # one definition of memory in every mode, said in the report
        assert report["memory_definition"].startswith("first-step-fresh-process")
        assert all(row["peak_extra_mib"] is not None and row["peak_extra_mib"] >= 0 for row in report["results"])
    if script == "bench_real_data.py":
        assert all(0 <= row["padding_share"] < 1 and row["real_tokens_per_s"] > 0 for row in report["results"])
        assert report["results"][2]["max_loss_difference"] < 1e-4  # padding-free (or a bound): the padded losses


@CUDA
def test_cuda_sanitizer_workload_passes(tmp_path):
    """bench/gpu_check.sh runs this workload under compute-sanitizer; it must pass without one."""
    assert "sanitizer workload: ok" in run([str(BENCH / "sanitizer_workload.py")], cwd=tmp_path)


def test_max_batch_search_reports_a_batch_that_keeps_the_budget(monkeypatch):
    """bench_train_step's max-batch mode: doubling, bisecting, then the timed measurement; where
    that one's peak exceeds the budget (the resident peak varies between processes), the batch
    steps down instead of reporting a row over the budget."""
    sys.path.insert(0, str(BENCH))
    try:
        import bench_train_step
    finally:
        sys.path.remove(str(BENCH))
    probes, timed = [], []

    def fake_measure(args, provider, prompts, checkpointing=False, reps=None):
        (probes if reps == 1 else timed).append(prompts)
        # 100 MiB per prompt in the probes; the timed runs of 6 and 5 prompts come out higher
        peak = 100 * prompts + (250 if reps != 1 and prompts >= 5 else 0)
        return {"peak_extra_mib": peak, "median_ms": 1.0, "tokens_per_second": prompts}

    monkeypatch.setattr(bench_train_step, "measure_in_child", fake_measure)
    args = bench_train_step.parse_args(["--mode", "max-batch", "--memory-budget-mib", "650", "--max-prompts", "64"])
    prompts, result = bench_train_step.largest_fitting(args, "epa_ext")
    assert probes == [1, 2, 4, 8, 6, 7]
    assert timed == [6, 5, 4]
    assert prompts == 4 and result["peak_extra_mib"] <= 650


def import_bench(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_bench_trl_turns_run_one_thread_at_a_time_in_order():
    """bench_trl trains its providers in turns: one step each, in the order they joined; one that
    ends (or fails) leaves the others going."""
    import threading

    Turns = import_bench("bench_trl").Turns
    turns, trace, running = Turns(), [], []
    for name in ("a", "b", "c"):
        turns.join(name)

    def train(name: str, steps: int) -> None:
        turns.wait(name)
        for _ in range(steps):
            turns.hand_over(name)  # as StepMeter does before each step
            turns.wait(name)
            running.append(name)
            trace.append((name, len(running)))
            running.remove(name)
        turns.hand_over(name, leaving=True)

    threads = [threading.Thread(target=train, args=(name, steps)) for name, steps in (("a", 3), ("b", 1), ("c", 2))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert [name for name, _ in trace] == ["a", "b", "c", "a", "c", "a"]
    assert all(concurrent == 1 for _, concurrent in trace)


def test_bench_trl_report_compares_losses_and_says_cpu_is_not_gpu(tmp_path):
    """Same batches, same order, same weights: the per-step losses and chosen log-probs of
    DPOTrainer and EPATrainer in turns agree to fp32 rounding; a CPU report says TRL scores every
    position there."""
    run([str(BENCH / "bench_trl.py"), "--hidden", "16", "--layers", "1", "--vocab", "64", "--prompt-len", "8",
         "--answer-len", "8", "--warmup", "1", "--reps", "2", "--threads", "1", "--providers", "trl", "epa_ext",
         "--out", str(tmp_path)], cwd=tmp_path)
    (report_path,) = tmp_path.glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["device"] and report["torch"]
    assert [row["provider"] for row in report["results"]] == ["trl", "epa_ext"]
    assert all(row["median_ms"] > 0 for row in report["results"])
    assert "every position" in report["note"] and "not GPU ratios" in report["note"]
    assert report["timing"].startswith("in turns") and "fresh process" in report["memory_definition"]
    rows = {row["provider"]: row for row in report["results"]}
    assert rows["trl"]["max_loss_difference_vs_trl"] == 0
    assert rows["epa_ext"]["max_loss_difference_vs_trl"] < 1e-5
    # the loss starts at log 2 whatever the batch; the log-probs show that the batches are the same
    assert rows["epa_ext"]["max_chosen_logps_difference_vs_trl"] < 1e-3
    assert rows["epa_ext"]["tokens_per_s_vs_trl"] > 0 and rows["epa_ext"]["peak_extra_mib"] >= 0


def test_gpu_wheels_keeps_only_what_trl_needs_beyond_the_image():
    """make gpu-wheels downloads the packages trl, liger-kernel and datasets need that the GPU image
    lacks: never the torch stack, and nothing needed only by a package the image has."""
    gpu_wheels = import_bench("gpu_wheels")
    Requirement = gpu_wheels.Requirement
    image = {name: Requirement(spec) for name, spec in (("torch", "torch==2.11.0"), ("triton", "triton==3.6.0"),
                                                        ("pandas", "pandas"))}

    def package(name, *requires):
        return {"name": name, "version": "1.0", "requires_dist": list(requires)}

    resolved = [package("trl", "datasets>=4.7", "pandas", "accelerate; extra == 'dev'"),
                package("liger_kernel", "torch>=2.1.2", "triton>=2.3.1"),
                package("datasets", "dill<0.4.2", "tzdata; sys_platform == 'win32'"),
                package("dill"), package("pandas", "tzdata"), package("tzdata"), package("accelerate"),
                package("torch", "nvidia-cublas==13.0"), package("nvidia-cublas")]
    kept = {entry["name"] for entry in gpu_wheels.needed_beyond_image(resolved, image)}
    assert kept == {"trl", "liger_kernel", "datasets", "dill"}
    gpu_wheels.check_torch_stack(resolved[1], image)
    with pytest.raises(SystemExit, match="requires torch>=2.12"):
        gpu_wheels.check_torch_stack(package("liger_kernel", "torch>=2.12"), image)


def test_gpu_check_installs_the_wheels_make_gpu_wheels_downloads():
    """One folder: the Makefile target's, git-ignored, and the one gpu_check.sh installs from,
    offline and without dependencies (the machine's torch stays)."""
    root = BENCH.parent
    makefile, check = (root / "Makefile").read_text(), (BENCH / "gpu_check.sh").read_text()
    assert "GPU_WHEELS ?= gpu-wheels\n" in makefile and "\ngpu-wheels: " in makefile
    assert "gpu-wheels/" in (root / ".gitignore").read_text().splitlines()
    assert "WHEELS=${GPU_WHEELS:-$REPO/gpu-wheels}" in check
    commands = check.replace("\\\n", " ").splitlines()  # continued lines joined
    install = next(line for line in commands if "pip install" in line and "$WHEELS" in line)
    assert all(flag in install for flag in ("--no-index", "--find-links \"$WHEELS\"", "--no-deps", "--target"))


def test_the_prefix_sharing_benchmark_compares_the_same_batches(tmp_path):
    """bench_real_data --mode prefix: per loss, padded, padding-free and prefix-shared (several
    groups a row, and one) train the same batches (the same real tokens and losses), the shared
    ones through fewer decoder tokens; the synthetic short-prompt data shows auto."""
    run([str(BENCH / "bench_real_data.py"), *REAL_DATA_TINY, "--dataset", str(PREFS), "--mode", "prefix",
         "--losses", "dpo", "epa K=1 M=4", "--out", str(tmp_path)], cwd=tmp_path)
    (report_path,) = tmp_path.glob("*.json")
    results = json.loads(report_path.read_text())["results"]
    assert [(row["loss"], row["provider"]) for row in results] == [
        (loss, mode) for loss in ("dpo", "epa K=1 M=4")
        for mode in ("padded", "padding-free", "prefix-shared", "prefix-shared, a group a row")] + [
        ("short prompts", mode) for mode in ("padded", "prefix-shared", "prefix-sharing auto")]
    for loss in ("dpo", "epa K=1 M=4", "short prompts"):
        rows = {row["provider"]: row for row in results if row["loss"] == loss}
        assert len({row["real_tokens_per_step"] for row in rows.values()}) == 1
        assert all(row["max_loss_difference"] < 1e-4 for name, row in rows.items() if name != "padded")
        assert rows["prefix-shared"]["decoder_tokens_per_step"] < rows["padded"]["decoder_tokens_per_step"]
