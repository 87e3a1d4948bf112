import pytest
import torch

from distillkit.config import DataConfig, ModelConfig
from distillkit.data import Collator, load_task_data
from distillkit.errors import ConfigError
from distillkit.models import load_tokenizer
from tests.distill_fixtures import write_csv, write_vocab


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


def test_empty_dataset(tmp_path, tokenizer):
    empty = tmp_path / "empty.csv"
    empty.write_text("sentence,sentiment\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="empty|no rows|could not be read"):
        load_task_data(_cfg(empty), tokenizer)


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
