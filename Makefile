# The two set-up commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create the environment on a fresh machine first: torch on its own, then the package. Where pip's index serves
# torch's CUDA build (PyPI on Linux) and no GPU is wanted, TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the CPU one.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
DEVICE ?= auto
WORLD_PRESET ?= default
# runs/demo for the shipped default world, runs/demo-NAME for a world built from another preset
DEMO_OUT ?= runs/demo$(if $(filter default,$(WORLD_PRESET)),,-$(WORLD_PRESET))

.PHONY: env demo test serve clean

$(BIN)/python:
	@$(PY) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else f"$(PY) is Python {sys.version.split()[0]}; the pinned dependencies need 3.11 or later: make PY=python3.11 ...")'
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

env: $(VENV)/.installed

demo: env
	HF_HUB_OFFLINE=1 $(BIN)/lcm demo --out $(DEMO_OUT) --device $(DEVICE) --world-preset $(WORLD_PRESET)

# Two pytest workers of one thread each (a file's tests on one worker, so a module's fixtures are built once): most of the
# suite's time is Python around tiny models, which one thread runs about as fast as two (docs/benchmarks.md, "The test
# suite's time"). Two workers of two threads each oversubscribe the cores and take far longer.
# The page's end-to-end test drives Debian's chromium; installed here when missing and apt is ours to use
APT_INSTALL := DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq --no-install-recommends
test: env
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { $(APT_INSTALL) chromium >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -qq >/dev/null 2>&1 && $(APT_INSTALL) chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not installed: the page's browser test will be skipped"
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile tests

# The demo's LCM behind `lcm serve`: http://127.0.0.1:8000/ (run `make demo` first)
SERVE_MODEL ?= $(DEMO_OUT)/distill/lcm
serve: env
	@test -d $(SERVE_MODEL) || { echo "no LCM at $(SERVE_MODEL): run make demo first, or make serve SERVE_MODEL=DIR"; exit 2; }
	HF_HUB_OFFLINE=1 $(BIN)/lcm serve --model $(SERVE_MODEL) --device $(DEVICE)

clean:
	rm -rf $(VENV) runs
