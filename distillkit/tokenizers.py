"""Comparing tokenizers: whether two models read the same token ids for the same text.

:func:`compare_tokenizers` lists every difference that changes what a model sees (vocabulary strings and
ids, special tokens, how a sample text is split); :func:`describe_tokenizer` names a tokenizer in messages;
:func:`has_tokenizer_files` tells whether a model folder ships a tokenizer at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distillkit.errors import quote_input

SAMPLE_TEXTS = ("Hello World! Tokenizers split THIS text, don't they? 1234 café",)
"""Texts both tokenizers encode, so differences of normalisation (lower-casing, accents) show."""

SPECIAL_TOKENS = ("pad_token", "unk_token", "bos_token", "eos_token", "cls_token", "sep_token", "mask_token")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")
_TOKENIZER_SUFFIXES = (".model", ".tiktoken")


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether a model folder holds a tokenizer (``tokenizer.json``, a vocabulary, a sentencepiece model)."""
    folder = Path(directory)
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return True
    return any(p.suffix in _TOKENIZER_SUFFIXES for p in folder.iterdir() if p.is_file())


def describe_tokenizer(tokenizer: Any) -> str:
    """``'path' (BertTokenizerFast, 30,522 tokens)``, for messages."""
    source = getattr(tokenizer, "name_or_path", "")
    where = quote_input(str(source)) if source else "built in memory"
    return f"{where} ({type(tokenizer).__name__}, {len(tokenizer):,} tokens)"


def _examples(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (", ..." if len(items) > limit else "")


def _special(tokenizer: Any, name: str) -> tuple[str | None, int | None]:
    token = getattr(tokenizer, name, None)
    if token is None:
        return None, None
    return str(token), tokenizer.convert_tokens_to_ids(str(token))


def compare_tokenizers(a: Any, b: Any, samples: Sequence[str] = SAMPLE_TEXTS) -> list[str]:
    """Lists how two tokenizers differ in what a model would see; empty when they agree.

    Args:
        a: A Hugging Face tokenizer (``get_vocab()``, special-token attributes, callable on text).
        b: Another.
        samples: Texts whose token ids must agree too (catches other normalisation with the same vocabulary).

    Returns:
        One line per difference, ``a``'s side first: vocabulary size, tokens only one has, tokens with other
        ids, special tokens, and sample texts encoded differently.

    """
    differences = []
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if len(vocab_a) != len(vocab_b):
        differences.append(f"vocabulary size {len(vocab_a):,} vs {len(vocab_b):,}")
    only_a = sorted(set(vocab_a) - set(vocab_b), key=vocab_a.get)
    only_b = sorted(set(vocab_b) - set(vocab_a), key=vocab_b.get)
    if only_a:
        differences.append(
            f"{len(only_a):,} tokens only in the first ({_examples([repr(t) for t in only_a])})"
        )
    if only_b:
        differences.append(
            f"{len(only_b):,} tokens only in the second ({_examples([repr(t) for t in only_b])})"
        )
    moved = sorted((t for t in set(vocab_a) & set(vocab_b) if vocab_a[t] != vocab_b[t]), key=vocab_a.get)
    if moved:
        shown = [f"{t!r}: {vocab_a[t]} vs {vocab_b[t]}" for t in moved]
        differences.append(f"{len(moved):,} tokens have other ids ({_examples(shown)})")
    for name in SPECIAL_TOKENS:
        special_a, special_b = _special(a, name), _special(b, name)
        if special_a != special_b:
            differences.append(
                f"{name} {special_a[0]!r} (id {special_a[1]}) vs {special_b[0]!r} (id {special_b[1]})"
            )
    if not differences:  # same vocabulary: does the text still split the same way?
        for text in samples:
            ids_a, ids_b = a(text)["input_ids"], b(text)["input_ids"]
            if list(ids_a) != list(ids_b):
                differences.append(f"{text!r} is encoded as {list(ids_a)} vs {list(ids_b)}")
    return differences
