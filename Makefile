# `make demo` and `make test` work on a fresh machine with only Python >= 3.11:
# both create (or reuse) .venv inside the repository and install the project there.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo demo-quick test bench venv clean

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,tpu]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dalle2-jax demo --workdir $(WORKDIR)

demo-quick: $(STAMP)
	$(BIN)/dalle2-jax demo --quick --workdir $(WORKDIR)-quick

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/python -m dalle2_jax.bench unet-train --config configs/unet.py:bench --batch 8

clean:
	rm -rf $(VENV) .pytest_cache
