"""Comparing the student's tokenizer with the teacher's, and where it comes from."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BertTokenizerFast, LlamaConfig

from distillkit.config import ModelConfig
from distillkit.errors import ConfigError
from distillkit.models import load_tokenizer, student_from_teacher
from distillkit.tokenizers import compare_tokenizers, load_student_tokenizer, require_offsets
from tests.cross_tokenizer_fixtures import write_permuted_vocab
from tests.distill_fixtures import llama, write_vocab


def _wordpiece(path, lowercase=True):
    words = path.read_text(encoding="utf-8").splitlines()
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words) if w}, do_lower_case=lowercase)


def test_the_same_tokenizer_twice_has_no_differences(tmp_path):
    vocab = write_vocab(tmp_path)
    assert compare_tokenizers(_wordpiece(vocab), _wordpiece(vocab)) == []
    directory = tmp_path / "saved"
    _wordpiece(vocab).save_pretrained(directory)
    assert compare_tokenizers(_wordpiece(vocab), load_tokenizer(ModelConfig(tokenizer=str(directory)))) == []


def test_differences_name_vocabulary_ids_special_tokens_and_normalisation(tmp_path):
    vocab = write_vocab(tmp_path)
    permuted, _ = write_permuted_vocab(tmp_path)
    found = " | ".join(compare_tokenizers(_wordpiece(vocab), _wordpiece(permuted)))
    assert "shared strings have other ids" in found and "only in" not in found
    assert "pad_token" in found  # '[PAD]' has another id
    cased = compare_tokenizers(_wordpiece(vocab), _wordpiece(vocab, lowercase=False))
    assert any(line.startswith("normalisation") for line in cased)
    fewer = tmp_path / "fewer.txt"
    fewer.write_text("\n".join(vocab.read_text().splitlines()[:-3]) + "\n")
    assert "3 strings only in the first" in " ".join(compare_tokenizers(_wordpiece(vocab), _wordpiece(fewer)))


def test_where_the_students_tokenizer_comes_from(tmp_path):
    vocab = write_vocab(tmp_path)
    teacher = _wordpiece(vocab)
    assert load_student_tokenizer(ModelConfig(layers=2), teacher) is teacher
    bare = tmp_path / "bare-model"
    bare.mkdir()
    assert load_student_tokenizer(ModelConfig(path=str(bare)), teacher) is teacher  # no tokenizer saved there
    own = tmp_path / "with-tokenizer"
    _wordpiece(write_permuted_vocab(tmp_path)[0]).save_pretrained(own)
    assert compare_tokenizers(load_student_tokenizer(ModelConfig(path=str(own)), teacher), teacher)
    with pytest.raises(ConfigError, match="student.tokenizer .* does not exist"):
        load_student_tokenizer(ModelConfig(layers=2, tokenizer=str(tmp_path / "missing" / "dir")), teacher)


def test_a_slow_tokenizer_is_refused_for_offsets():
    class Slow:
        is_fast = False

        def __len__(self):
            return 5

    with pytest.raises(ConfigError, match="student.tokenizer"):
        require_offsets(Slow(), "student")


def test_a_student_built_from_the_teacher_takes_its_own_vocabulary(tmp_path):
    teacher_tokenizer = _wordpiece(write_vocab(tmp_path))
    student_tokenizer = _wordpiece(write_permuted_vocab(tmp_path)[0])
    torch.manual_seed(0)
    settings = {k: v for k, v in llama(4, 16).items() if k != "model_type"}
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(**settings, tie_word_embeddings=False))
    student = student_from_teacher(teacher, ModelConfig(layers=2), student_tokenizer, teacher_tokenizer)
    assert student.config.vocab_size == len(student_tokenizer)
    assert student.config.pad_token_id == student_tokenizer.pad_token_id
    moved = 0
    for word in ("movie", "[SEP]", "superb"):
        s, t = student_tokenizer.get_vocab()[word], teacher_tokenizer.get_vocab()[word]
        moved += s != t
        assert torch.equal(student.model.embed_tokens.weight[s], teacher.model.embed_tokens.weight[t])
        assert torch.equal(student.lm_head.weight[s], teacher.lm_head.weight[t])
    assert moved and torch.equal(student.model.norm.weight, teacher.model.norm.weight)


def test_a_model_folder_holds_a_tokenizer_when_it_has_its_files(tmp_path):
    from distillkit.model_paths import has_tokenizer_files

    assert not has_tokenizer_files(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert not has_tokenizer_files(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"")
    assert has_tokenizer_files(tmp_path)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        (folder / name).write_text("")
        assert has_tokenizer_files(folder)
