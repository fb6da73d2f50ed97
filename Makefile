# Set-up, build and checks of epa_ext. Every target installs what it needs into .venv first, so
# `make demo` and `make test` work on a fresh machine and are quick when nothing changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is the CUDA 13.0 build so that the CUDA sources compile even where no GPU is present.
TORCH_SPEC ?= torch==2.14.1
DEPS := numpy "cmake>=3.26" ninja "scikit-build-core>=0.10" pybind11 pytest pytest-xdist hypothesis \
	transformers tokenizers safetensors datasets peft tqdm matplotlib pyyaml tensorboard \
	"trl>=1.16,<1.17" liger-kernel
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.epa_ext-installed
SOURCES := CMakeLists.txt pyproject.toml $(wildcard cmake/*) $(wildcard csrc/*) $(shell find epa_ext -name '*.py')

.PHONY: demo test build dev bench clean gpu-wheels

demo: $(BUILD_STAMP)
	$(VENV)/bin/epa-demo

# Two pytest workers, each taking whole test files (--dist loadfile: a file's module fixtures are
# computed once): most of the suite's time is real epa-train / epa-demo processes, which leave a
# core idle while they start and load; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(BUILD_STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile python_tests

build: $(BUILD_STAMP)

bench: $(BUILD_STAMP)
	$(PY) bench/bench_logps.py

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(PY) Makefile
	@echo "make: installing torch and the dependencies into $(VENV) (first time only: about 3 minutes)"
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)" $(DEPS)
	touch $@

# --no-build-isolation: build against the torch installed above (an isolated build would fetch
# a second, possibly newer, torch). The build directory is kept, so rebuilds are incremental.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	@echo "make: building epa_ext (C++ and CUDA kernels; a full build takes a few minutes on 2 cores)"
	$(PIP) install --quiet --no-build-isolation --no-deps .
	touch $@

# In-place build for development: compiles into build/dev and links the module into epa_ext/, so
# `PYTHONPATH=. $(VENV)/bin/pytest python_tests` runs the source tree without reinstalling.
# DEV_CMAKE_ARGS="-DEPA_EXT_CUDA=OFF" skips the CUDA sources for a quicker edit-compile loop.
dev: $(DEPS_STAMP)
	$(VENV)/bin/cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja -DPython_EXECUTABLE=$(abspath $(PY)) $(DEV_CMAKE_ARGS)
	$(VENV)/bin/cmake --build build/dev
	ln -sf ../build/dev/$$(cd build/dev && ls _C*.so) epa_ext/

# Wheels of trl 1.16, liger-kernel, datasets and what else the GPU machine's image lacks, for its
# Python 3.12, without torch (bench/gpu_wheels.py says how): that machine has no package registry,
# so bench/gpu_check.sh installs them offline from this git-ignored folder, carried there with the
# working tree. Downloads only: it needs the venv's Python and pip, not the dependencies or the build.
GPU_WHEELS ?= gpu-wheels

gpu-wheels: $(PY)
	$(PY) bench/gpu_wheels.py $(GPU_WHEELS)

clean:
	rm -rf build $(BUILD_STAMP) epa_ext/_C*.so
