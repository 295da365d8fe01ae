# `make demo` and `make test` work on a fresh machine with only Python >= 3.11:
# both create (or reuse) .venv inside the repository and install the project there;
# the demo needs only the library's own dependencies, the tests also the dev extra
# (the PyTorch / diffusers references, gradio, selenium, Jupyter) and the tpu extra
# (libtpu, the TPU compiler that `dalle2-jax plan` and its tests use on a CPU host).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BASE_STAMP := $(VENV)/.installed-base
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo demo-quick test bench venv clean

$(BASE_STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $(BASE_STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,tpu]"
	touch $(BASE_STAMP) $(STAMP)

venv: $(STAMP)

demo: $(BASE_STAMP)
	$(BIN)/dalle2-jax demo --workdir $(WORKDIR)

demo-quick: $(BASE_STAMP)
	$(BIN)/dalle2-jax demo --quick --workdir $(WORKDIR)-quick

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/python -m dalle2_jax.bench unet-train --config configs/unet.py:bench --batch 8

clean:
	rm -rf $(VENV) .pytest_cache
