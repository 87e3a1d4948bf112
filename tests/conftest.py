"""Shared fixtures: tiny Hugging Face models built from configs (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from distillkit.objective.terms import ModelDims
from tests import hypothesis_profiles  # noqa: F401  (loads the profile before any test module is collected)


def tiny_bert(layers: int, hidden: int, num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    """A randomly initialised BERT classifier small enough for unit tests."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


@pytest.fixture
def teacher():
    model = tiny_bert(layers=4, hidden=32, seed=1)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@pytest.fixture
def student():
    return tiny_bert(layers=2, hidden=16, seed=2)


@pytest.fixture
def dims(student, teacher):
    return ModelDims.from_models(student, teacher)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 64, (6, 10), generator=generator)
    attention_mask = torch.ones(6, 10, dtype=torch.long)
    attention_mask[0, 7:] = 0
    attention_mask[3, 4:] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
        "example_ids": torch.arange(6),
    }


def run_models(student, teacher, batch):
    """Runs both models on a batch the way the training loop does."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_out = teacher(**inputs, output_hidden_states=True)
    student_out = student(**inputs, output_hidden_states=True)
    return student_out, teacher_out
