"""Tokenizer comparison: every difference that changes the ids a model reads is listed."""

import pytest
from transformers import BertTokenizerFast

from distillkit.tokenizers import compare_tokenizers, describe_tokenizer, has_tokenizer_files

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "hello", "world"]


def wordpiece(words, lower=True):
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=lower)


def test_identical_tokenizers_have_no_differences():
    assert compare_tokenizers(wordpiece(WORDS), wordpiece(list(WORDS))) == []


def test_same_size_other_ids_is_a_difference():
    swapped = [*WORDS[:5], "bad", "good", *WORDS[7:]]
    differences = compare_tokenizers(wordpiece(swapped), wordpiece(WORDS))
    assert differences == ["2 tokens have other ids ('bad': 5 vs 6, 'good': 6 vs 5)"]


def test_other_tokens_and_sizes_are_listed():
    differences = compare_tokenizers(wordpiece([*WORDS, "extra"]), wordpiece([*WORDS[:-1], "planet"]))
    assert differences == [
        "vocabulary size 12 vs 11",
        "2 tokens only in the first ('world', 'extra')",
        "1 tokens only in the second ('planet')",
    ]


def test_special_tokens_are_compared():
    other = [*WORDS[:2], "[SEP]", "[CLS]", *WORDS[4:]]
    differences = compare_tokenizers(wordpiece(other), wordpiece(WORDS))
    assert "cls_token '[CLS]' (id 3) vs '[CLS]' (id 2)" in differences
    assert "sep_token '[SEP]' (id 2) vs '[SEP]' (id 3)" in differences


def test_same_vocabulary_other_normalisation_shows_in_a_sample_text():
    differences = compare_tokenizers(wordpiece(WORDS, lower=False), wordpiece(WORDS), samples=["Hello world"])
    assert differences == ["'Hello world' is encoded as [2, 1, 10, 3] vs [2, 9, 10, 3]"]


def test_describe_and_files(tmp_path):
    tokenizer = wordpiece(WORDS)
    assert describe_tokenizer(tokenizer) == f"built in memory ({type(tokenizer).__name__}, 11 tokens)"
    assert not has_tokenizer_files(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not has_tokenizer_files(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"")
    assert has_tokenizer_files(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.txt", "tokenizer_config.json"])
def test_tokenizer_files(tmp_path, name):
    (tmp_path / name).write_text("")
    assert has_tokenizer_files(tmp_path)
