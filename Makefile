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

.PHONY: install demo test test-all test-parity lint bench conf clean

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

# Resume, DDP, cache and reload parity once more with other kernels (as on another CPU): they must
# agree under any kernel set, since they compare the same operations on the same inputs.
test-parity: install
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -m "parity and not slow and not gpu"

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/levels.py

conf: install
	$(BIN)/python -c "from lightning_quantum.levels import write_level_configs; write_level_configs('conf/level')"

clean:
	rm -rf $(VENV) outputs multirun lightning_logs
