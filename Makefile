# lrq — the two set-up commands of the README are `make demo` and `make test`.
# Everything (system packages, a virtual environment, the pinned + patched llama.cpp, the
# Python extension) is installed or built on demand; a second run only rebuilds what changed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUILD  := build
CBUILD := $(BUILD)/cmake
JOBS   ?= $(shell nproc)

# ccache: one cache under ~/.cache for every clone; paths are made relative so that a fresh
# clone in another directory still hits it.
export CCACHE_DIR      ?= $(HOME)/.cache/lrq/ccache
export CCACHE_BASEDIR  := $(CURDIR)
export CCACHE_NOHASHDIR := 1
export CCACHE_MAXSIZE  ?= 5G

# CPU torch: the local wheel when the machine has one (pip's find-links), else PyPI's CPU index
# (plain PyPI would bring the multi-GB CUDA build).
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# cmake and ninja: the system's when installed, else from PyPI into the venv (no root needed).
CMAKE := $(or $(shell command -v cmake 2>/dev/null),$(abspath $(VENV))/bin/cmake)
NINJA := $(or $(shell command -v ninja 2>/dev/null),$(abspath $(VENV))/bin/ninja)

.PHONY: all toolchain testdeps venv build demo test results clean distclean

all: build

# What the build needs from the system: a C/C++ compiler and the Python headers.  As root on
# Debian / Ubuntu they are installed; otherwise a clear message says what is missing.
toolchain:
	@command -v c++ >/dev/null && command -v cc >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && apt-get update -qq && apt-get install -y -qq g++ >/dev/null; } \
	  || { echo "error: no C/C++ compiler (cc, c++): install g++ (Debian/Ubuntu: apt-get install g++)" >&2; exit 1; }
	@$(PYTHON) -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && apt-get update -qq && apt-get install -y -qq python3-dev >/dev/null; } \
	  || { echo "error: no Python.h for $(PYTHON): install the Python headers (Debian/Ubuntu: apt-get install python3-dev)" >&2; exit 1; }
	@command -v ccache >/dev/null || echo "note: ccache not found; builds work without it, rebuilds are slower"

# Only the tests need these (tests/test_neon.py: the aarch64 cross compiler and qemu-user;
# tests/test_cuda_compile.py: the CUDA compiler from PyPI, pinned, into the venv -- no GPU needed).
CUDA_PIP := nvidia-cuda-nvcc==13.5.37 nvidia-cuda-crt==13.5.37 nvidia-cuda-runtime==13.5.37 \
            nvidia-nvvm==13.5.37 nvidia-cuda-cccl==13.3.5.0.6
testdeps: venv
	@command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	       && apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null; } \
	  || { echo "error: tests/test_neon.py needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu qemu-user)" >&2; exit 1; }
	@$(PY) -m pip show nvidia-cuda-nvcc nvidia-cuda-crt nvidia-cuda-runtime nvidia-nvvm nvidia-cuda-cccl 2>/dev/null \
	     | grep -c '^Version: 13\.' | grep -qx 5 \
	  || $(PY) -m pip install -q $(CUDA_PIP) \
	  || { echo "error: tests/test_cuda_compile.py needs the pip CUDA compiler: $(PY) -m pip install $(CUDA_PIP)" >&2; exit 1; }

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if $(PY) -m pip download -q --no-deps --no-index -d $(VENV)/.torch-probe torch==$(TORCH_VERSION) 2>/dev/null; \
	then $(PY) -m pip install -q torch==$(TORCH_VERSION); \
	else $(PY) -m pip install -q torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) \
	       --extra-index-url https://pypi.org/simple; fi
	rm -rf $(VENV)/.torch-probe
	$(PY) -m pip install -q -e '.[dev]'
	command -v cmake >/dev/null || $(PY) -m pip install -q 'cmake>=3.21'
	command -v ninja >/dev/null || $(PY) -m pip install -q ninja
	touch $@

venv: $(VENV)/.installed

build: toolchain venv
	$(PY) patches/prepare.py $(BUILD)/llama.cpp
	$(CMAKE) -S . -B $(CBUILD) -G Ninja -DCMAKE_MAKE_PROGRAM=$(NINJA) -DCMAKE_BUILD_TYPE=Release \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) >$(BUILD)/cmake-configure.log \
	  || { cat $(BUILD)/cmake-configure.log; exit 1; }
	$(CMAKE) --build $(CBUILD) --target lrq_all -j $(JOBS)

demo: build
	$(PY) -m lrq.cli.demo

test: build testdeps
	$(PY) -m pytest -q -rs tests

# docs/RESULTS.md's generated section, docs/results/*.csv|png (bench/results.py --help)
results: build
	$(PY) bench/results.py

clean:
	rm -rf $(CBUILD) python/lrq/_native*.so python/lrq/_build.json

distclean: clean
	rm -rf $(BUILD) $(VENV)
