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
        ("bench_trl.py", ["--hidden", "16", "--layers", "1", "--vocab", "64", "--prompt-len", "8", "--answer-len", "8",
                          "--warmup", "1", "--reps", "2", "--threads", "1", "--providers", "trl", "epa_ext"],
         {"trl", "epa_ext"}),
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
