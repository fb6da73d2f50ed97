#!/usr/bin/env bash
# One-shot GPU check: build against this machine's torch, run the CUDA tests, the CUDA benchmarks
# and compute-sanitizer, and write everything plus one summary JSON into OUT_DIR.
#
#   bench/gpu_check.sh OUT_DIR          (on a machine with an NVIDIA GPU and its own torch)
#
# Budget: under 8 minutes on an H100/H200 (build for sm_90 only; override TORCH_CUDA_ARCH_LIST).
# Every step runs even if an earlier one failed; the summary says what passed.
set -uo pipefail
OUT=$(mkdir -p "${1:?usage: bench/gpu_check.sh OUT_DIR}" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
START=$(date +%s)
declare -A STATUS SECONDS_TAKEN

step() {  # step NAME TIMEOUT_S COMMAND...: runs from OUT (so the source tree is not imported)
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  echo "== $name" >&2
  (cd "$OUT" && timeout "$limit" "$@") > "$OUT/$name.log" 2>&1
  STATUS[$name]=$?
  SECONDS_TAKEN[$name]=$(( $(date +%s) - t0 ))
  echo "   exit ${STATUS[$name]} after ${SECONDS_TAKEN[$name]} s" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia-smi.csv" 2>&1
step build 240 "$PY" -m pip install --no-build-isolation --no-deps "$REPO"
step tests 180 "$PY" -m pytest -q -k cuda -p no:cacheprovider --junitxml="$OUT/tests.xml" "$REPO/python_tests"
step bench_logps 150 "$PY" "$REPO/bench/bench_logps.py" --device cuda --tokens 8192 --vocab 32000 128256 \
  --dtype bf16 fp32 --providers eager epa_ext --out "$OUT"
step bench_fused_linear 150 "$PY" "$REPO/bench/bench_fused_linear.py" --device cuda --tokens 16384 --hidden 4096 \
  --vocab 128256 --dtype bf16 --reps 5 --out "$OUT"
step bench_train_step 150 "$PY" "$REPO/bench/bench_train_step.py" --device cuda --dtype bf16 --hidden 2048 \
  --layers 8 --vocab 128256 --seq-len 1024 --out "$OUT"
step bench_losses 120 "$PY" "$REPO/bench/bench_losses.py" --device cuda --dtype bf16 --vocab 128256 --out "$OUT"
if command -v compute-sanitizer > /dev/null; then
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" "$REPO/bench/sanitizer_workload.py"
  step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" "$REPO/bench/sanitizer_workload.py"
fi

STATUS_JSON=$(for k in "${!STATUS[@]}"; do echo "$k ${STATUS[$k]} ${SECONDS_TAKEN[$k]}"; done)
"$PY" - "$OUT" "$START" <<PYEOF
import json, sys, time, glob, pathlib, subprocess, xml.etree.ElementTree as ET
import torch
out, start = pathlib.Path(sys.argv[1]), int(sys.argv[2])
steps = {}
for line in """$STATUS_JSON""".split("\n"):
    if line.strip():
        name, code, secs = line.split()
        steps[name] = {"exit_code": int(code), "seconds": int(secs), "ok": code == "0"}
tests = {}
if (out / "tests.xml").exists():
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["failed_names"] = [c.get("classname", "") + "::" + c.get("name", "") for c in suite.iter("testcase")
                             if c.find("failure") is not None or c.find("error") is not None]
benchmarks = {pathlib.Path(p).name: json.loads(pathlib.Path(p).read_text()) for p in glob.glob(str(out / "*_cuda_*.json"))}
nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
report = {
    "card": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "torch": torch.__version__, "cuda": torch.version.cuda, "nvcc": nvcc,
    "python": sys.version.split()[0], "seconds_total": int(time.time()) - start,
    "steps": steps, "tests": tests, "benchmarks": benchmarks,
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: report[k] for k in ("card", "torch", "seconds_total", "steps", "tests")}, indent=1))
PYEOF
