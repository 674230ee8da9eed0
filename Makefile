# `make demo` and `make test` work on a fresh machine: they create .venv and install the pinned stack.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/demo
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-export install data bench
EXPORT_VENV ?= .venv-export
EXPORT_STAMP := $(EXPORT_VENV)/.installed

$(STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Accelerators: the same environment plus JAX's TPU or CUDA 12 extra at the pinned jax
# (requirements-tpu.txt / requirements-cuda.txt); launch/tpu_pod.sh and launch/gpu_slurm.sh use them.
.PHONY: install-tpu install-cuda
$(VENV)/.installed-%: $(STAMP) requirements-%.txt
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements.txt -r requirements-$*.txt
	touch $@

install-tpu: $(VENV)/.installed-tpu
install-cuda: $(VENV)/.installed-cuda

# Fashion-MNIST (Debian package) for the kNN/linear learning checks; tests skip without it.
data:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); fi

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) -m ssl_jax.main --config=configs/detcon_b.py:demo --workdir=$(DEMO_DIR)

test: $(STAMP) data
	$(PY) -m pytest -q -n 2 --dist=loadfile tests

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# PyTorch export checked against real torchvision/timm: torchvision 0.29.1 needs torch 2.14.1 (a
# ~5.5 GB CUDA build on x86_64), so it lives in its own venv beside the main one.
$(EXPORT_STAMP): setup.py requirements.txt requirements-export.txt
	test -x $(EXPORT_VENV)/bin/python || $(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/python -m pip install -qq --disable-pip-version-check -r requirements.txt -r requirements-export.txt
	$(EXPORT_VENV)/bin/python -m pip install -qq --disable-pip-version-check --no-deps -e .
	touch $(EXPORT_STAMP)

test-export: $(EXPORT_STAMP)
	SSL_JAX_REQUIRE_TORCH=1 $(EXPORT_VENV)/bin/python -m pytest -q tests/test_export.py tests/test_torch_*.py
