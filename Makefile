# Two commands on a fresh machine: `make demo` and `make test`. Both set themselves up.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
BUILD   ?= build/plugins
STAMP   := $(VENV)/.sn_deploy_installed

.PHONY: setup plugins demo test bench clean

setup: $(STAMP)

# torch is pinned to the 2.13.0 CPU wheel; installing it first keeps pip from resolving a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# The native kernels (CPU always; CUDA when nvcc is found; TensorRT plugin when headers are found).
# TensorRT headers: yours via TENSORRT_INCLUDE_DIR, else TensorRT 10.14's from a small PyPI wheel.
TENSORRT_INCLUDE_DIR ?= $(shell $(PY) scripts/trt_headers.py build/tensorrt-headers 2>/dev/null)
# ONNX Runtime C++ API headers for libsn_ort_op.so: yours, else Debian's libonnxruntime-dev (API 21).
ONNXRUNTIME_INCLUDE_DIR ?= $(shell scripts/ort_headers.sh build/ort-headers 2>/dev/null)

plugins: setup
	cmake -S plugins -B $(BUILD) -DCMAKE_BUILD_TYPE=Release \
	  $(if $(TENSORRT_INCLUDE_DIR),-DTENSORRT_INCLUDE_DIR=$(TENSORRT_INCLUDE_DIR)) \
	  $(if $(ONNXRUNTIME_INCLUDE_DIR),-DONNXRUNTIME_INCLUDE_DIR=$(ONNXRUNTIME_INCLUDE_DIR)) $(CMAKE_ARGS)
	cmake --build $(BUILD) -j2

demo: setup plugins
	$(PY) scripts/demo.py --output-dir demo_out

test: setup plugins
	$(PY) -m pytest -q

bench: setup plugins
	$(PY) scripts/bench_cpu.py
	$(PY) scripts/bench_kernels.py

clean:
	rm -rf build demo_out .pytest_cache
