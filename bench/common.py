"""Timing, memory and reporting shared by the benchmarks in bench/.

Times: median with 20 % / 80 % quantiles over repeated runs after warm-up (CUDA: events around
the region; CPU: a host clock); time_interleaved runs the providers of one case in turns, so
that a machine whose speed drifts (a shared host) slows them alike. Memory: peak bytes allocated
during the region above what was allocated before it (CUDA: the caching allocator's peak; CPU:
the process's peak resident set, reset through /proc/self/clear_refs, and, from
peak_allocated_mib, the peak of the tensors torch allocated, from the profiler's memory
timeline, which leaves out what BLAS and the C allocator keep for themselves).
Results go to bench/results/<benchmark>_<device>.json.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The vector ISA tells apart hosts that report the same model name (matmul rates differ ~2x).
    return f"{model} {torch.backends.cpu.get_cpu_capability()} ({torch.get_num_threads()} threads)"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, reps: int, warmup: int = 2,
            setup: Callable[[], object] | None = None) -> dict[str, float]:
    """Median and 20/80 % quantiles of fn's time in ms; setup (untimed) runs before each call."""
    samples = []
    for i in range(warmup + reps):
        if setup:
            setup()
        synchronize(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - begin) * 1e3
        if i >= warmup:
            samples.append(elapsed)
    return _summary(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], device: str, *, reps: int, warmup: int = 1,
                     samples: dict[str, list[float]] | None = None) -> dict[str, dict[str, float]]:
    """time_ms for each of fns, run in turns (warm-up rounds, then reps rounds of one call each).
    samples: a dict that receives each fn's timed calls in ms (for totals over calls that differ)."""
    samples = {} if samples is None else samples
    samples.update({name: [] for name in fns})
    for i in range(warmup + reps):
        for name, fn in fns.items():
            timing = time_ms(fn, device, reps=1, warmup=0)
            if i >= warmup:
                samples[name].append(timing["median_ms"])
    return {name: _summary(samples[name]) for name in fns}


def _summary(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else samples * 4
    return {"median_ms": statistics.median(samples), "q20_ms": q[0], "q80_ms": q[3]}


def _resident_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def memory_mark(device: str) -> int | None:
    """Starts a peak-memory measurement: resets the peak and returns the bytes in use now (None if
    the CPU's peak cannot be reset here)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    return _resident_kib("VmRSS") * 1024


def peak_since_mib(device: str, mark: int | None) -> float | None:
    """The peak memory since memory_mark above what was in use then, in MiB (None if unmeasurable)."""
    if mark is None:
        return None
    if device == "cuda":
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - mark) / 2**20
    return max(_resident_kib("VmHWM") * 1024 - mark, 0) / 2**20


def peak_extra_mib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory fn allocates beyond what exists when it starts, in MiB (None if unmeasurable).
    What fn returns is kept alive until the peak is read, as a training step would keep it."""
    mark = memory_mark(device)
    result = fn()
    peak = peak_since_mib(device, mark)
    del result
    return peak


def peak_allocated_mib(fn: Callable[[], object], device: str) -> float | None:
    """CPU: peak bytes of the tensors fn allocates beyond those that exist when it starts, in MiB,
    with fn's result kept alive, replayed from the profiler's memory timeline (a private torch
    API: None where it is missing). None on CUDA, where peak_extra_mib is already the allocator's."""
    if device != "cpu":
        return None
    try:
        from torch.profiler import _memory_profiler
    except ImportError:
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=True,
                                with_stack=True) as prof:
        result = fn()
    del result
    try:
        timeline = prof._memory_profile().timeline
    except (AttributeError, RuntimeError):
        return None
    current = peak = 0
    for _, action, (key, _version), size in timeline:
        if key.device.type != "cpu":
            continue
        if action == _memory_profiler.Action.CREATE:
            current += size
        elif action == _memory_profiler.Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak / 2**20


def write_report(benchmark: str, device: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]
    report = {
        "benchmark": benchmark,
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device == "cuda" else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join(os.sys.argv),
        **payload,
    }
    path = out_dir / f"{benchmark}_{device}_{slug}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def add_ratios_to_eager(rows: list[dict], case_keys: tuple[str, ...]) -> None:
    """Adds speedup_vs_eager, memory_vs_eager (and allocated_vs_eager) to each row, against the
    "eager" row of the same case (the rows that agree on case_keys)."""
    for row in rows:
        base = next((r for r in rows if r["provider"] == "eager" and all(r.get(k) == row.get(k) for k in case_keys)),
                    None)
        if base is None:
            continue
        row["speedup_vs_eager"] = base["median_ms"] / row["median_ms"]
        if base["peak_extra_mib"] and row["peak_extra_mib"] is not None:
            row["memory_vs_eager"] = row["peak_extra_mib"] / base["peak_extra_mib"]
        if base.get("peak_allocated_mib") and row.get("peak_allocated_mib") is not None:
            row["allocated_vs_eager"] = row["peak_allocated_mib"] / base["peak_allocated_mib"]


def finish(benchmark: str, device: str, rows: list[dict], columns: list[str], payload: dict,
           out_dir: Path | None) -> None:
    """Prints the table of rows and writes the JSON report (payload plus the rows)."""
    print_table(rows, columns)
    path = write_report(benchmark, device, {**payload, "results": rows}, out_dir)
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
