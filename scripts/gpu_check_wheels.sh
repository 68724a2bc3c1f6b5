#!/usr/bin/env bash
# `make gpu-wheels`: fills the ignored .whl/ folder that travels with `make gpu-check`
# to the GPU machine, whose python3 (3.12, x86-64) lacks these: segment-anything
# (pure Python) and pycocotools (cp312 manylinux), at the pins of
# requirements/constraints.txt, downloaded with --no-deps (the machine's own numpy
# and torch must not be shadowed); plus the Python 3.12 headers as a tarball,
# used only if that interpreter has no Python.h.
#   scripts/gpu_check_wheels.sh [DEST=.whl] [PY312=python3.12 for the headers]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/.whl}
mkdir -p "$DEST"
pin() { grep -i "^$1==" "$ROOT/requirements/constraints.txt" | head -1; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for pkg in segment-anything pycocotools; do
  spec=$(pin "$pkg"); spec=${spec:-$pkg}
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
if [[ -z "${PY312:-}" ]]; then
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python /usr/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then PY312=$c; break; fi
  done
fi
if [[ -n "${PY312:-}" ]]; then
  inc=$("$PY312" -c 'import sysconfig; print(sysconfig.get_path("include"))')
  tar -C "$(dirname "$inc")" -czf "$DEST/python3.12-include.tar.gz" "$(basename "$inc")"
else
  echo "no python3.12 here: no header tarball (needed only where the GPU machine lacks Python.h)" >&2
fi
grep -qx '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null || { mkdir -p "$ROOT/.git/info" && echo '/.whl/' >> "$ROOT/.git/info/exclude"; } || true
ls -la "$DEST"; du -sh "$DEST"
