# make demo: set up .venv, fetch SmolLM2-135M-Instruct, run the whole pipeline on CPU.
# make test: set up .venv if missing, run the test suite (what CI runs).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# Models, DeepSpeed's JIT-built ops and HF caches stay inside the checkout.
export SFTFLOW_HOME ?= $(CURDIR)/.cache/sftflow
export HF_HOME ?= $(CURDIR)/.cache/huggingface
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= 1

.PHONY: install demo test test-fast lint clean

install: $(VENV)/.installed

# torch is pinned to the CPU build that pip finds locally; see README for GPU machines.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[test]"
	touch $@

demo: install
	$(BIN)/sftflow run configs/demo.yaml

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
