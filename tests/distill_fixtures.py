"""Tiny end-to-end setups: a CSV of a few dozen labelled sentences, a WordPiece vocab, tiny BERT configs."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

POSITIVE = ["good", "great", "fine", "lovely", "superb", "fun", "bright", "warm"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "sad", "grim", "cold"]
FILLER = ["the", "movie", "film", "was", "very", "a", "plot", "and", "story", "quite"]


def write_vocab(directory: Path) -> Path:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    path = directory / "vocab.txt"
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return path


def write_csv(directory: Path, rows: int = 48, name: str = "data.csv", seed: int = 0, **columns: Any) -> Path:
    rng = random.Random(seed)
    path = directory / name
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "sentiment"])
        for i in range(rows):
            positive = i % 2 == 0
            words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
            rng.shuffle(words)
            writer.writerow([" ".join(words), "pos" if positive else "neg"])
    return path


def bert(layers: int, hidden: int) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "vocab_size": 40,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 32,
    }


def tiny_config(tmp_path: Path, **train: Any) -> dict[str, Any]:
    """A config dict for a ~1 second distillation of a 4-layer teacher into a 2-layer student."""
    vocab = write_vocab(tmp_path)
    data = write_csv(tmp_path)
    return {
        "teacher": {"config": bert(4, 32), "tokenizer": str(vocab)},
        "student": {"layers": 2},
        "objective": [
            {"loss": "kd", "weight": 1.0, "temperature": 2.0},
            {"loss": "l2", "weight": 0.5},
            {"loss": "ce", "weight": 1.0},
        ],
        "data": {"path": str(data), "text_column": "sentence", "label_column": "sentiment", "max_length": 16},
        "train": {
            "steps": 8,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "progress": False,
            "seed": 0,
            **train,
        },
        "output_dir": str(tmp_path / "run"),
    }


def llama(layers: int, hidden: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "vocab_size": 40,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
    }


def tiny_llama(layers: int, hidden: int, vocab: int, seed: int = 0, init: float = 0.3) -> Any:
    """A random ``LlamaForCausalLM`` (``init``: its initializer range; larger gives sharper logits)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = {k: v for k, v in llama(layers, hidden).items() if k != "model_type"}
    config = LlamaConfig(
        **{**settings, "vocab_size": vocab, "initializer_range": init}, tie_word_embeddings=False
    )
    return LlamaForCausalLM(config)


def gpt2(layers: int, hidden: int) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "vocab_size": 40,
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": 2,
        "n_positions": 64,
    }


def text_config(
    tmp_path: Path, task: str, teacher: dict[str, Any], objective: list[dict], **train: Any
) -> dict:
    """A tiny config of a text task (``causal_lm``, ``masked_lm``, ``representation``) on the tiny CSV."""
    raw = tiny_config(tmp_path, **train)
    raw["task"] = task
    raw["teacher"]["config"] = teacher
    raw["objective"] = objective
    raw["data"] = {"path": raw["data"]["path"], "text_column": "sentence", "max_length": 16}
    return raw


def causal_lm_config(
    tmp_path: Path,
    generation: dict[str, Any] | None = None,
    objective: list[dict] | None = None,
    **train: Any,
) -> dict[str, Any]:
    """A tiny ``causal_lm`` config: a 2-layer Llama teacher over the 31-token vocabulary (spread-out logits).

    The student is 1 layer copied from it; text is packed in 16-token blocks; ``generation`` is
    ``train.generation``.
    """
    teacher = {**llama(2, 32), "vocab_size": 31, "initializer_range": 0.3}
    terms = objective or [{"loss": "kd", "temperature": 1.0}]
    raw = text_config(tmp_path, "causal_lm", teacher, terms, **train)
    raw["student"] = {"layers": 1}
    if generation is not None:
        raw["train"]["generation"] = generation
    return raw
