"""The student's tokenizer beside the teacher's: are they the same, which characters does each token cover?

- :func:`load_student_tokenizer`: ``student.tokenizer``, else the one saved with the student, else the
  teacher's.
- :func:`compare_tokenizers`: the differences between two tokenizers (vocabulary strings and ids, special
  tokens, normalisation and pre-tokenisation, the tokens of a probe text); none means a student can be
  trained on the teacher's token ids.
- :func:`require_offsets`: refuses a tokenizer without character offsets (a slow, Python-only tokenizer).
- :func:`encode_with_spans`: token ids with the characters each token covers, tiled so that the tokens of
  a text cover it exactly once, and the UTF-8 bytes of each span (what bits per byte divides by).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillkit.config import ModelConfig
from distillkit.errors import ConfigError
from distillkit.model_paths import has_tokenizer_files, resolve_path
from distillkit.models import load_tokenizer

SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The special-token roles compared by :func:`compare_tokenizers`."""

PROBE_TEXT = "Hello World!  The naïve café's 42nd visit:\tÜber-cool, 東京 ok?\n🙂 end."
"""Text both tokenizers encode in :func:`compare_tokenizers`: case, accents, digits, tabs, CJK, emoji."""


def load_student_tokenizer(spec: ModelConfig, teacher_tokenizer: Any) -> Any:
    """The student's tokenizer: ``student.tokenizer``, else the one saved in ``path``, else the teacher's.

    The teacher's is returned as it is (the same object).

    Args:
        spec: The student config.
        teacher_tokenizer: The teacher's tokenizer.

    Raises:
        ConfigError: When ``student.tokenizer`` cannot be loaded.

    """
    if spec.tokenizer is not None:
        return load_tokenizer(spec, "student")
    if spec.path is None:
        return teacher_tokenizer
    path = Path(resolve_path(spec.path, spec.gguf_file))
    if spec.gguf_file or (path.is_dir() and has_tokenizer_files(path)):
        return load_tokenizer(spec, "student")
    if path.exists():  # a local model without a tokenizer of its own
        return teacher_tokenizer
    try:  # a hub model, which usually has its tokenizer
        return load_tokenizer(spec, "student")
    except ConfigError:
        return teacher_tokenizer


def describe_tokenizer(tokenizer: Any) -> str:
    """``TokenizersBackend, 49,152 tokens`` (for messages)."""
    return f"{type(tokenizer).__name__}, {len(tokenizer):,} tokens"


def _backend_parts(tokenizer: Any) -> dict[str, Any]:
    """The normalizer, pre-tokenizer and model settings (merges hashed, vocabulary left out) of a fast one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {"class": type(tokenizer).__name__}
    spec = json.loads(backend.to_str())
    model = {k: v for k, v in (spec.get("model") or {}).items() if k not in ("vocab", "merges")}
    merges = (spec.get("model") or {}).get("merges")
    if merges:
        model["merges_sha256"] = hashlib.sha256(json.dumps(merges).encode()).hexdigest()[:16]
    return {"normalizer": spec.get("normalizer"), "pre_tokenizer": spec.get("pre_tokenizer"), "model": model}


def _vocabulary_differences(a: dict[str, int], b: dict[str, int]) -> list[str]:
    if a == b:
        return []
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    moved = sorted(s for s in a.keys() & b.keys() if a[s] != b[s])
    parts = [f"vocabulary: {len(a):,} entries against {len(b):,}"]
    for only, side in ((only_a, "first"), (only_b, "second")):
        if only:
            parts.append(f"{len(only):,} strings only in the {side} (e.g. {', '.join(map(repr, only[:3]))})")
    if moved:
        example = moved[0]
        parts.append(
            f"{len(moved):,} shared strings have other ids (e.g. {example!r}: {a[example]} and {b[example]})"
        )
    return [", ".join(parts)]


def compare_tokenizers(a: Any, b: Any) -> list[str]:
    """The differences between two tokenizers; an empty list means they tokenise text identically.

    Compared: the vocabulary (each string and its id), the special tokens (each role's string and id),
    normalisation, pre-tokenisation and the subword model's settings (merges included), and the ids both
    give a probe text with and without special tokens (:data:`PROBE_TEXT`).

    Args:
        a: A Hugging Face tokenizer.
        b: Another one.

    Returns:
        One line per difference, e.g. ``"vocabulary: 49,152 entries against 8,000, ..."``.

    """
    if a is b:
        return []
    found = _vocabulary_differences(a.get_vocab(), b.get_vocab())
    for role in SPECIAL_ROLES:
        mine = (getattr(a, role, None), getattr(a, f"{role}_id", None))
        theirs = (getattr(b, role, None), getattr(b, f"{role}_id", None))
        if mine != theirs:
            found.append(f"{role}: {mine[0]!r} (id {mine[1]}) against {theirs[0]!r} (id {theirs[1]})")
    parts_a, parts_b = _backend_parts(a), _backend_parts(b)
    for key in sorted(parts_a.keys() | parts_b.keys()):
        if parts_a.get(key) != parts_b.get(key):
            label = {"normalizer": "normalisation", "pre_tokenizer": "pre-tokenisation"}.get(key, key)
            found.append(f"{label}: {_short(parts_a.get(key))} against {_short(parts_b.get(key))}")
    for special in (False, True):
        ids_a = a(PROBE_TEXT, add_special_tokens=special)["input_ids"]
        ids_b = b(PROBE_TEXT, add_special_tokens=special)["input_ids"]
        if ids_a != ids_b:
            found.append(
                f"a probe text{' with special tokens' if special else ''} gives {len(ids_a)} tokens "
                f"{ids_a[:6]}... against {len(ids_b)} {ids_b[:6]}..."
            )
            break
    return found


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_offsets(tokenizer: Any, role: str) -> None:
    """Refuses a tokenizer that cannot give character offsets (cross-tokenizer runs align tokens by them).

    Args:
        tokenizer: The tokenizer.
        role: ``teacher`` or ``student``, for the message.

    Raises:
        ConfigError: For a slow (Python-only) tokenizer.

    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"the {role} tokenizer ({describe_tokenizer(tokenizer)}) is a slow tokenizer without character "
            "offsets, which a run with two different tokenizers needs to align their tokens; give "
            f"{role}.tokenizer a directory with a fast tokenizer (tokenizer.json, e.g. saved by a "
            "PreTrainedTokenizerFast or made by `distillkit train-tokenizer`)"
        )


@dataclass(frozen=True)
class SpannedTokens:
    """The tokens of one text and the characters each covers.

    Attributes:
        ids: Token ids ``[n]``.
        spans: ``(begin, end)`` character positions per token. Text tokens tile the text: each begins where
            the previous one ends (characters no token covers, such as spaces a WordPiece tokenizer drops,
            belong to the token after them, as a byte-level BPE's or SentencePiece's leading space does),
            and the last one ends at the end of the text unless it was truncated. Two tokens sharing a
            character (pieces of one emoji) give the first the character and the second an empty span.
            Special tokens have ``(-1, -1)``.
        nbytes: UTF-8 bytes of each text token's span; -1 for special tokens.

    """

    ids: list[int]
    spans: list[tuple[int, int]]
    nbytes: list[int]

    def shifted(self, offset: int) -> SpannedTokens:
        """The same tokens with character positions moved by ``offset`` (a text inside a longer stream)."""
        spans = [(b + offset, e + offset) if b >= 0 else (b, e) for b, e in self.spans]
        return SpannedTokens(self.ids, spans, self.nbytes)


def _tile(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[int]) -> tuple[list, list]:
    """Tiled spans and their UTF-8 byte counts (see :class:`SpannedTokens`)."""
    spans: list[tuple[int, int]] = [(-1, -1)] * len(offsets)
    nbytes = [-1] * len(offsets)
    text_tokens = [i for i, s in enumerate(special) if not s]
    cursor = 0
    for k, i in enumerate(text_tokens):
        end = offsets[i][1]
        if k + 1 == len(text_tokens) and not text[end:].strip():  # only whitespace after the last token
            end = len(text)
        end = max(end, cursor)
        spans[i] = (cursor, end)
        nbytes[i] = len(text[cursor:end].encode("utf-8"))
        cursor = end
    return spans, nbytes


def encode_with_spans(
    tokenizer: Any, texts: Sequence[str], *, add_special_tokens: bool, max_length: int | None = None
) -> list[SpannedTokens]:
    """Tokenises ``texts`` (in one batched call) with the character span and bytes of every token.

    A slow tokenizer (no offsets) gets no spans, and each token's bytes are those of the token decoded
    alone (approximate); cross-tokenizer runs refuse one (:func:`require_offsets`).

    Args:
        tokenizer: The tokenizer.
        texts: The texts.
        add_special_tokens: Add the tokenizer's special tokens (BOS, CLS/SEP...).
        max_length: Truncate each text to this many tokens (None: no truncation).

    Returns:
        One :class:`SpannedTokens` per text.

    """
    fast = getattr(tokenizer, "is_fast", False)
    encoded = tokenizer(
        list(texts),
        add_special_tokens=add_special_tokens,
        truncation=max_length is not None,
        max_length=max_length,
        return_offsets_mapping=fast,
        return_special_tokens_mask=True,
    )
    result = []
    for i, (text, ids, special) in enumerate(
        zip(texts, encoded["input_ids"], encoded["special_tokens_mask"], strict=True)
    ):
        if fast:
            spans, nbytes = _tile(text, encoded["offset_mapping"][i], special)
        else:  # no offsets: each token's bytes are those of the token decoded alone (approximate)
            spans = [(-1, -1)] * len(ids)
            nbytes = [
                -1 if s else len(tokenizer.decode([t]).encode("utf-8"))
                for t, s in zip(ids, special, strict=True)
            ]
        result.append(SpannedTokens(list(ids), spans, nbytes))
    return result
