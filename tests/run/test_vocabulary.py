"""Every tokenizer or vocabulary mismatch is refused before any weights load, naming both sides."""

import random

import pytest
import yaml
from transformers import AutoModelForSequenceClassification, BertConfig, BertTokenizerFast

from distillkit import cli
from distillkit.config import config_from_dict
from distillkit.errors import ConfigError
from distillkit.run import Run
from tests.distill_fixtures import bert, text_config, tiny_config, write_vocab


@pytest.fixture
def no_weights(monkeypatch):
    """Call it to fail the test from then on if any model is loaded or built."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the mistake was reported")

    def forbid():
        monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", refuse)
        monkeypatch.setattr(AutoModelForSequenceClassification, "from_config", refuse)

    return forbid


def save_student(folder, words):
    """A tiny BERT student saved with its own WordPiece tokenizer of ``words``."""
    config = BertConfig(**{k: v for k, v in bert(2, 32).items() if k != "model_type"}, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(folder)
    return str(folder)


def vocabulary(tmp_path):
    return write_vocab(tmp_path).read_text(encoding="utf-8").split()


def test_a_student_with_its_own_tokenizer_of_other_ids_is_refused(tmp_path, no_weights):
    words = vocabulary(tmp_path)
    shuffled = words[:5] + random.Random(0).sample(words[5:], len(words) - 5)  # same size, other ids
    raw = tiny_config(tmp_path)
    raw["student"] = {"path": save_student(tmp_path / "student", shuffled)}
    no_weights()
    with pytest.raises(ConfigError) as caught:
        Run.prepare(config_from_dict(raw))
    message = str(caught.value)
    vocab = tmp_path / "vocab.txt"
    assert message.startswith(f"the teacher tokenizer '{vocab}' (BertTokenizer, 31 tokens) and ")
    assert f"student tokenizer '{tmp_path / 'student'}' (" in message
    assert "shared strings have other ids (e.g. '" in message
    assert f"Give the student the teacher's tokenizer (student.tokenizer: '{vocab}')" in message


def test_a_student_tokenizer_of_another_size_is_refused_before_anything_is_written(tmp_path, capsys):
    words = vocabulary(tmp_path)
    raw = tiny_config(tmp_path)
    raw["student"] = {"path": save_student(tmp_path / "student", [*words, "extra", "words"])}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    capsys.readouterr()
    assert cli.main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocabulary: 31 entries against 33" in err
    assert "2 strings only in the second (e.g. 'extra', 'words')" in err and "only in the first" not in err
    assert not (tmp_path / "run").exists()  # no empty metrics.jsonl


def test_a_student_with_the_teachers_tokenizer_passes(tmp_path):
    raw = tiny_config(tmp_path)
    raw["student"] = {"path": save_student(tmp_path / "student", vocabulary(tmp_path))}
    run = Run.prepare(config_from_dict(raw))
    assert run.tokenizer.name_or_path == str(tmp_path / "vocab.txt")  # the teacher's makes the batches


def test_a_student_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path, no_weights):
    raw = tiny_config(tmp_path)
    raw["student"] = {"config": {**bert(2, 32), "vocab_size": 20}}
    no_weights()
    with pytest.raises(ConfigError) as caught:
        Run.prepare(config_from_dict(raw))
    assert str(caught.value).startswith(
        f"the student's vocab_size is 20, but the teacher's tokenizer '{tmp_path / 'vocab.txt'}' ("
    )
    assert "gives token ids up to 30: the student cannot embed them" in str(caught.value)


def test_token_level_logits_of_other_vocabulary_sizes_are_refused(tmp_path):
    llama = {
        "model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 64,
    }  # fmt: skip
    raw = text_config(tmp_path, "causal_lm", llama, [{"loss": "kd"}])
    raw["student"] = {"config": {**llama, "vocab_size": 48, "num_hidden_layers": 1}}
    with pytest.raises(ConfigError) as caught:
        Run.prepare(config_from_dict(raw))
    assert str(caught.value) == (
        "objective term(s) kd compare token-level logits, but the student's vocabulary has 48 tokens and "
        "the teacher's 40; give the student the teacher's vocab_size"
    )
