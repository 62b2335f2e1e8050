# One entry point for people and CI: `make demo` trains and prints the report, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A machine counts as a GPU machine when nvidia-smi lists a device; elsewhere the CPU wheel of torch
# that lies on disk is installed first so that pip never pulls a CUDA build.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-all lint bench conf clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifneq ($(HAS_GPU),1)
	$(BIN)/python -m pip install --quiet $(TORCH_CPU)
endif
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lq-train level=quantum

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m "not gpu"

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/levels.py

conf: install
	$(BIN)/python -c "from lightning_quantum.levels import write_level_configs; write_level_configs('conf/level')"

clean:
	rm -rf $(VENV) outputs multirun lightning_logs
