#!/usr/bin/env bash
# GPU CI: run on a CUDA machine with NO internet where CuPy, Numba, numba-cuda, pytest and
# pytest-benchmark are preinstalled in $PYTHON (default python3). Nothing is downloaded.
#
#   bash ci/gpu.sh            # PYTHON=/opt/torch/.venv/bin/python3 bash ci/gpu.sh
#
# Steps (each with its own log, junit XML and timeout; a failure is recorded, never fatal):
#   env         nvidia-smi, Python and library versions, CuPy's view of the device
#   install     `pip install --no-deps --no-build-isolation --no-index -e .` when setuptools
#               can build an editable install, else an import path (a symlink tree in which
#               backprop/kernels -> kernels/); both are checked to resolve to this checkout
#   warm-cpu    beside bench-cuda and torch, on one core: the CPU benchmarks run once untimed,
#               so that Numba has compiled (and cached) their kernels before bench-cpu
#   bench-cuda  pytest benchmarks/ --benchmark-only on CUDA, first (only warm-cpu beside it),
#               so the figures exist even when a later step runs out of time (every GPU
#               kernel backend; pytest-benchmark max time BACKPROP_CI_BENCH_MAX_TIME s each)
#   torch       benchmarks/torch_compare.py on CUDA, when PyTorch imports (else skipped)
#   bench-cpu   the CPU benchmarks of the same run (fused kernels, copy, steps, floors)
#   report      benchmarks/report.py: report.md (and report.png with matplotlib)
#   lowp-bench  benchmarks/gpu_lowp_gemm.py: bf16 and fp16 cuBLAS products (backprop.cuda_lowp)
#               against float32 cupy.matmul at the four MLPs' shapes -> gpu_lowp_gemm.md
#   kernels     the kernel harness on the GPU backends (cupy, numba_cuda vs the reference)
#               and the compile tests
#   cuda-cupy   the test suite on CUDA with BACKPROP_KERNELS=cupy   (CUDA-device tests)
#   cuda-numba  the test suite on CUDA with BACKPROP_KERNELS=numba  (CUDA-device tests)
#   lowp        tests/test_cuda_lowp.py on CUDA, once (left out of cuda-cupy and cuda-numba:
#               backprop.cuda_lowp calls cuBLAS directly, whatever kernel backend is chosen)
#   nccl        ci/nccl_smoke.py: a CuPy array reduced through NCCL on a one-rank group
#   nccl-ranks  the same script under mpiexec, one rank per GPU (2+ GPUs and mpi4py only)
#   cpu         the test suite on the CPU once, numba_cpu kernel harness included, beside
#               the GPU test steps
# The kernel files (marker kernel_harness) run only in `kernels` (and their numba_cpu cases in
# `cpu`); the suites drop
# tests parametrized with the other device (a pytest plugin written under the work dir), and
# run the model-level files on the dispatch of the step only (--backend default: the CPU CI
# covers the reference and the host-compiled CuPy kernels).
#
# Results: benchmarks/results/<gpu-name-slug>-<date>/{summary.md, summary.json, env.json,
# machine.json, benchmark-{cuda,cpu}.json, pytest-{cuda,cpu}.txt, torch.json, report.md,
# report.png, gpu_lowp_gemm.md, logs.tar.gz},
# also copied to $OUT/<same name>/ when OUT is set. Exits non-zero when any step failed, after
# writing the summary. The whole run is kept inside BACKPROP_CI_BUDGET_S seconds (default 570);
# each step has a cap, and later steps get what is left.
# Knobs: PYTHON, BACKPROP_CI_BUDGET_S, BACKPROP_CI_WORKERS (pytest-xdist workers, default 4,
# 0 = none), BACKPROP_CI_INSTALL (auto | editable | path), BACKPROP_CI_BENCH_MAX_TIME (0.2).
set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd -P)
PY=${PYTHON:-python3}
[[ $PY == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # steps change dir
BUDGET=${BACKPROP_CI_BUDGET_S:-570}
BENCH_MAX_TIME=${BACKPROP_CI_BENCH_MAX_TIME:-0.2}
WORKERS=${BACKPROP_CI_WORKERS:-4}
INSTALL=${BACKPROP_CI_INSTALL:-auto}
RESERVE=25                                   # seconds kept for the summary
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/backprop-gpu-ci.XXXXXX") || exit 2
LOGS=$WORK/logs
STATUS=$WORK/status
mkdir -p "$LOGS" "$STATUS" "$WORK/plugins"
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-$WORK/cupy-cache}
export PYTHONDONTWRITEBYTECODE=1

say() { printf '[gpu-ci %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# record NAME RC SECONDS NOTE  -> one status line per step (works from background jobs too)
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" > "$STATUS/$1"; }

# run_step NAME TIMEOUT CMD...  -> runs CMD with its output in $LOGS/NAME.log
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$(( START + BUDGET - RESERVE - $(date +%s) ))
  if (( left < 15 )); then
    say "$name: not run, the time budget is spent"
    record "$name" 125 0 "not run: time budget (${BUDGET}s) spent"
    return 125
  fi
  (( limit > left )) && limit=$left
  say "$name: start (timeout ${limit}s) -> $LOGS/$name.log"
  local t0 rc note=""
  t0=$(date +%s)
  { echo "\$ $*"; echo; } > "$LOGS/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$LOGS/$name.log" 2>&1
  rc=$?
  (( rc == 124 || rc == 137 )) && note="timed out after ${limit}s"
  record "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note"
  say "$name: rc=$rc ${note}"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/    /'
  return "$rc"
}

# --------------------------------------------------------------------------------------
# env: what machine, what software
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
slug=$(printf '%s' "${gpu_name:-no-gpu}" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' \
       | sed 's/^-*//; s/-*$//')
RUN_NAME="${slug:-no-gpu}-$(date -u +%Y-%m-%d)"
RESULTS=$REPO/benchmarks/results/$RUN_NAME
mkdir -p "$RESULTS"
say "results -> $RESULTS"

env_step() {
  echo "== nvidia-smi"; nvidia-smi || echo "nvidia-smi failed or is missing"
  echo "== python"; command -v "$PY"; "$PY" --version
  echo "== git"; git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "(not a git checkout)"
  "$PY" - "$WORK/env.json" <<'EOF'
import importlib, importlib.metadata as md, json, platform, sys
info = {"python": sys.version.split()[0], "executable": sys.executable,
        "platform": platform.platform(), "packages": {}}
for dist in ("numpy", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda", "pytest",
             "pytest-benchmark", "pytest-xdist", "setuptools", "torch"):
    try:
        info["packages"][dist] = md.version(dist)
    except md.PackageNotFoundError:
        pass
try:
    import cupy
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    info["cuda"] = {"runtime": rt.runtimeGetVersion(), "driver": rt.driverGetVersion(),
                    "device": props["name"].decode(), "sm": f"{props['major']}{props['minor']}",
                    "multiprocessors": props["multiProcessorCount"],
                    "memory_gib": round(props["totalGlobalMem"] / 2**30, 1)}
except Exception as exc:  # recorded, not fatal: the CUDA steps will say more
    info["cuda"] = {"error": f"{type(exc).__name__}: {exc}"}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
EOF
}
export PY WORK REPO
export -f env_step
run_step env 60 bash -c env_step
cp "$WORK/env.json" "$RESULTS/env.json" 2>/dev/null

# --------------------------------------------------------------------------------------
# install: make `backprop` and `backprop.kernels` import from this checkout
PYFLAGS=""
if "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  PYFLAGS="-P"   # the current directory (the repo root) must not shadow the import mapping
fi
PYRUN=("$PY" $PYFLAGS)
SHIM=$WORK/pythonpath

install_editable() {
  "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' \
    || { echo "setuptools < 64 (or missing): no PEP 660 editable install"; return 1; }
  "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e "$REPO"
}
install_path() {  # backprop/ -> repo/backprop/*, backprop/kernels -> repo/kernels
  mkdir -p "$SHIM/backprop" || return 1
  local f
  for f in "$REPO"/backprop/*; do ln -sfn "$f" "$SHIM/backprop/$(basename "$f")"; done
  ln -sfn "$REPO/kernels" "$SHIM/backprop/kernels"
}
check_imports() {
  (cd "$WORK" && "$PY" $PYFLAGS - "$REPO" <<'EOF'
import os, sys
import backprop, backprop.kernels, backprop.kernels.reference
repo = os.path.realpath(sys.argv[1])
got = {"backprop": os.path.realpath(backprop.__file__),
       "backprop.kernels": os.path.realpath(backprop.kernels.__file__)}
want = {"backprop": os.path.join(repo, "backprop", "__init__.py"),
        "backprop.kernels": os.path.join(repo, "kernels", "__init__.py")}
for name in want:
    print(f"{name:18} -> {got[name]}")
    assert got[name] == want[name], f"{name} imports from {got[name]}, expected {want[name]}"
EOF
  )
}
install_step() {
  if [[ $INSTALL != path ]] && install_editable; then
    echo "installed editable"; check_imports && return 0
    [[ $INSTALL == editable ]] && return 1
  fi
  [[ $INSTALL == editable ]] && return 1
  echo "using an import path: $SHIM"
  install_path && PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}" check_imports
}
export PYFLAGS SHIM INSTALL
export -f install_editable install_path check_imports install_step
run_step install 120 bash -c install_step
if [[ -d $SHIM/backprop ]]; then
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

# A pytest plugin: keep only tests whose `device` parameter is $BP_CI_DEVICE.
cat > "$WORK/plugins/bp_ci_device_filter.py" <<'EOF'
"""Deselect tests parametrized with a `device` other than $BP_CI_DEVICE (cpu | cuda)."""
import os

KEEP = os.environ.get("BP_CI_DEVICE", "")


def pytest_collection_modifyitems(config, items):
    if not KEEP:
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        device = str(params.get("device", KEEP)).split(":")[0]
        (keep if device == KEEP else drop).append(item)
    if drop:
        items[:] = keep
        config.hook.pytest_deselected(items=drop)
EOF
export PYTHONPATH="$WORK/plugins${PYTHONPATH:+:$PYTHONPATH}"

XDIST=()
if [[ $WORKERS != 0 ]] && "$PY" -c 'import xdist' 2>/dev/null; then
  XDIST=(-n "$WORKERS")
  # worksteal (pytest-xdist 3.2+): a worker left with compile-heavy tests hands them over
  if "$PY" -c 'import sys, xdist
sys.exit(tuple(map(int, xdist.__version__.split(".")[:2])) < (3, 2))'; then
    XDIST+=(--dist worksteal)
  fi
fi
PYTEST=("${PYRUN[@]}" -m pytest -q -ra -p no:cacheprovider)

# --------------------------------------------------------------------------------------
# benchmarks first, alone on the machine: the GPU ones, PyTorch on CUDA, then the CPU ones
# (fused kernels, copy, training steps and matmul floors; not the CPU reference kernels),
# each run its own JSON; then the report of both
"${PYRUN[@]}" "$REPO/benchmarks/report.py" --machine > "$RESULTS/machine.json" 2> "$LOGS/machine.log"
bench_step() {  # bench_step DEVICE SELECTION PYTEST...
  local device=$1 selection=$2; shift 2
  "$@" benchmarks --benchmark-only -k "$selection" --benchmark-max-time="$BENCH_MAX_TIME" \
    --benchmark-group-by=group --benchmark-sort=name --benchmark-columns=min,median,iqr,rounds \
    --benchmark-json="$RESULTS/benchmark-$device.json" --junitxml="$LOGS/bench-$device.xml" \
    | tee "$RESULTS/pytest-$device.txt"
  return "${PIPESTATUS[0]}"
}
torch_step() {  # torch_step PYTHON...
  "$@" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null \
    || { echo "PyTorch with CUDA is not importable here: no comparison"; return 0; }
  "$@" benchmarks/torch_compare.py --devices cuda --max-time 0.3 --repeat 2 \
    --out "$RESULTS/torch.json"
}
export BENCH_MAX_TIME RESULTS LOGS
export -f bench_step torch_step
REPORT_FLAGS=()
"${PYRUN[@]}" -c 'import matplotlib' 2>/dev/null || REPORT_FLAGS=(--no-plot)
if [[ -d benchmarks ]] && ls benchmarks/test_*.py > /dev/null 2>&1; then
  # meanwhile, on another core, Numba compiles the CPU benchmarks' kernels into its disk cache
  # (each benchmark run once, untimed): cold, bench-cpu would spend most of its cap compiling
  (BACKPROP_DEVICE=cpu NUMBA_NUM_THREADS=1 run_step warm-cpu 200 "${PYTEST[@]}" benchmarks \
    --benchmark-disable -k "not cuda and not cpu-reference" > /dev/null) &
  WARM_PID=$!
  BACKPROP_DEVICE=cuda run_step bench-cuda 150 bash -c 'bench_step "$@"' _ cuda cuda \
    "${PYTEST[@]}"
  BACKPROP_DEVICE=cuda run_step torch 60 bash -c 'torch_step "$@"' _ "${PYRUN[@]}"
  wait "$WARM_PID"
  BACKPROP_DEVICE=cpu run_step bench-cpu 90 bash -c 'bench_step "$@"' _ cpu \
    "not cuda and not cpu-reference" "${PYTEST[@]}"
  run_step report 20 "${PYRUN[@]}" "$REPO/benchmarks/report.py" "$RESULTS" "${REPORT_FLAGS[@]}"
else
  say "bench: benchmarks/ has no test_*.py: nothing to time"
  record bench-cuda 0 0 "absent: benchmarks/ has no test_*.py"
fi
# low-precision products through cuBLAS against float32, while the machine is otherwise idle
# (the CPU test suite starts after it): its per-call overheads are host timings
if [[ -f benchmarks/gpu_lowp_gemm.py ]]; then
  BACKPROP_DEVICE=cuda run_step lowp-bench 60 "${PYRUN[@]}" benchmarks/gpu_lowp_gemm.py \
    --out "$RESULTS/gpu_lowp_gemm.md"
else
  record lowp-bench 0 0 "absent: no benchmarks/gpu_lowp_gemm.py"
fi

# --------------------------------------------------------------------------------------
# tests: the cpu suite in the background (4 Numba threads), while the GPU steps run
(
  export BACKPROP_DEVICE=cpu BP_CI_DEVICE=cpu NUMBA_NUM_THREADS=4
  run_step cpu 300 "${PYTEST[@]}" tests "${XDIST[@]}" -m "not cudasim" --backend default \
    -k "not cupy and not numba_cuda" -p bp_ci_device_filter --junitxml="$LOGS/cpu.xml" \
    > /dev/null
) &
CPU_PID=$!

# the files marked kernel_harness (tests/test_kernels.py and the compile tests)
run_step kernels 150 "${PYTEST[@]}" tests -m kernel_harness "${XDIST[@]}" -k "not numba_cpu" \
  --junitxml="$LOGS/kernels.xml"
for choice in cupy numba; do
  BACKPROP_DEVICE=cuda BACKPROP_KERNELS=$choice BP_CI_DEVICE=cuda \
    run_step "cuda-$choice" 120 "${PYTEST[@]}" tests "${XDIST[@]}" -m "not kernel_harness" \
      --backend default --ignore=tests/test_cuda_lowp.py \
      -p bp_ci_device_filter --junitxml="$LOGS/cuda-$choice.xml"
done
# backprop.cuda_lowp: its GPU tests (the `device` fixture with "cuda" only) and its host half
BACKPROP_DEVICE=cuda run_step lowp 90 "${PYTEST[@]}" tests/test_cuda_lowp.py "${XDIST[@]}" \
  --junitxml="$LOGS/lowp.xml"
# NCCL through CuPy (backprop.distributed): one rank always; N ranks, one GPU each, when the
# machine has several GPUs and mpiexec exists (mpi4py is optional on the GPU machine)
BACKPROP_DEVICE=cuda run_step nccl 60 "${PYRUN[@]}" ci/nccl_smoke.py
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
MPIEXEC=$(dirname "$PY")/mpiexec
[[ -x $MPIEXEC ]] || MPIEXEC=$(command -v mpiexec || true)
if (( NGPU > 1 )) && [[ -n $MPIEXEC ]] && "$PY" -c "import mpi4py" 2>/dev/null; then
  BACKPROP_DEVICE=cuda run_step nccl-ranks 90 "$MPIEXEC" -n "$NGPU" "${PYRUN[@]}" \
    ci/nccl_smoke.py
else
  record nccl-ranks 0 0 "skipped: needs 2+ GPUs, mpiexec and mpi4py ($NGPU GPU(s))"
fi
wait "$CPU_PID"

# --------------------------------------------------------------------------------------
# summary (markdown + JSON) and artefacts
tar -czf "$RESULTS/logs.tar.gz" -C "$WORK" logs 2>/dev/null
"$PY" - "$STATUS" "$LOGS" "$RESULTS" "$RUN_NAME" "$(( $(date +%s) - START ))" <<'EOF'
import json, os, sys, xml.etree.ElementTree as ET

status_dir, logs, results, run_name, total = sys.argv[1:6]
order = ["env", "install", "warm-cpu", "bench-cuda", "torch", "bench-cpu", "report",
         "lowp-bench", "kernels", "cuda-cupy", "cuda-numba", "lowp", "nccl", "nccl-ranks", "cpu"]
info = {}
if os.path.exists(os.path.join(results, "env.json")):
    info = json.load(open(os.path.join(results, "env.json")))
steps = []
for name in order:
    path = os.path.join(status_dir, name)
    if not os.path.exists(path):
        steps.append({"step": name, "rc": None, "seconds": 0, "note": "did not report"})
        continue
    _, rc, secs, note = open(path).read().rstrip("\n").split("\t")
    step = {"step": name, "rc": int(rc), "seconds": int(secs), "note": note}
    xml = os.path.join(logs, f"{name}.xml")
    if os.path.exists(xml):
        try:
            root = ET.parse(xml).getroot()
            suites = [root] if root.tag == "testsuite" else list(root)
            counts = {k: sum(int(s.get(k, 0)) for s in suites)
                      for k in ("tests", "failures", "errors", "skipped")}
            counts["passed"] = (counts["tests"] - counts["failures"] - counts["errors"]
                                - counts["skipped"])
            step.update(counts)
            step["failed_tests"] = [
                f"{case.get('classname')}::{case.get('name')}"
                for case in root.iter("testcase")
                if case.find("failure") is not None or case.find("error") is not None][:50]
        except ET.ParseError as exc:
            step["note"] = (step["note"] + f"; junit unreadable: {exc}").strip("; ")
    steps.append(step)

informational = {"env"}
failed = [s["step"] for s in steps if s["step"] not in informational and s["rc"] not in (0,)]
bench = []
for device in ("cuda", "cpu"):
    bench_path = os.path.join(results, f"benchmark-{device}.json")
    if not os.path.exists(bench_path):
        continue
    try:
        for b in json.load(open(bench_path)).get("benchmarks", []):
            st = b["stats"]
            bench.append({"group": b.get("group"), "name": b["name"], "mean_s": st["mean"],
                          "stddev_s": st["stddev"], "min_s": st["min"], "rounds": st["rounds"]})
    except (ValueError, KeyError) as exc:
        bench.insert(0, {"error": f"benchmark-{device}.json unreadable: {exc}"})

summary = {"run": run_name, "total_seconds": int(total), "ok": not failed, "failed_steps": failed,
           "env": info, "steps": steps, "benchmarks": bench}
json.dump(summary, open(os.path.join(results, "summary.json"), "w"), indent=2)

cuda = info.get("cuda", {})
lines = [f"# backprop GPU CI: {run_name}", "",
         f"**{'PASSED' if not failed else 'FAILED: ' + ', '.join(failed)}** in {total} s", "",
         f"- device: {cuda.get('device', cuda.get('error', 'unknown'))}"
         + (f" (sm_{cuda['sm']}, {cuda['multiprocessors']} SMs, {cuda['memory_gib']} GiB; "
            f"CUDA runtime {cuda['runtime']}, driver {cuda['driver']})" if "sm" in cuda else ""),
         f"- python {info.get('python', '?')}: "
         + ", ".join(f"{k} {v}" for k, v in info.get("packages", {}).items()), "",
         "| step | rc | passed | failed | errors | skipped | seconds | note |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for s in steps:
    lines.append(f"| {s['step']} | {s['rc']} | {s.get('passed', '')} | {s.get('failures', '')} "
                 f"| {s.get('errors', '')} | {s.get('skipped', '')} | {s['seconds']} "
                 f"| {s['note']} |")
for s in steps:
    if s.get("failed_tests"):
        lines += ["", f"## failed in {s['step']}", ""] + [f"- `{t}`" for t in s["failed_tests"]]
if bench and "error" not in bench[0]:
    lines += ["", "## benchmarks (mean of each, fastest first within a group)", "",
              "| group | benchmark | mean | stddev | rounds |", "| --- | --- | --- | --- | --- |"]
    for b in sorted(bench, key=lambda b: (str(b["group"]), b["mean_s"])):
        lines.append(f"| {b['group']} | {b['name']} | {b['mean_s'] * 1e6:.1f} µs "
                     f"| {b['stddev_s'] * 1e6:.1f} µs | {b['rounds']} |")
elif bench:
    lines += ["", bench[0]["error"]]
if os.path.exists(os.path.join(results, "gpu_lowp_gemm.md")):
    lines += ["", "Low-precision (bf16, fp16) cuBLAS products against float32: "
              "gpu_lowp_gemm.md."]
lines += ["", "Logs and junit XML of every step: logs.tar.gz."]
open(os.path.join(results, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
sys.exit(1 if failed else 0)
EOF
rc=$?
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT/$RUN_NAME" && cp "$RESULTS"/* "$OUT/$RUN_NAME/" && say "copied to $OUT/$RUN_NAME"
fi
say "results in $RESULTS (exit $rc)"
exit "$rc"
