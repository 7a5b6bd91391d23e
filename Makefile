# shoptune: make help lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
DEMO_RUNNER ?= local
RUNNER ?= docker
STAGES := synthesize dataset finetune pad quantize infer evaluate
PROFILE ?= demo

.PHONY: help setup envs demo reproduce test test-fast lint images base-image bench clean clean-stage $(STAGES)

help:  ## list the targets
	@grep -E '^[a-zA-Z_ -]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort | expand -t 18

$(BIN)/shoptune: requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

setup: $(BIN)/shoptune  ## create the host environment (.venv: shoptune, DVC, Docker SDK, test tools)

envs: setup  ## build every stage's local environment (.venvs/IMAGE)
	shoptune env

demo: setup  ## run the whole pipeline on the demo profile (CPU, offline; DEMO_RUNNER=local|docker)
	SHOPTUNE_RUNNER=$(DEMO_RUNNER) dvc repro evaluate@demo
	@cat runs/demo/evaluate/report.md

reproduce: setup  ## run the paper's recipe (GPU host, Docker; needs the data and base model, see README)
	SHOPTUNE_RUNNER=$(RUNNER) dvc repro evaluate@paper

STAGE_RUNNER = $(if $(filter demo,$(PROFILE)),$(DEMO_RUNNER),$(RUNNER))
$(STAGES): setup  ## one target per stage (clean-stage for clean): make pad PROFILE=demo
	SHOPTUNE_RUNNER=$(STAGE_RUNNER) dvc repro $@@$(PROFILE)

clean-stage: setup  ## the clean stage (make clean removes outputs)
	SHOPTUNE_RUNNER=$(STAGE_RUNNER) dvc repro clean@$(PROFILE)

test: setup  ## run every test (unit, DVC end to end, Docker); sets up what it needs
	$(BIN)/pytest -v

test-fast: setup  ## the tests that need neither Docker nor the demo pipeline
	$(BIN)/pytest -v -m "not docker and not slow"

lint: setup  ## ruff
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

base-image:  ## build the local base image shoptune/base:bookworm (debootstrap, no registry)
	sh docker/base/build.sh

images: setup base-image  ## build every stage's Docker image
	shoptune images

bench: setup  ## benchmarks (timings go to runs/bench/)
	$(BIN)/python -m tests.bench

clean:  ## remove pipeline outputs and checkpoints (keeps environments and DVC cache)
	rm -rf runs models
