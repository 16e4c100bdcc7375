# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup model demo test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0   # pinned first: the CPU build, not gigabytes of CUDA
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

model: setup
	$(BIN)/tunelab models pull smollm2-135m

demo: model
	$(BIN)/tunelab train examples/quickstart.yaml output=runs/quickstart

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

BENCH ?= full
bench: model
	$(BIN)/python bench/run.py $(BENCH)

clean:
	rm -rf $(VENV) runs .pytest_cache
