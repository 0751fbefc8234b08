# The two set-up commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create the environment on a fresh machine first: torch's CPU build on its own, then the package.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DEVICE ?= auto
WORLD_PRESET ?= default
# runs/demo for the shipped default world, runs/demo-NAME for a world built from another preset
DEMO_OUT ?= runs/demo$(if $(filter default,$(WORLD_PRESET)),,-$(WORLD_PRESET))

.PHONY: env demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

env: $(VENV)/.installed

demo: env
	HF_HUB_OFFLINE=1 $(BIN)/lcm demo --out $(DEMO_OUT) --device $(DEVICE) --world-preset $(WORLD_PRESET)

test: env
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs
