"""Unlabelled text for the token and representation tasks: splits, packing and prompt/completion pairs.

Built on :mod:`distillkit.data` (the same sources, splits and column checks as labelled data).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from distillkit.config import DataConfig
from distillkit.data import TaskData, check_columns, encode_rows, split_train_eval
from distillkit.errors import ConfigError


def end_of_text_id(tokenizer: Any) -> int | None:
    """The token that ends a text: the tokenizer's end-of-sequence token, else its separator (BERT-style)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def too_little_text(which: str, tokens: int, max_length: int) -> ConfigError:
    """The error for a split whose text packs into no block of ``max_length`` tokens."""
    return ConfigError(
        f"the {which} text has {tokens} tokens, less than one block of data.max_length={max_length}; "
        "lower data.max_length or add text"
    )


def load_text_splits(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The train and eval splits of unlabelled text, ``data.text_column`` checked (nothing tokenised).

    Raises:
        ConfigError: For a missing file or column, empty data or an empty text.

    """
    import datasets

    datasets.disable_progress_bars()
    train, evaluation = split_train_eval(cfg)
    fields = (
        ("prompt_column", "completion_column") if cfg.prompt_column else ("text_column", "text_pair_column")
    )
    check_columns(train, cfg, "training", fields)
    check_columns(evaluation, cfg, "evaluation", fields)
    return train, evaluation


def load_text_data(
    cfg: DataConfig, tokenizer: Any, packing: bool, prompt_limit: int | None = None
) -> TaskData:
    """Loads, validates and tokenises unlabelled text (causal LM, masked LM, representation tasks).

    Args:
        cfg: The ``data`` section (``text_column`` is read; labels are ignored).
        tokenizer: The teacher's tokenizer.
        packing: Concatenate the texts, each followed by the end-of-text token, and cut the stream into
            blocks of ``max_length`` tokens (the last partial block is dropped); else one truncated text
            per example.
        prompt_limit: With ``data.prompt_column``: prompts longer than this keep their last ``prompt_limit``
            tokens (default: ``max_length - 1``).

    Returns:
        Train and eval splits with ``input_ids``, ``attention_mask`` and ``example_ids``; with
        ``data.prompt_column`` (prompt/completion examples, never packed) also ``prompt_lengths``: each
        example is its prompt's tokens, then the completion's and the end-of-text token (cut at
        ``max_length``), and ``prompt_lengths`` counts the prompt's.

    Raises:
        ConfigError: For a missing file or column, empty data, or too little text for one block.

    """
    train, evaluation = load_text_splits(cfg)
    separator = [end_of_text_id(tokenizer)]
    if cfg.prompt_column:
        limit = prompt_limit or cfg.max_length - 1

        def encode_pairs(rows: dict[str, list], ids: list[int]) -> dict[str, list]:
            prompts = tokenizer(rows[cfg.prompt_column], add_special_tokens=False)["input_ids"]
            completions = tokenizer(rows[cfg.completion_column], add_special_tokens=False)["input_ids"]
            tokens = [
                (prompt[-limit:] + completion + separator)[: cfg.max_length]
                for prompt, completion in zip(prompts, completions, strict=True)
            ]
            return {
                "input_ids": tokens,
                "attention_mask": [[1] * len(row) for row in tokens],
                "prompt_lengths": [min(len(prompt), limit) for prompt in prompts],
                "example_ids": ids,
            }

        return TaskData(train=encode_rows(train, encode_pairs), eval=encode_rows(evaluation, encode_pairs))

    def encode(rows: dict[str, list], ids: list[int]) -> dict[str, list]:
        encoded = tokenizer(rows[cfg.text_column], truncation=True, max_length=cfg.max_length)
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "example_ids": ids,
        }

    def pack(dataset: Dataset, which: str) -> Dataset:
        stream: list[int] = []
        for text in dataset[cfg.text_column]:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
        blocks = len(stream) // cfg.max_length
        if blocks == 0:
            raise too_little_text(which, len(stream), cfg.max_length)
        rows = [stream[i * cfg.max_length : (i + 1) * cfg.max_length] for i in range(blocks)]
        return Dataset.from_dict(
            {
                "input_ids": rows,
                "attention_mask": [[1] * cfg.max_length] * blocks,
                "example_ids": list(range(blocks)),
            }
        )

    def tokenise(dataset: Dataset, which: str) -> Dataset:
        return pack(dataset, which) if packing else encode_rows(dataset, encode)

    return TaskData(train=tokenise(train, "training"), eval=tokenise(evaluation, "evaluation"))
