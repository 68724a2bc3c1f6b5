#!/usr/bin/env bash
# Builds samantic._C with gcc's AddressSanitizer + UndefinedBehaviorSanitizer
# into its own build folder (default build/asan), CPU backend only. The .venv's
# installed build is left alone; fuzz/c_override.py loads this one instead
# (SAMANTIC_C_PATH). Prints the path of the built module on its last line.
#
#   bash fuzz/asan_build.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PY:-$VENV/bin/python}
BUILD_DIR=${1:-build/asan}
export PATH="$PWD/$VENV/bin:$PATH"

# float-cast-overflow is not part of gcc's -fsanitize=undefined; add it (float
# -> int conversions out of range are UB, and the resize planning has some).
SAN="-fsanitize=address,undefined,float-cast-overflow"
CXXFLAGS_SAN="$SAN -fno-omit-frame-pointer -fno-sanitize-recover=undefined,float-cast-overflow -g"

cmake -S . -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER="${CXX:-g++}" \
  -DCMAKE_CXX_FLAGS="$CXXFLAGS_SAN" \
  -DCMAKE_MODULE_LINKER_FLAGS="$SAN" \
  -DCMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF \
  -DSAMANTIC_CUDA=OFF \
  -DPython_EXECUTABLE="$PWD/$PY" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >"$BUILD_DIR.configure.log" 2>&1 \
  || { cat "$BUILD_DIR.configure.log"; exit 1; }
cmake --build "$BUILD_DIR" -j "${JOBS:-2}" >&2  # progress on stderr: stdout is the module path
so=$(ls "$BUILD_DIR"/_C.*.so)
# the sanitizer runtimes must really be linked in
libs=$(ldd "$so")
for lib in libasan libubsan; do
  [[ $libs == *"$lib"* ]] || { echo "error: $so does not link $lib" >&2; exit 1; }
done
echo "$PWD/$so"
