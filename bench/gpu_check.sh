#!/usr/bin/env bash
# One-shot GPU check: build against this machine's torch, run the CUDA tests, the CUDA benchmarks
# and compute-sanitizer, and write everything plus one summary JSON into OUT_DIR.
#
#   bench/gpu_check.sh OUT_DIR          (on a machine with an NVIDIA GPU and its own torch)
#
# Budget: GPU_CHECK_BUDGET_S (default 420) seconds in all; each step's limit is cut to what is left, so
# the summary is always written. GPU_CHECK_STEPS (names, space-separated; default all) runs only those
# steps, e.g. GPU_CHECK_STEPS="build trl_wheels bench_trl" for TRL's side by side alone. Builds for
# sm_90 only (override TORCH_CUDA_ARCH_LIST). Every step runs even if an earlier one failed; the
# summary says what passed. OUT_DIR ends with two files (device machines return few): gpu_check.json
# (summary and every benchmark report) and gpu_check_logs.tar.gz.
# TRL's side by side needs trl's wheels, which the machine cannot download: `make gpu-wheels` here puts
# them into gpu-wheels/ (GPU_WHEELS), carried with the working tree; they are installed offline below.
set -uo pipefail
OUT=$(mkdir -p "${1:?usage: bench/gpu_check.sh OUT_DIR}" && cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
START=$(date +%s)
DEADLINE=$(( START + ${GPU_CHECK_BUDGET_S:-420} - 20 ))  # 20 s kept for the summary
declare -A STATUS SECONDS_TAKEN

step() {  # step NAME TIMEOUT_S COMMAND...: runs from OUT (so the source tree is not imported)
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  (( limit > DEADLINE - t0 )) && limit=$(( DEADLINE - t0 ))
  if [[ -n ${GPU_CHECK_STEPS:-} && " $GPU_CHECK_STEPS " != *" $name "* ]]; then
    echo "== $name: not in GPU_CHECK_STEPS" >&2; STATUS[$name]=skipped; SECONDS_TAKEN[$name]=0; return
  fi
  if (( limit < 10 )); then echo "== $name: skipped, out of time" >&2; STATUS[$name]=skipped; SECONDS_TAKEN[$name]=0; return; fi
  echo "== $name (limit $limit s)" >&2
  (cd "$OUT" && timeout "$limit" "$@") > "$OUT/$name.log" 2>&1
  STATUS[$name]=$?
  SECONDS_TAKEN[$name]=$(( $(date +%s) - t0 ))
  echo "   exit ${STATUS[$name]} after ${SECONDS_TAKEN[$name]} s" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/nvidia-smi.csv" 2>&1
# In order of what a short lease must not miss.
step build 240 "$PY" -m pip install --no-build-isolation --no-deps "$REPO"
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6")
step tests 180 "$PY" -m pytest -q -k cuda -p no:cacheprovider $XDIST --junitxml="$OUT/tests.xml" "$REPO/python_tests"
step bench_logps 60 "$PY" "$REPO/bench/bench_logps.py" --device cuda --tokens 8192 --vocab 32000 128256 \
  --dtype bf16 fp32 --providers eager epa_ext --reps 20 --out "$OUT"
step bench_losses 45 "$PY" "$REPO/bench/bench_losses.py" --device cuda --dtype bf16 --vocab 128256 --reps 10 --out "$OUT"
if command -v compute-sanitizer > /dev/null; then
  # No caching allocator: an access past a tensor's end then leaves its allocation, where memcheck sees it.
  step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$PY" "$REPO/bench/sanitizer_workload.py"
fi
# eager, liger (where liger-kernel is installed), the recomputing and the three-matmul paths; DPO and EPA;
# every label kept and half ignored; also timed with the host's launches hidden behind a queued sleep.
step bench_fused_linear 150 "$PY" "$REPO/bench/bench_fused_linear.py" --device cuda --tokens 16384 --hidden 4096 \
  --vocab 128256 --dtype bf16 --reps 5 --out "$OUT"
step train_smoke 60 "$PY" -m epa_ext.train --dataset "$REPO/python_tests/data/prefs.jsonl" --output-dir "$OUT/train_smoke" \
  --device cuda --precision bf16 --max-steps 30 --batch-size 4 --num-weak 2 --lr 1e-3 --eval-fraction 0.1
# 150 s: besides the timing process, each path's memory is measured in a fresh process of its own
step bench_train_step 150 "$PY" "$REPO/bench/bench_train_step.py" --device cuda --dtype bf16 --hidden 2048 \
  --layers 8 --vocab 128256 --seq-len 1024 --reps 10 --out "$OUT"
# TRL side by side (bench_trl.py): DPOTrainer (its fused head) against EPATrainer in turns, bf16, the model
# of bench_train_step. The machine has no package registry: trl, datasets and liger-kernel come from the
# carried wheels, installed offline with --no-deps into a folder of their own (the machine's torch and
# packages stay as they are), which only the TRL steps see.
WHEELS=${GPU_WHEELS:-$REPO/gpu-wheels}
TRL_SITE=$(mktemp -d)
TRL_PYTHONPATH=$TRL_SITE${PYTHONPATH:+:$PYTHONPATH}
if compgen -G "$WHEELS/trl-*.whl" > /dev/null; then
  TRL_WHEELS="found in $WHEELS"
  step trl_wheels 60 "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --no-compile \
    --target "$TRL_SITE" "$WHEELS"/*.whl
else
  TRL_WHEELS="missing: no trl wheel in $WHEELS (run make gpu-wheels where pip reaches PyPI and carry gpu-wheels/)"
  echo "== trl_wheels: $TRL_WHEELS" >&2
fi
if (cd "$OUT" && PYTHONPATH=$TRL_PYTHONPATH "$PY" -c "import trl, epa_ext.integrations.trl") > /dev/null 2>&1; then
  step bench_trl 150 env PYTHONPATH="$TRL_PYTHONPATH" "$PY" "$REPO/bench/bench_trl.py" --device cuda --dtype bf16 \
    --hidden 2048 --layers 8 --vocab 128256 --prompt-len 512 --answer-len 512 --batch 4 --warmup 2 --reps 5 \
    --providers trl epa_ext --out "$OUT"
else
  echo "== bench_trl: skipped, trl (>=1.16,<1.17) is not importable on this machine (wheels $TRL_WHEELS)" >&2
  STATUS[bench_trl]=skipped; SECONDS_TAKEN[bench_trl]=0
fi
if command -v compute-sanitizer > /dev/null; then
  step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" "$REPO/bench/sanitizer_workload.py"
fi

STATUS_JSON=$(for k in "${!STATUS[@]}"; do echo "$k ${STATUS[$k]} ${SECONDS_TAKEN[$k]}"; done)
"$PY" - "$OUT" "$START" "$TRL_WHEELS" <<PYEOF
import json, sys, time, glob, pathlib, subprocess, xml.etree.ElementTree as ET
import torch
out, start = pathlib.Path(sys.argv[1]), int(sys.argv[2])
steps = {}
for line in """$STATUS_JSON""".split("\n"):
    if line.strip():
        name, code, secs = line.split()
        steps[name] = {"exit_code": code if code == "skipped" else int(code), "seconds": int(secs), "ok": code == "0"}
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
    "steps": steps, "tests": tests, "trl_wheels": sys.argv[3], "benchmarks": benchmarks,
}
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps({k: report[k] for k in ("card", "torch", "seconds_total", "steps", "tests", "trl_wheels")}, indent=1))
PYEOF
# Everything but the summary goes into one archive; the tail of each failed step's log is printed.
for name in "${!STATUS[@]}"; do
  [[ ${STATUS[$name]} != 0 && -f "$OUT/$name.log" ]] && { echo "---- $name.log (tail)"; tail -n 25 "$OUT/$name.log"; }
done
ARCHIVE=$(mktemp --suffix .tar.gz)
(cd "$OUT" && tar czf "$ARCHIVE" --exclude gpu_check.json --exclude .hypothesis . \
  && find . -mindepth 1 -maxdepth 1 ! -name gpu_check.json -exec rm -rf {} + && mv "$ARCHIVE" gpu_check_logs.tar.gz)
