"""Model and tokenizer paths: a local-looking path that does not exist is refused at once."""

import os

import pytest
import yaml
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForSequenceClassification

from distillkit import cli
from distillkit.config import ModelConfig
from distillkit.errors import ConfigError
from distillkit.model_paths import looks_local, resolve_path
from distillkit.models import load_config_of, load_tokenizer
from tests.distill_fixtures import tiny_config


@pytest.fixture
def no_hub(monkeypatch):
    """Fails the test if anything is loaded with from_pretrained (which would ask the hub)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"from_pretrained was called with {args}")

    monkeypatch.setattr(AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def test_a_relative_typo_under_an_existing_folder_is_refused_at_once(tmp_path, monkeypatch, no_hub, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    raw = tiny_config(tmp_path)
    raw["teacher"] = {"path": "models/nope"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert cli.main(["distill", "run.yaml"]) == 2
    assert capsys.readouterr().err == (
        f"distillkit: error: teacher.path 'models/nope' does not exist (resolved against {tmp_path})\n"
    )


@pytest.mark.parametrize(
    "path", ["./nope", "../nope", "~/surely-not-here-xyz", "a/b/c", "models\\nope", "x--y"]
)
def test_paths_that_cannot_be_hub_ids_are_local(path, no_hub):
    assert looks_local(path)
    with pytest.raises(ConfigError, match=r"^student.path '.*' does not exist"):
        load_config_of(ModelConfig(path=path), "student")


def test_an_absolute_path_says_no_resolution(tmp_path, no_hub):
    with pytest.raises(ConfigError) as caught:
        load_tokenizer(ModelConfig(path=str(tmp_path / "nope")))
    assert str(caught.value) == f"teacher.path '{tmp_path / 'nope'}' does not exist"


def test_a_tokenizer_file_that_does_not_exist(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_tokenizer(ModelConfig(config={"model_type": "bert"}, tokenizer="vocab/vocab.txt"))
    assert (
        str(caught.value)
        == f"teacher.tokenizer 'vocab/vocab.txt' does not exist (resolved against {tmp_path})"
    )


@pytest.mark.parametrize("hub_id", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_hub_ids_are_left_to_the_hub_when_online(hub_id, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    assert not looks_local(hub_id)
    assert resolve_path(hub_id, field="teacher.path") == hub_id


def test_offline_mode_refuses_a_hub_id_that_is_not_cached(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as caught:
        resolve_path("some-org/some-model", field="teacher.path")
    assert str(caught.value).startswith(
        f"teacher.path 'some-org/some-model' is not a local path (resolved against {tmp_path}), and the hub "
        "is off (HF_HUB_OFFLINE) with no copy of it in the hub cache"
    )
    (tmp_path / "hub" / "models--some-org--some-model").mkdir(parents=True)
    assert resolve_path("some-org/some-model", field="teacher.path") == "some-org/some-model"


def test_an_existing_folder_is_local_whatever_it_looks_like(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    assert resolve_path("gpt2") == "gpt2"
    assert resolve_path(str(tmp_path / "gpt2")) == str(tmp_path / "gpt2")
    assert os.path.isdir(resolve_path("gpt2"))


def test_a_teacher_folder_without_a_tokenizer_says_so(tmp_path):
    BertForSequenceClassification(
        BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ConfigError) as caught:
        load_tokenizer(ModelConfig(path=str(tmp_path / "teacher")))
    assert str(caught.value) == (
        f"teacher.path '{tmp_path / 'teacher'}' holds no tokenizer (no tokenizer.json, "
        "tokenizer_config.json, vocab or sentencepiece file), so transformers would build an empty one; set "
        "teacher.tokenizer to the tokenizer the teacher was trained with (a directory or a vocab.txt)"
    )
