#!/usr/bin/env bash
# `make fuzz`: runs every atheris harness fuzz/fuzz_*.py (or the ones named) for
# FUZZ_SECONDS each, one after the other, on a corpus that grows between runs.
#
#   bash fuzz/run.sh [HARNESS ...]          e.g.  bash fuzz/run.sh rle_string nms
#
# env:
#   FUZZ_SECONDS  seconds per harness (default 60)
#   FUZZ_OUT      output folder (default runs/fuzz): corpus/<harness>/ (seeds +
#                 what libFuzzer kept), <harness>/ (crash-*, timeout-*, oom-*
#                 inputs), <harness>-plain.log / -asan.log, summary.tsv
#   FUZZ_ASAN=1   against the ASan + UBSan build (fuzz/asan_build.sh, build/asan)
#                 with the sanitizer runtimes preloaded; atheris' Python coverage
#                 does not work then (libasan provides the coverage hooks), so
#                 this pass mutates the corpus of an earlier plain run blindly
#   FUZZ_ARGS     more libFuzzer flags (e.g. -seed=1 -jobs=2)
#   VENV          the virtualenv (default .venv)
# A crash is reproduced with: .venv/bin/python fuzz/fuzz_<harness>.py <crash file>
# Exit status: 0 when every harness ran its time without a finding.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=$VENV/bin/python
SECONDS_EACH=${FUZZ_SECONDS:-60}
OUT=${FUZZ_OUT:-runs/fuzz}
mkdir -p "$OUT"

if [[ $# -gt 0 ]]; then
  harnesses=("$@")
else
  harnesses=()
  for f in fuzz/fuzz_*.py; do h=${f#fuzz/fuzz_}; harnesses+=("${h%.py}"); done
fi

envs=()
if [[ ${FUZZ_ASAN:-0} == 1 ]]; then
  so=$(bash fuzz/asan_build.sh "${ASAN_BUILD_DIR:-build/asan}" | tail -n 1) || { echo "fuzz: ASan build failed" >&2; exit 1; }
  runtimes="$(readlink -f "$("${CXX:-g++}" -print-file-name=libasan.so)") $(readlink -f "$("${CXX:-g++}" -print-file-name=libubsan.so)")"
  envs=(LD_PRELOAD="$runtimes" SAMANTIC_C_PATH="$so"
        ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:abort_on_error=1"
        UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1")
  # abort_on_error: a report ends in SIGABRT, which libFuzzer catches to write the crash input
  # (UBSan's own exit path would skip that)
fi

summary=$OUT/summary.tsv
[[ -f $summary ]] || printf 'date\tharness\tbuild\tseconds\truns\texit\tlog\n' >"$summary"
status=0
for h in "${harnesses[@]}"; do
  script=fuzz/fuzz_$h.py
  [[ -f $script ]] || { echo "fuzz: no harness $script" >&2; status=2; continue; }
  corpus=$OUT/corpus/$h
  mkdir -p "$corpus" "$OUT/$h"
  "$PY" "$script" --write-seeds "$corpus"
  build=plain
  [[ ${FUZZ_ASAN:-0} == 1 ]] && build=asan
  log=$OUT/$h-$build.log
  echo "fuzz: $h for ${SECONDS_EACH}s ($log)"
  start=$(date +%s)
  # -timeout: one input taking 60 s is a hang; -rss_limit_mb: a blow-up is a finding
  env "${envs[@]}" nice -n "${FUZZ_NICE:-10}" "$PY" "$script" "$corpus" -max_total_time="$SECONDS_EACH" \
    -artifact_prefix="$OUT/$h/" -timeout=60 -rss_limit_mb=4096 -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  took=$(( $(date +%s) - start ))
  runs=$(grep -oE '^Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -n 1)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$h" "$build" "$took" "${runs:-?}" "$rc" "$log" >>"$summary"
  if [[ $rc -ne 0 ]]; then
    status=1
    echo "fuzz: $h FOUND SOMETHING (exit $rc) after ${took}s:" >&2
    grep -E 'Finding:|Error|ERROR|SUMMARY|Test unit written' "$log" | tail -n 8 >&2
  else
    echo "fuzz: $h clean, ${runs:-?} runs in ${took}s"
  fi
done
exit $status
