"""Token streams: spans that tile the text, one text for two tokenizers, padding each stream on its own."""

import pytest
import torch

from distillkit.config import config_from_dict
from distillkit.models import load_tokenizer
from distillkit.tasks.causal_lm import NextTokenCollator
from distillkit.tasks.streams import common_scored_text, load_token_streams
from distillkit.text_data import load_text_data, load_text_splits
from distillkit.tokenizers import encode_with_spans
from tests.cross_tokenizer_fixtures import cross_config
from tests.distill_fixtures import llama, text_config

TEXTS = ["The  naïve café's 42nd visit:\tok", "🙂 end.  ", "a"]


@pytest.fixture
def tokenizers(tmp_path):
    raw = cross_config(tmp_path, [{"loss": "ce"}])
    config = config_from_dict(raw)
    student = load_tokenizer(config.student, "student")
    return config, student, load_tokenizer(config.teacher)


def test_spans_tile_each_text_and_count_its_bytes(tokenizers):
    _, student, teacher = tokenizers
    for tokenizer in (student, teacher):  # byte-level BPE (keeps spaces), WordPiece (drops them)
        for text, tokens in zip(
            TEXTS, encode_with_spans(tokenizer, TEXTS, add_special_tokens=True), strict=True
        ):
            text_spans = [s for s in tokens.spans if s[0] >= 0]
            assert text_spans[0][0] == 0 and text_spans[-1][1] == len(text)
            assert all(b == e0 for (_, e0), (b, _) in zip(text_spans, text_spans[1:], strict=False))
            assert sum(n for n in tokens.nbytes if n >= 0) == len(text.encode("utf-8"))
    emoji = encode_with_spans(student, ["🙂"], add_special_tokens=False)[0]
    assert len(emoji.ids) > 1 and emoji.nbytes[0] == 4 and set(emoji.nbytes[1:]) == {0}  # one character
    cut = encode_with_spans(teacher, ["the movie was very good"], add_special_tokens=False, max_length=2)[0]
    assert cut.spans[-1][1] < len("the movie was very good")  # truncated text: the rest is not covered


def test_one_tokenizer_gives_the_blocks_it_always_gave(tmp_path):
    config = config_from_dict(text_config(tmp_path, "causal_lm", llama(2, 16), [{"loss": "ce"}]))
    tokenizer = load_tokenizer(config.teacher)
    for packing in (True, False):
        before = load_text_data(config.data, tokenizer, packing)
        now = load_token_streams(config.data, tokenizer, None, packing)
        assert now.train["input_ids"] == before.train["input_ids"]
        assert now.eval["input_ids"] == before.eval["input_ids"]
        assert "teacher_input_ids" not in now.train.column_names


@pytest.mark.parametrize("packing", [True, False])
def test_both_models_are_scored_on_the_same_text(tokenizers, packing):
    config, student, teacher = tokenizers
    data = load_token_streams(config.data, student, teacher, packing)
    text = "".join(load_text_splits(config.data)[0][config.data.text_column]) if packing else None
    texts = load_text_splits(config.data)[0][config.data.text_column]
    scored_rows = 0
    for i, row in enumerate(data.train):
        source = text if packing else texts[i]
        pieces = []
        for prefix in ("", "teacher_"):
            scored = [
                (tuple(s), n)
                for s, n in zip(row[prefix + "spans"], row[prefix + "token_bytes"], strict=True)
                if n >= 0
            ]
            pieces.append("".join(source[b:e] for (b, e), _ in scored))
            assert sum(n for _, n in scored) == len(pieces[-1].encode("utf-8"))
            assert row[prefix + "token_bytes"][0] == -1  # a row's first token is never predicted
        assert pieces[0] == pieces[1]
        scored_rows += bool(pieces[0])
    assert scored_rows >= len(data.train) * 0.8
    if packing:
        assert {len(ids) for ids in data.train["input_ids"]} == {config.data.max_length}
        assert len(set(map(len, data.train["teacher_input_ids"]))) > 1  # the teacher's rows vary in length


def test_common_scored_text_starts_and_ends_at_boundaries_of_both():
    student = [(0, 2), (2, 5), (5, 9), (9, 10)]
    teacher = [(0, 3), (3, 5), (5, 7), (7, 9), (9, 12)]
    assert common_scored_text(student, teacher) == (5, 9)  # both predict 3..10; shared boundaries: 5, 9
    assert common_scored_text([(0, 2)], teacher) is None
    assert common_scored_text([(0, 2), (2, 4)], [(0, 3), (3, 4)]) is None  # no shared boundary to start at


def test_each_stream_is_padded_by_its_tokenizer_and_shifted_into_labels(tokenizers):
    _, student, teacher = tokenizers
    teacher.padding_side = "left"
    rows = [
        {"input_ids": [5, 6, 7], "attention_mask": [1] * 3, "token_bytes": [-1, 2, 3],
         "spans": [[0, 1], [1, 3], [3, 6]], "teacher_input_ids": [8, 9], "teacher_attention_mask": [1, 1],
         "teacher_token_bytes": [-1, 5], "teacher_spans": [[0, 1], [1, 6]], "example_ids": 0},
        {"input_ids": [5], "attention_mask": [1], "token_bytes": [-1], "spans": [[0, 4]],
         "teacher_input_ids": [8, 9, 10], "teacher_attention_mask": [1] * 3,
         "teacher_token_bytes": [-1, 1, 3], "teacher_spans": [[0, 1], [1, 2], [2, 4]], "example_ids": 1},
    ]  # fmt: skip
    batch = NextTokenCollator(student, teacher)(rows)
    assert batch["labels"].tolist() == [[6, 7, -100], [-100, -100, -100]]
    assert batch["label_bytes"].tolist() == [[2, 3, -1], [-1, -1, -1]]
    assert batch["label_spans"][0].tolist() == [[1, 3], [3, 6], [-1, -1]]
    pad = teacher.pad_token_id
    assert batch["teacher_input_ids"].tolist() == [[pad, 8, 9], [8, 9, 10]]  # padded on the left
    assert batch["teacher_labels"].tolist() == [[-100, 9, -100], [9, 10, -100]]  # a pad predicts nothing
    assert batch["teacher_label_bytes"].tolist() == [[-1, 5, -1], [1, 3, -1]]
    assert batch["example_ids"].tolist() == [0, 1] and "token_bytes" not in batch
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
