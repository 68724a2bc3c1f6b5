# samantic developer entry points. `make test` and `make demo` work on a fresh
# clone: they create .venv with the pinned development environment, build the
# compiled module samantic._C (CPU always, CUDA too when nvcc is found) and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
CSRC := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: all env build test test-all test-asan fuzz demo bench gpu-check gpu-wheels clean

all: build

$(VENV)/.env-stamp: $(CONSTRAINTS) requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c $(CONSTRAINTS) -r requirements/dev.txt
	touch $@

env: $(VENV)/.env-stamp

$(VENV)/.build-stamp: $(VENV)/.env-stamp $(CSRC)
	$(PIP) install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.build-stamp

test: build
	$(PY) -m pytest -q

test-all: build
	$(PY) -m pytest -q -m "not gpu"

# The kernel tests (tests/test_ops_*.py) against an ASan + UBSan build of samantic._C made in
# build/asan (gcc, CPU only; the .venv's build stays as it is); fails on any sanitizer report.
test-asan: env
	VENV=$(VENV) bash fuzz/asan_test.sh

# Every atheris harness of fuzz/ for FUZZ_SECONDS each (crash inputs, corpus and logs under
# runs/fuzz/); FUZZ_ASAN=1 runs them against the sanitizer build. See fuzz/README.md.
FUZZ_SECONDS ?= 60
FUZZ_ASAN ?= 0
fuzz: build
	VENV=$(VENV) FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_ASAN=$(FUZZ_ASAN) bash fuzz/run.sh

demo: build
	$(VENV)/bin/samantic doctor
	$(VENV)/bin/samantic demo --out runs/demo

bench: build
	$(PY) benchmarks/postprocess.py --out benchmarks/results

# The prepared run for the occasional GPU machine (scripts/gpu_check.sh): its
# system $(PYTHON), not .venv; builds samantic._C with CUDA for $(CUDA_ARCHS) in
# /tmp, runs the gpu tests and the GPU benchmarks, writes OUT_DIR (default:
# $$OUT/gpu-check when OUT is set, else runs/gpu-check). GPU_CHECK_FLAGS=--cpu
# is a dry run on a machine without a GPU.
OUT_DIR ?=
CUDA_ARCHS ?= 90
GPU_CHECK_FLAGS ?=
gpu-check:
	PYTHON=$(PYTHON) CUDA_ARCHS='$(CUDA_ARCHS)' bash scripts/gpu_check.sh $(GPU_CHECK_FLAGS) $(OUT_DIR)

# fills the ignored .whl/ that gpu-check brings along (segment-anything, pycocotools, Python headers)
gpu-wheels:
	bash scripts/gpu_check_wheels.sh

clean:
	rm -rf build runs $(VENV)/.build-stamp
