import gzip
from pathlib import Path

import pytest
import torch
import yaml

from distillkit import cli
from distillkit.config import DataConfig, ModelConfig
from distillkit.data import Collator, load_task_data
from distillkit.errors import ConfigError
from distillkit.models import load_tokenizer
from tests.distill_fixtures import tiny_config, write_csv, write_vocab


@pytest.fixture
def tokenizer(tmp_path):
    return load_tokenizer(ModelConfig(tokenizer=str(write_vocab(tmp_path))))


def _cfg(path, **kw):
    return DataConfig(path=str(path), text_column="sentence", label_column="sentiment", max_length=12, **kw)


def test_loads_splits_labels_and_ids(tmp_path, tokenizer):
    data = load_task_data(_cfg(write_csv(tmp_path, rows=40), eval_fraction=0.25), tokenizer)
    assert data.label_names == ["neg", "pos"]
    assert len(data.train) == 30 and len(data.eval) == 10
    assert data.train["example_ids"] == list(range(30))
    assert set(data.train["labels"]) == {0, 1}
    batch = Collator(tokenizer)([data.train[i] for i in range(4)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[1] == max(len(data.train[i]["input_ids"]) for i in range(4))
    assert batch["example_ids"].tolist() == [0, 1, 2, 3]
    assert batch["labels"].dtype == torch.long


def test_caps_and_explicit_labels(tmp_path, tokenizer):
    cfg = _cfg(write_csv(tmp_path, rows=40), max_train_examples=8, max_eval_examples=3, labels=["pos", "neg"])
    data = load_task_data(cfg, tokenizer)
    assert len(data.train) == 8 and len(data.eval) == 3
    assert data.label_names == ["pos", "neg"]


def test_missing_column_is_named(tmp_path, tokenizer):
    cfg = DataConfig(path=str(write_csv(tmp_path)), text_column="sentense", label_column="sentiment")
    with pytest.raises(ConfigError, match=r"data.text_column 'sentense'.*did you mean 'sentence'"):
        load_task_data(cfg, tokenizer)


def test_unseen_eval_label(tmp_path, tokenizer):
    train = write_csv(tmp_path, rows=20)
    evaluation = tmp_path / "eval.csv"
    evaluation.write_text("sentence,sentiment\ngood film,pos\nodd film,neutral\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"evaluation data has label value\(s\) \['neutral'\]"):
        load_task_data(_cfg(train, eval_path=str(evaluation)), tokenizer)


def test_label_list_missing_a_value(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"\['pos'\].*data.labels"):
        load_task_data(_cfg(write_csv(tmp_path), labels=["neg"]), tokenizer)


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("empty.csv", b"", "the file is empty"),
        ("header.csv", b"sentence,sentiment\n", "only a header line"),
        ("header.tsv", b"sentence\tsentiment\n\n", "only a header line"),
        ("empty.jsonl", b"", "the file is empty"),
        ("blank.jsonl", b"\n  \n", "the file holds only blank lines"),
        ("empty.json", b"[]", "the file holds only []"),
        ("header.csv.gz", gzip.compress(b"sentence,sentiment\n"), "only a header line"),
    ],
)
def test_a_data_file_without_rows_is_named(tmp_path, tokenizer, name, content, why):
    empty = tmp_path / name
    empty.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_task_data(_cfg(empty), tokenizer)
    assert str(caught.value) == f"data.path '{empty}' has no rows ({why}); give a file with data"


def test_an_evaluation_file_without_rows_is_named(tmp_path, tokenizer):
    header = tmp_path / "eval.csv"
    header.write_text("sentence,sentiment\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"data.eval_path '.*eval.csv' has no rows \(only a header line\)"):
        load_task_data(_cfg(write_csv(tmp_path), eval_path=str(header)), tokenizer)


def test_a_missing_relative_data_file_says_what_it_was_resolved_against(tmp_path, tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_task_data(_cfg("data/trian.csv"), tokenizer)
    assert str(caught.value) == f"data.path 'data/trian.csv' does not exist (resolved against {tmp_path})"


def test_bad_sources(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="does not exist"):
        load_task_data(_cfg(tmp_path / "missing.csv"), tokenizer)
    with pytest.raises(ConfigError, match="unknown built-in data set"):
        load_task_data(DataConfig(path="builtin:rotten_tomatoe"), tokenizer)
    with pytest.raises(ConfigError, match="data.path is required"):
        load_task_data(DataConfig(), tokenizer)


def test_blank_text_is_rejected(tmp_path, tokenizer):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,sentiment\ngood,pos\n,neg\nbad,neg\nfine,pos\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty or non-text 'sentence'"):
        load_task_data(_cfg(bad, eval_fraction=0.25), tokenizer)


def test_distill_on_a_header_only_file_exits_2_before_writing_anything(tmp_path, capsys):
    raw = tiny_config(tmp_path)
    Path(raw["data"]["path"]).write_text("sentence,sentiment\n", encoding="utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert cli.main(["distill", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"distillkit: error: data.path '{raw['data']['path']}' has no rows (only a header line); "
        "give a file with data\n"
    )
    assert not Path(raw["output_dir"]).exists()
