# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, run the main job on the embedded default (configs/tiny.yaml)
#   make test   create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed compiles a C++ op on first use; keep it between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test env

$(BIN)/instagen: setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, from the pin, so that nothing after it can pull another build.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q --no-build-isolation -c constraints.txt -e ".[dev]"
	touch $@

env: $(BIN)/instagen

demo: env
	$(BIN)/instagen generate --config configs/tiny.yaml

test: env
	$(BIN)/python -m pytest -q tests
