"""``distillkit train-tokenizer``: a byte-level BPE tokenizer for the student, trained on the run's text.

The tokenizer is trained with the ``tokenizers`` library on the training split of the config's data (the
texts of ``data.text_column``, exactly the split the run trains on; the held-out text is never seen). It is
byte-level (every text can be encoded, no unknown token; the pre-tokenisation of GPT-2, Llama 3, SmolLM) and
keeps the teacher's special tokens (the same strings in the same roles), so the end-of-text token of both
models is one string. It is written to ``student.tokenizer`` (or ``--output``), where the run loads it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from distillkit.config import DistillConfig
from distillkit.errors import ConfigError
from distillkit.models import load_tokenizer
from distillkit.text_data import load_text_splits
from distillkit.tokenizers import SPECIAL_ROLES


def train_tokenizer(
    config: DistillConfig, vocab_size: int, output: str | Path | None = None
) -> dict[str, Any]:
    """Trains a byte-level BPE tokenizer on the run's training text and saves it as a fast tokenizer.

    Args:
        config: The run config (its data, and its teacher for the special tokens).
        vocab_size: Entries of the vocabulary, the 256 bytes and the special tokens included.
        output: Where to save it (default: ``student.tokenizer``); replaced if it exists.

    Returns:
        ``{"directory", "vocab_size", "texts", "shared_with_teacher"}`` (strings both vocabularies hold).

    Raises:
        ConfigError: Without an output directory, or for a vocabulary smaller than the bytes and specials.

    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    target = output or config.student.tokenizer
    if not target:
        raise ConfigError(
            "say where the tokenizer goes: set student.tokenizer in the config or pass --output DIR"
        )
    directory = Path(target)
    teacher = load_tokenizer(config.teacher)
    roles = {
        role: getattr(teacher, role) for role in SPECIAL_ROLES if getattr(teacher, role, None) is not None
    }
    specials = list(dict.fromkeys(roles.values()))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials) + 1:
        raise ConfigError(
            f"--vocab-size {vocab_size} leaves no room for merges: the {len(alphabet)} bytes and "
            f"{len(specials)} special tokens come first; use at least {len(alphabet) + len(specials) + 1}"
        )
    texts = load_text_splits(config.data)[0][config.data.text_column]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)
    temporary = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(temporary, directory)  # whole or not at all
    shared = len(tokenizer.get_vocab().keys() & teacher.get_vocab().keys())
    return {
        "directory": str(directory),
        "vocab_size": len(tokenizer),
        "texts": len(texts),
        "shared_with_teacher": shared,
    }
