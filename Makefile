# shoptune: make help lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAGES := synthesize dataset finetune pad quantize infer evaluate
PROFILE ?= demo
# Where stages run: RUNNER=local|docker (DEMO_RUNNER, its old name, works too), else
# $SHOPTUNE_RUNNER. make chooses no default of its own: with neither set, shoptune's default
# applies (local, shoptune/cli.py), so `make STAGE PROFILE=P` runs where `dvc repro STAGE@P` does.
RUNNER ?= $(or $(DEMO_RUNNER),$(SHOPTUNE_RUNNER))
# hands the choice, if any, to shoptune and to the dvc it runs
WITH_RUNNER = $(if $(RUNNER),SHOPTUNE_RUNNER=$(RUNNER))
# the docker runner needs the base image first (built locally, no registry)
BASE_FOR = $(if $(filter docker,$(1)),base-image)

.PHONY: help setup lock envs images base-image demo demo-rerun reproduce test test-fast lint bench clean \
	clean-stage $(STAGES) plan doctor gpu-check

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort | expand -t 18
	@echo "stage targets     one per stage, with what it needs: $(STAGES) clean-stage"
	@echo "                  (make pad PROFILE=demo; clean-stage runs the clean stage)"

$(BIN)/shoptune: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

setup: $(BIN)/shoptune  ## create the host environment (.venv: shoptune, DVC, Docker SDK, uv, test tools)

lock: setup  ## regenerate every docker/IMAGE/lock-{cpu,cuda}.txt from the requirements (uv)
	$(BIN)/shoptune lock --uv $(BIN)/uv

envs: setup  ## build every stage's local environment (.venvs/IMAGE) from the locked wheels
	$(BIN)/shoptune --runner local build

base-image:  ## build the local base image shoptune/base:bookworm (debootstrap, no registry)
	sh docker/base/build.sh

images: setup base-image  ## build every stage's Docker image from the locked wheels (offline build)
	$(BIN)/shoptune --runner docker build

# the demo's ends: its scores, and its AWQ model (on a CPU, infer answers with the padded model)
DEMO_TARGETS := evaluate@demo quantize@demo

demo: setup $(call BASE_FOR,$(RUNNER))  ## run the whole pipeline on the demo profile (CPU, offline; RUNNER=local|docker)
	$(WITH_RUNNER) $(BIN)/shoptune build
	$(WITH_RUNNER) $(BIN)/dvc repro $(DEMO_TARGETS)
	@cat runs/demo/evaluate/report.md

demo-rerun: setup $(call BASE_FOR,$(RUNNER))  ## run every demo stage again even if up to date (e.g. RUNNER=docker after a local run)
	$(WITH_RUNNER) $(BIN)/shoptune build
	$(WITH_RUNNER) $(BIN)/dvc repro --force $(DEMO_TARGETS)
	@cat runs/demo/evaluate/report.md

smol: setup  ## a real model (SmolLM2-135M-Instruct) finetuned on the demo's data, against the base (CPU, ~20 min)
	$(WITH_RUNNER) $(BIN)/shoptune build
	$(WITH_RUNNER) $(BIN)/dvc repro evaluate@smol evaluate@smol_base
	@$(BIN)/shoptune compare smol_base smol

reproduce: setup $(call BASE_FOR,$(RUNNER))  ## run the paper's recipe (GPU host; RUNNER=docker for containers; needs the data and base model, see README)
	$(WITH_RUNNER) $(BIN)/shoptune build --accelerator cuda
	$(WITH_RUNNER) $(BIN)/dvc repro evaluate@paper

plan: setup  ## does PROFILE fit its hardware? GPU memory, KV cache, RAM, disk (CONFIG=config.json TP=N)
	@$(BIN)/shoptune plan --profile $(PROFILE) $(if $(CONFIG),--config $(CONFIG)) $(if $(TP),--tensor-parallel-size $(TP))

doctor: setup  ## is this machine ready for PROFILE? Docker, NVIDIA runtime, GPUs, disk, RAM, API key
	@$(WITH_RUNNER) $(BIN)/shoptune doctor --profile $(PROFILE) $(if $(CONFIG),--config $(CONFIG))

# gpu-check is a test of the GPU paths, not a stage run: Docker unless RUNNER says otherwise
GPU_CHECK_RUNNER = $(or $(RUNNER),docker)
gpu-check: setup $(call BASE_FOR,$(GPU_CHECK_RUNNER))  ## on a GPU host: QLoRA, pad, AWQ, vLLM (awq, float16) on a tiny Qwen2 (GPU_CHECK_TP=N)
	$(BIN)/python -m tests.gpu_check --runner $(GPU_CHECK_RUNNER) --tensor-parallel-size $(or $(GPU_CHECK_TP),1)

$(STAGES): setup $(call BASE_FOR,$(RUNNER))
	$(WITH_RUNNER) $(BIN)/shoptune build
	$(WITH_RUNNER) $(BIN)/dvc repro $@@$(PROFILE)

clean-stage: setup $(call BASE_FOR,$(RUNNER))
	$(WITH_RUNNER) $(BIN)/shoptune build
	$(WITH_RUNNER) $(BIN)/dvc repro clean@$(PROFILE)

test: setup  ## run every test (unit, DVC end to end, Docker); sets up what it needs
	$(BIN)/pytest -v

test-fast: setup  ## the tests that need neither Docker nor the demo pipeline
	$(BIN)/pytest -v -m "not docker and not slow"

lint: setup  ## ruff
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup  ## benchmarks (timings go to runs/bench/)
	$(BIN)/python -m tests.bench

clean:  ## remove pipeline outputs and checkpoints (keeps environments, wheelhouse and DVC cache)
	rm -rf runs models
