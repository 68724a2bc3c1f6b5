#!/usr/bin/env bash
# `make gpu-check`: the prepared run for the occasional GPU machine (../shared/DESIGN.md, "GPUs").
#
#   scripts/gpu_check.sh [--cpu] [--no-build] [OUT_DIR]
#
# Steps (each under `timeout`, each logged to OUT_DIR/<step>.log; a failing step
# is recorded and the next one runs; the exit status is 1 if any step failed):
#   env          nvidia-smi, python, torch, nvcc, CPU load
#   wheels       .whl/*.whl (segment-anything, pycocotools, ...: what the bare
#                machine lacks) installed with --no-deps into $GPU_CHECK_TMP/site
#   build        samantic._C built with CUDA (SAMANTIC_CUDA=ON) for $CUDA_ARCHS
#                only, installed into $GPU_CHECK_TMP/pkg (not editable, nothing
#                written to the machine's site-packages or the source tree)
#   doctor       `samantic doctor --json` (doctor.json) and its table
#   tests        pytest -m gpu on the test files that have gpu tests (junit xml)
#   postprocess  the post-processing benchmark on CUDA (1024x768, blobs and noise)
#   amg          segment-everything, samantic vs segment-anything on CUDA in one
#                process: sam_nano (shipped weights), sam_vit_b (random, seeded)
# then summary.md / summary.json / steps.tsv. Sized for about 5 minutes on a
# loaded machine (the first H200 run, beside a training job: env+wheels+build+
# doctor+tests 77 s; segment-anything's generator on sam_nano thresholds-0
# 6.3 s a call); a step's limit is clamped to the budget left.
#
# OUT_DIR: the argument, else $OUT/gpu-check when OUT is set, else runs/gpu-check.
# Environment: PYTHON (python3), GPU_CHECK_BUDGET (seconds for all steps, 320),
# CUDA_ARCHS (90), CMAKE_BUILD_PARALLEL_LEVEL (8), GPU_CHECK_TMP (/tmp/samantic-gpu-check),
# GPU_CHECK_WHEELS (the carried wheels and headers: .whl), GPU_CHECK_STEPS (a comma list of the
# steps to run, default all; the build is needed by every step after it unless --no-build).
#   --cpu       no GPU here: benchmarks on the CPU with tiny inputs, gpu tests skip,
#               a missing nvidia-smi or CUDA device is not a failure (a dry run)
#   --no-build  use the samantic that $PYTHON already imports (e.g. .venv's)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

CPU_ONLY=0
NO_BUILD=0
OUT_ARG=""
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU_ONLY=1 ;;
    --no-build) NO_BUILD=1 ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) OUT_ARG=$arg ;;
  esac
done

export PYTHON=${PYTHON:-python3}
if [[ -n "$OUT_ARG" ]]; then OUT_DIR=$OUT_ARG
elif [[ -n "${OUT:-}" ]]; then OUT_DIR=$OUT/gpu-check
else OUT_DIR=runs/gpu-check
fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export OUT_DIR CPU_ONLY NO_BUILD ROOT
export GPU_CHECK_TMP=${GPU_CHECK_TMP:-/tmp/samantic-gpu-check}
export WHL=${GPU_CHECK_WHEELS:-$ROOT/.whl}
export CUDA_ARCHS=${CUDA_ARCHS:-90}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-8}
BUDGET=${GPU_CHECK_BUDGET:-320}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export PYTHONDONTWRITEBYTECODE=1  # keep the copied source tree clean
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [[ "$CPU_ONLY" == 1 ]]; then export DEVICE=cpu; else export DEVICE=cuda; fi
# nvcc where CMake looks for it, if it is not on PATH
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi

STEPS_TSV=$OUT_DIR/steps.tsv
printf 'step\tstatus\trc\tseconds\tlog\n' > "$STEPS_TSV"
FAILED=0

log() { echo "[gpu-check $(date +%H:%M:%S)] $*"; }

# step NAME LIMIT_S FUNCTION: runs the function under `timeout`, clamped to the budget left
step() {
  local name=$1 limit=$2 fn=$3
  local now left t0 rc status secs
  if [[ -n "${GPU_CHECK_STEPS:-}" && ",$GPU_CHECK_STEPS," != *",$name,"* ]]; then
    printf '%s\tskipped\t-\t0\t-\n' "$name" >> "$STEPS_TSV"
    return 0
  fi
  now=$(date +%s)
  left=$((DEADLINE - now))
  if (( left < 15 )); then
    log "$name: skipped, budget of ${BUDGET}s spent"
    printf '%s\tskipped-budget\t-\t0\t%s.log\n' "$name" "$name" >> "$STEPS_TSV"
    FAILED=1
    return 1
  fi
  (( limit > left )) && limit=$left
  log "$name (timeout ${limit}s) -> $OUT_DIR/$name.log"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" bash -c "$fn" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if (( rc == 0 )); then status=ok
  elif (( rc == 124 || rc == 137 )); then status=timeout; FAILED=1
  else status=failed; FAILED=1
  fi
  printf '%s\t%s\t%s\t%s\t%s.log\n' "$name" "$status" "$rc" "$secs" "$name" >> "$STEPS_TSV"
  log "$name: $status (rc $rc, ${secs}s)"
  if [[ "$status" != ok ]]; then tail -n 25 "$OUT_DIR/$name.log" | sed 's/^/    | /'; fi
  return $rc
}

# --------------------------------------------------------------------------- steps (run by `bash -c`)

step_env() {
  set -x
  date -u
  uname -a
  nproc
  uptime
  free -g || true
  command -v "$PYTHON"
  "$PYTHON" -c 'import sys; print(sys.version)'
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "(no git: commit unknown)"
  git -C "$ROOT" status --short 2>/dev/null | head -50 || true
  command -v nvcc && nvcc --version
  command -v cmake && cmake --version | head -1
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
  if [[ "$CPU_ONLY" == 1 ]]; then
    nvidia-smi || echo "(no nvidia-smi: --cpu dry run)"
  else
    nvidia-smi
  fi
}

step_wheels() {
  set -e
  local site=$GPU_CHECK_TMP/site
  shopt -s nullglob
  local wheels=("$WHL"/*.whl)
  if (( ${#wheels[@]} )); then
    printf '%s\n' "${wheels[@]}"
    rm -rf "$site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    ls "$site"
  else
    echo "no $WHL/*.whl: using what $PYTHON has"
  fi
  # what the checks import, from wherever it comes (PYTHONPATH has $site when wheels were carried)
  echo "PYTHONPATH=${PYTHONPATH:-}"
  "$PYTHON" - <<'EOF'
import importlib
missing = []
for name in ["numpy", "torch", "torchvision", "segment_anything", "pycocotools.mask", "cv2", "PIL", "typer", "rich",
             "safetensors", "skimage", "pytest", "onnx", "onnxruntime"]:
    try:
        m = importlib.import_module(name)
        print(f"{name:18s} {getattr(m, '__version__', '')} {getattr(m, '__file__', '')}")
    except Exception as e:
        missing.append(name)
        print(f"{name:18s} MISSING: {type(e).__name__}: {e}")
raise SystemExit(f"missing: {missing}" if missing else 0)
EOF
}

step_build() {
  set -e
  local pkg=$GPU_CHECK_TMP/pkg
  local cuda_flag=ON
  [[ "$CPU_ONLY" == 1 ]] && cuda_flag=AUTO
  local extra=()
  # the Python headers, if this interpreter has none (e.g. Ubuntu without python3.X-dev) and they were carried
  local inc
  inc=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("include"))')
  if [[ ! -f "$inc/Python.h" ]]; then
    local ver tgz
    ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    tgz=$WHL/python${ver}-include.tar.gz
    echo "no $inc/Python.h; trying $tgz"
    mkdir -p "$GPU_CHECK_TMP/pyinc"
    tar -C "$GPU_CHECK_TMP/pyinc" -xzf "$tgz"
    inc=$GPU_CHECK_TMP/pyinc/python$ver
    extra+=("-Ccmake.define.Python_INCLUDE_DIR=$inc" "-Ccmake.define.Python3_INCLUDE_DIR=$inc")
  fi
  rm -rf "$pkg" "$GPU_CHECK_TMP/build"
  ( set -x
    "$PYTHON" -m pip install -v --no-index --no-build-isolation --no-deps --no-compile --no-cache-dir \
      --target "$pkg" \
      -Cbuild-dir="$GPU_CHECK_TMP/build" \
      -Ccmake.define.SAMANTIC_CUDA=$cuda_flag \
      -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS" \
      "${extra[@]}" \
      "$ROOT" )
  # the fresh build must be what gets imported (an editable or site-packages samantic would shadow it)
  PYTHONPATH=$pkg${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" - "$pkg" <<'EOF'
import sys
import samantic, samantic._C as C
print(samantic.__file__); print(C.__file__); print(C.build_info())
assert C.__file__.startswith(sys.argv[1]), f"{C.__file__} shadows the fresh build in {sys.argv[1]}"
EOF
}

step_doctor() {
  set -e
  "$PYTHON" -m samantic.cli.main doctor --json > "$OUT_DIR/doctor.json"
  cat "$OUT_DIR/doctor.json"
  COLUMNS=160 "$PYTHON" -m samantic.cli.main doctor
  # fail unless the CUDA backend is compiled in and its kernels load on the GPU
  "$PYTHON" - "$OUT_DIR/doctor.json" <<'EOF'
import json, os, sys
r = json.load(open(sys.argv[1]))
k = r["kernels"]
print("compiled:", k.get("compiled"), "archs:", k.get("cuda_archs"), "cuda:", k.get("usable", {}).get("cuda"))
if os.environ.get("CPU_ONLY") == "1":
    raise SystemExit(0)
assert "cuda" in k["compiled"], "samantic._C has no CUDA backend"
assert k["usable"]["cuda"]["usable"], k["usable"]["cuda"]
EOF
}

step_tests() {
  # only the files with gpu tests: a collection error elsewhere (a module this
  # machine lacks) must not stop them
  local files
  files=$(grep -lE "mark\.gpu|DEVICES" "$ROOT"/tests/test_*.py | tr '\n' ' ')
  echo "files: $files"
  cd "$ROOT" && "$PYTHON" -m pytest -m gpu -p no:cacheprovider -q -rA --continue-on-collection-errors \
    --junitxml="$OUT_DIR/pytest-gpu.xml" $files
}

step_amg() {
  if [[ "$CPU_ONLY" == 1 ]]; then
    "$PYTHON" "$ROOT/benchmarks/amg_vs_reference.py" --device cpu --in-process --warmup 0 --repeats 1 \
      --cases sam_nano:nano:demo-900001 --out "$OUT_DIR"
  else
    # 3 cases x (1 warm-up + 2 timed calls) per path: the thresholds-0 case alone is ~25 s
    # of segment-anything calls; sam_vit_b at thresholds 0 (random weights) did not finish
    # within the first run's 150 s and is left out
    "$PYTHON" "$ROOT/benchmarks/amg_vs_reference.py" --device cuda --warmup 1 --repeats 2 \
      --cases sam_nano:nano:demo-900001,sam_nano:thresholds-0:demo-900004,sam_vit_b:default:demo-900001 \
      --out "$OUT_DIR"
  fi
}

step_postprocess() {
  if [[ "$CPU_ONLY" == 1 ]]; then
    "$PYTHON" "$ROOT/benchmarks/postprocess.py" --device cpu --sizes 320x240 --kinds blobs --masks 8 --repeats 1 \
      --out "$OUT_DIR"
  else
    # two worker processes per (size, kind), each importing torch and starting CUDA: ~30 s
    # a pair on a loaded machine; the report is written only at the end
    "$PYTHON" "$ROOT/benchmarks/postprocess.py" --device cuda --sizes 1024x768 --kinds blobs,noise \
      --repeats 3 --out "$OUT_DIR"
  fi
}

export -f step_env step_wheels step_build step_doctor step_tests step_amg step_postprocess

# --------------------------------------------------------------------------- run

log "out: $OUT_DIR; python: $PYTHON; budget ${BUDGET}s; device $DEVICE; CUDA archs $CUDA_ARCHS"
step env 30 step_env

# exported before the wheels step: its import check runs in a child `bash -c` and
# must see the wheels it installs, as every later step does (the first run exported
# this only after the step, so the check reported segment_anything missing)
if [[ -n "$(ls "$WHL"/*.whl 2>/dev/null)" ]]; then
  export PYTHONPATH=$GPU_CHECK_TMP/site${PYTHONPATH:+:$PYTHONPATH}
fi
step wheels 60 step_wheels

if [[ "$NO_BUILD" == 1 ]]; then
  printf 'build\tskipped\t-\t0\t-\n' >> "$STEPS_TSV"
  log "build: skipped (--no-build): $($PYTHON -c 'import samantic._C as C; print(C.__file__)' 2>&1)"
else
  step build 240 step_build
  export PYTHONPATH=$GPU_CHECK_TMP/pkg${PYTHONPATH:+:$PYTHONPATH}
fi

step doctor 45 step_doctor
step tests 90 step_tests
# postprocess (bounded) before amg, which then gets what is left of the budget (150 s or more
# when the earlier steps take the first run's 77 s), up to 180 s
step postprocess 90 step_postprocess
step amg 180 step_amg

# --------------------------------------------------------------------------- summary
"$PYTHON" - "$OUT_DIR" "$BUDGET" "$START" "$FAILED" <<'EOF' || FAILED=1
import csv, json, os, sys, time
import xml.etree.ElementTree as ET
from pathlib import Path

out, budget, start, failed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
steps = list(csv.DictReader(open(out / "steps.tsv"), delimiter="\t"))
summary = {"ok": not failed, "seconds": round(time.time() - start, 1), "budget_s": budget,
           "device": os.environ.get("DEVICE"), "cuda_archs": os.environ.get("CUDA_ARCHS"), "steps": steps}
lines = [f"# gpu-check: {'all steps ok' if not failed else 'SOME STEPS FAILED'}", "",
         f"{summary['seconds']:.0f} s of a {budget} s budget; device {summary['device']}; "
         f"built for CUDA archs {summary['cuda_archs']}.", "", "| step | status | rc | seconds | log |", "|---|---|---|---|---|"]
lines += [f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['log']} |" for s in steps]
doctor = out / "doctor.json"
if doctor.exists():
    try:
        k = json.loads(doctor.read_text())["kernels"]
        summary["kernels"] = {"compiled": k.get("compiled"), "cuda_archs": k.get("cuda_archs"),
                              "cuda": k.get("usable", {}).get("cuda"), "build": k.get("build")}
        lines += ["", f"Kernels: compiled {k.get('compiled')}, CUDA archs {k.get('cuda_archs')}; "
                      f"cuda: {k.get('usable', {}).get('cuda')}"]
    except Exception as e:
        lines += ["", f"doctor.json unreadable: {e}"]
junit = out / "pytest-gpu.xml"
if junit.exists():
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        t = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        summary["tests"] = t
        lines += ["", f"gpu tests: {t['tests']} collected, {t['tests'] - t['failures'] - t['errors'] - t['skipped']} passed, "
                      f"{t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"]
    except Exception as e:
        lines += ["", f"pytest-gpu.xml unreadable: {e}"]
for name in ("amg_vs_reference_cuda", "amg_vs_reference", "postprocess_cuda", "postprocess"):
    md = out / f"{name}.md"
    if md.exists():
        lines += ["", f"## {name}", "", md.read_text().strip()]
(out / "summary.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print("\n".join(lines))
EOF

log "done in $(( $(date +%s) - START ))s; results in $OUT_DIR"
if (( FAILED )); then
  log "FAILED: $(awk -F'\t' 'NR > 1 && $2 != "ok" && $2 != "skipped" {printf "%s(%s) ", $1, $2}' "$STEPS_TSV")"
  exit 1
fi
exit 0
