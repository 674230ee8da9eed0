# `make demo` and `make test` work on a fresh machine: they create .venv and install the pinned stack.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= workdirs/demo
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test install data bench clean-demo

$(STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

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
