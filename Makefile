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

.PHONY: all sysdeps venv build demo test results clean distclean

all: build

sysdeps:
	@command -v ccache >/dev/null && command -v ninja >/dev/null && command -v cmake >/dev/null \
	  || { apt-get update -qq && apt-get install -y -qq ccache ninja-build cmake >/dev/null; }
	@command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null \
	  || { apt-get update -qq && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user >/dev/null; }

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

build: sysdeps venv
	$(PY) patches/prepare.py $(BUILD)/llama.cpp
	cmake -S . -B $(CBUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) \
	  -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) >$(BUILD)/cmake-configure.log \
	  || { cat $(BUILD)/cmake-configure.log; exit 1; }
	cmake --build $(CBUILD) --target lrq_all -j $(JOBS)

demo: build
	$(PY) -m lrq.cli.demo

test: build
	$(PY) -m pytest -q -rs tests

# docs/RESULTS.md's generated section, docs/results/*.csv|png (bench/results.py --help)
results: build
	$(PY) bench/results.py

clean:
	rm -rf $(CBUILD) python/lrq/_native*.so python/lrq/_build.json

distclean: clean
	rm -rf $(BUILD) $(VENV)
