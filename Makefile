# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup model demo test test-fast bench gpu-kit clean

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

# What a lent GPU machine lacks, in .gpu/ (git-ignored, ~20 MB) to carry there: the built-in's config and
# tokenizer (the GPU plans use random weights of its shape) and wheels of our HF stack. See bench/GPU.md.
GPU_WHEELS := transformers peft trl datasets dill multiprocess
gpu-kit: model
	rm -rf .gpu && mkdir -p .gpu/kit .gpu/whl
	cd "$$($(BIN)/python -c "from tunelab.models import pull; print(pull('smollm2-135m'))")" && cp config.json tokenizer.json tokenizer_config.json \
	  chat_template.jinja generation_config.json $(CURDIR)/.gpu/kit/
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
	  $$($(BIN)/python -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in '$(GPU_WHEELS)'.split()))")
	du -sh .gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
