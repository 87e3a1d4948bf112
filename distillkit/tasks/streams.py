"""Text as token streams: the student's tokens, and the teacher's of the same text when tokenizers differ.

Every token carries the UTF-8 bytes of the text it covers (:func:`distillkit.tokenizers.encode_with_spans`),
so a model's next-token loss can be divided by the bytes it predicted (bits per byte), whatever its
tokenizer. Rows (one per packed block, or per text) hold ``input_ids``, ``attention_mask``, ``example_ids``
and ``token_bytes``; with a teacher tokenizer also ``spans`` (character ``(begin, end)`` per token) and the
teacher's ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_token_bytes``, ``teacher_spans``.

**Packing across tokenizers.** Both tokenizers encode each text (the student's tokens decide the blocks:
``max_length`` student tokens each); the texts are joined, each followed by the tokenizer's end-of-text token,
into one character coordinate. A teacher token belongs to the block in which its text begins, so the
teacher's row covers the same text as the student's up to the tokens that straddle the block's ends, and
may be longer or shorter than ``max_length``.

**The same text for both.** In a cross-tokenizer row, ``token_bytes`` (-1: not scored) keep only the tokens
inside the largest stretch of text that both models predict from their second token on and that begins and
ends at a boundary of both tokenizations; so both models are scored on exactly the same bytes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset

from distillkit.config import DataConfig
from distillkit.data import TaskData
from distillkit.objective.taps import TEACHER_PREFIX
from distillkit.text_data import load_text_splits, too_little_text
from distillkit.tokenizers import SpannedTokens, encode_with_spans

NOT_TEXT = -1
"""``token_bytes`` of a token that is not scored (special tokens, padding, text outside the common part)."""


@dataclass
class _Stream:
    """One tokenizer's tokens of a sequence of texts, with monotonic keys locating each in the text."""

    ids: list[int] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)

    def extend(self, tokens: SpannedTokens, offset: int) -> None:
        """Appends the tokens of one text whose first character is character ``offset`` of the stream."""
        moved = tokens.shifted(offset)
        self.ids += moved.ids
        self.spans += moved.spans
        self.nbytes += moved.nbytes
        last = self.keys[-1] if self.keys else 0
        for begin, end in moved.spans:  # text tokens sort by where they begin; others after their left
            key = 2 * begin + (1 if end > begin else 0) if begin >= 0 else last
            last = max(last, key)
            self.keys.append(last)

    def close_text(self, separator: int, end: int) -> None:
        """Appends the end-of-text token of a text that ends at character ``end``."""
        self.ids.append(separator)
        self.spans.append((NOT_TEXT, NOT_TEXT))
        self.nbytes.append(NOT_TEXT)
        self.keys.append(max(2 * end, self.keys[-1] if self.keys else 0))


def _separator(tokenizer: Any) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def _joined(tokenizer: Any, texts: Sequence[str]) -> _Stream:
    stream, offset = _Stream(), 0
    for text, tokens in zip(
        texts, encode_with_spans(tokenizer, texts, add_special_tokens=False), strict=True
    ):
        stream.extend(tokens, offset)
        offset += len(text)
        stream.close_text(_separator(tokenizer), offset)
    return stream


def common_scored_text(
    student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]]
) -> tuple[int, int] | None:
    """The characters ``[start, stop)`` both rows predict, beginning and ending at a boundary of both.

    Args:
        student: The ``(begin, end)`` span of each token of the student's row (``(-1, -1)``: not text).
        teacher: The same for the teacher's row of the same text.

    Returns:
        ``(start, stop)``, or None when the two rows share no such stretch. A row predicts the text of its
        tokens from the second on (the first token has no prediction).

    """
    sides = []
    for spans in (student, teacher):
        text = [(b, e) for b, e in spans[1:] if b >= 0]
        if not text:
            return None
        sides.append((text[0][0], text[-1][1], {b for b, _ in text} | {text[-1][1]}))
    low, high = max(s[0] for s in sides), min(s[1] for s in sides)
    boundaries = sorted(sides[0][2] & sides[1][2])
    starts = [c for c in boundaries if c >= low]
    stops = [c for c in boundaries if c <= high]
    if not starts or not stops or starts[0] >= stops[-1]:
        return None
    return starts[0], stops[-1]


def _scored(spans: Sequence[tuple[int, int]], nbytes: Sequence[int], region: tuple[int, int] | None) -> list:
    """``nbytes`` with every token outside ``region`` (and the row's first token) set to :data:`NOT_TEXT`."""
    if region is None:
        return [NOT_TEXT] * len(nbytes)
    start, stop = region
    return [
        n if i > 0 and b >= start and e <= stop and b >= 0 else NOT_TEXT
        for i, ((b, e), n) in enumerate(zip(spans, nbytes, strict=True))
    ]


def _row(ids: list[int], spans: list, nbytes: list, prefix: str = "") -> dict[str, list]:
    return {
        f"{prefix}input_ids": ids,
        f"{prefix}attention_mask": [1] * len(ids),
        f"{prefix}token_bytes": nbytes,
        f"{prefix}spans": [list(s) for s in spans],
    }


def _paired_row(student: tuple[list, list, list], teacher: tuple[list, list, list], separator: int) -> dict:
    """One row of both streams, scored on their common text (an empty teacher side gets its separator)."""
    if not teacher[0]:
        teacher = ([separator], [(NOT_TEXT, NOT_TEXT)], [NOT_TEXT])
    region = common_scored_text(student[1], teacher[1])
    return {
        **_row(student[0], student[1], _scored(student[1], student[2], region)),
        **_row(teacher[0], teacher[1], _scored(teacher[1], teacher[2], region), TEACHER_PREFIX),
    }


def _packed(texts: Sequence[str], tokenizer: Any, teacher: Any, length: int, which: str) -> list[dict]:
    """Blocks of ``length`` student tokens (and, with ``teacher``, the teacher's tokens of the same text)."""
    student = _joined(tokenizer, texts)
    blocks = len(student.ids) // length
    if blocks == 0:
        raise too_little_text(which, len(student.ids), length)
    if teacher is None:
        return [
            {
                "input_ids": student.ids[k * length : (k + 1) * length],
                "attention_mask": [1] * length,
                "token_bytes": student.nbytes[k * length : (k + 1) * length],
            }
            for k in range(blocks)
        ]
    other = _joined(teacher, texts)
    cuts = [bisect.bisect_left(other.keys, student.keys[k * length]) for k in range(blocks)]
    cuts.append(
        len(other.ids)
        if blocks * length == len(student.ids)
        else bisect.bisect_left(other.keys, student.keys[blocks * length])
    )
    rows = []
    for k in range(blocks):
        own = slice(k * length, (k + 1) * length)
        theirs = slice(cuts[k], cuts[k + 1])
        rows.append(
            _paired_row(
                (student.ids[own], student.spans[own], student.nbytes[own]),
                (other.ids[theirs], other.spans[theirs], other.nbytes[theirs]),
                _separator(teacher),
            )
        )
    return rows


def _one_per_text(texts: Sequence[str], tokenizer: Any, teacher: Any, length: int) -> list[dict]:
    """One truncated text per row (with each tokenizer's special tokens)."""
    mine = encode_with_spans(tokenizer, texts, add_special_tokens=True, max_length=length)
    if teacher is None:
        return [
            {"input_ids": t.ids, "attention_mask": [1] * len(t.ids), "token_bytes": t.nbytes} for t in mine
        ]
    theirs = encode_with_spans(teacher, texts, add_special_tokens=True, max_length=length)
    return [
        _paired_row((a.ids, a.spans, a.nbytes), (b.ids, b.spans, b.nbytes), _separator(teacher))
        for a, b in zip(mine, theirs, strict=True)
    ]


def load_token_streams(cfg: DataConfig, tokenizer: Any, teacher_tokenizer: Any, packing: bool) -> TaskData:
    """Loads unlabelled text as the student's token stream (and the teacher's, when it has another tokenizer).

    Args:
        cfg: The ``data`` section (``text_column``, ``max_length``).
        tokenizer: The student's tokenizer.
        teacher_tokenizer: The teacher's tokenizer when it differs from the student's, else None.
        packing: Blocks of ``max_length`` student tokens over the joined texts (the last partial block is
            dropped), else one truncated text per row.

    Returns:
        Train and eval splits with the columns of the module docstring and ``example_ids``.

    Raises:
        ConfigError: For a missing file or column, empty data, or too little text for one block.

    """
    splits = load_text_splits(cfg)
    data = []
    for dataset, which in zip(splits, ("training", "evaluation"), strict=True):
        texts = dataset[cfg.text_column]
        if packing:
            rows = _packed(texts, tokenizer, teacher_tokenizer, cfg.max_length, which)
        else:
            rows = _one_per_text(texts, tokenizer, teacher_tokenizer, cfg.max_length)
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        columns["example_ids"] = list(range(len(rows)))
        data.append(Dataset.from_dict(columns))
    return TaskData(train=data[0], eval=data[1])


def _pad(rows: Sequence[list], length: int, value: Any, left: bool) -> list[list]:
    return [
        ([value] * (length - len(r)) + list(r)) if left else (list(r) + [value] * (length - len(r)))
        for r in rows
    ]


class TokenStreamCollator:
    """Pads each token stream of a batch with its own tokenizer.

    Args:
        tokenizer: The student's tokenizer (pads ``input_ids``, ``attention_mask``).
        teacher_tokenizer: The teacher's, for the ``teacher_`` keys of cross-tokenizer rows (None: none).

    Returns (when called):
        ``input_ids``, ``attention_mask`` ``[B, T]``, ``token_bytes`` ``[B, T]`` (-1 at padding),
        ``spans`` ``[B, T, 2]`` when the rows have them (-1 at padding), the same with the ``teacher_``
        prefix ``[B, T']`` for two streams, ``example_ids`` ``[B]`` int64 (and ``prompt_lengths`` ``[B]`` of
        prompt/completion rows).

    """

    def __init__(self, tokenizer: Any, teacher_tokenizer: Any = None) -> None:
        self.streams = [("", tokenizer)]
        if teacher_tokenizer is not None:
            self.streams.append((TEACHER_PREFIX, teacher_tokenizer))

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collates ``rows`` into a batch dict."""
        batch: dict[str, torch.Tensor] = {}
        for prefix, tokenizer in self.streams:
            ids, mask = f"{prefix}input_ids", f"{prefix}attention_mask"
            padded = tokenizer.pad(
                [{"input_ids": r[ids], "attention_mask": r[mask]} for r in rows],
                padding=True,
                return_tensors="pt",
            )
            batch[ids], batch[mask] = padded["input_ids"], padded["attention_mask"]
            length, left = batch[ids].shape[1], tokenizer.padding_side == "left"
            for key, value in (("token_bytes", NOT_TEXT), ("spans", [NOT_TEXT, NOT_TEXT])):
                if prefix + key in rows[0]:
                    column = _pad([r[prefix + key] for r in rows], length, value, left)
                    batch[prefix + key] = torch.tensor(column, dtype=torch.long)
        for key in ("example_ids", "prompt_lengths"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return batch
