#!/usr/bin/env bash
# `make test-asan`: builds samantic._C with ASan + UBSan (fuzz/asan_build.sh, into
# build/asan; the .venv's build is not touched) and runs the kernel tests
# (tests/test_ops_*.py, not the gpu ones) against it, with the sanitizer
# runtimes preloaded into Python. Fails on a test failure and on any sanitizer
# report (the first one aborts the run; the log is checked too).
#
#   bash fuzz/asan_test.sh [extra pytest args]
# env: VENV (.venv), ASAN_BUILD_DIR (build/asan), ASAN_LOG_DIR (runs/asan), CXX (g++)
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
BUILD_DIR=${ASAN_BUILD_DIR:-build/asan}
LOG_DIR=${ASAN_LOG_DIR:-runs/asan}
mkdir -p "$LOG_DIR"

so=$(bash fuzz/asan_build.sh "$BUILD_DIR" | tail -n 1) || { echo "test-asan: the sanitizer build failed" >&2; exit 1; }
[[ -f $so ]] || { echo "test-asan: no module built ($so)" >&2; exit 1; }
runtimes="$(readlink -f "$("${CXX:-g++}" -print-file-name=libasan.so)") $(readlink -f "$("${CXX:-g++}" -print-file-name=libubsan.so)")"

log=$LOG_DIR/pytest.log
echo "test-asan: samantic._C = $so; LD_PRELOAD = $runtimes; log: $log"
# --capture=sys: pytest's default fd-level capture would swallow a sanitizer report (written to
# fd 2 just before the process aborts); this way it reaches the terminal and the log.
# detect_leaks=0: CPython's own allocations at exit are not ours (noise).
# allocator_may_return_null=1: an impossible allocation fails like it does
# without ASan (MemoryError / std::bad_alloc) instead of aborting.
# SAMANTIC_NUM_THREADS=2: the thread pool stays in use on a 1-core machine too.
# SAMANTIC_CUDA=OFF: this build is CPU-only on purpose (the test that wants CUDA when nvcc exists skips).
env LD_PRELOAD="$runtimes" SAMANTIC_CUDA=OFF \
  ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}" \
  SAMANTIC_C_PATH="$so" SAMANTIC_NUM_THREADS="${SAMANTIC_NUM_THREADS:-2}" \
  PYTHONPATH="$PWD/fuzz${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" -m pytest -q -p no:cacheprovider --capture=sys -p asan_plugin tests/test_ops_*.py "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: UndefinedBehaviorSanitizer|ERROR: LeakSanitizer" "$log"; then
  echo "test-asan: FAILED, sanitizer report in $log" >&2
  exit 1
fi
if [[ $rc -ne 0 ]]; then
  echo "test-asan: FAILED (pytest exit code $rc), see $log" >&2
  exit "$rc"
fi
echo "test-asan: OK, no sanitizer report ($log)"
