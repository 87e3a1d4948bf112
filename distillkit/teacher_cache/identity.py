"""What a teacher cache was written with: format, teacher and tokenizer fingerprints, what is stored."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FORMAT = 1
"""The version of the cache layout; a cache of another version is refused."""

LOG_TAIL_FLOOR = -80.0
"""The smallest stored log tail mass (``e^-80``): a tail that rounds to zero still gives finite logits."""


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's config and every parameter and buffer, bytes included.

    Robust to where the weights came from (a path, a fine-tuning cache, a random init with a seed): two
    teachers have the same fingerprint exactly when their weights and architecture are identical.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
        settings.pop("transformers_version", None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_settings(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer settings a cache depends on: class, vocabulary (hashed), padding and truncation sides."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "vocab_sha256": hashlib.sha256(vocab).hexdigest()[:16],
        "padding_side": tokenizer.padding_side,
        "truncation_side": getattr(tokenizer, "truncation_side", None),
        "pad_token_id": tokenizer.pad_token_id,
    }


def resolved_precision(precision: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what ``train.precision`` means on ``device`` (see ``loop.autocast_factory``)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


@dataclass(frozen=True)
class CacheContents:
    """What a cache stores of the teacher.

    Attributes:
        layers: Hidden-state layers stored (0 = embeddings), or ``()`` for none.
        attentions: Whether attention maps of every layer are stored.
        logits: ``dense``, ``topk`` or None.
        top_k: ``k`` of ``topk`` logits.
        modules: Module paths stored.

    """

    layers: tuple[int, ...] = ()
    attentions: bool = False
    logits: str | None = None
    top_k: int | None = None
    modules: tuple[str, ...] = ()

    def describe(self) -> str:
        """For messages: ``hidden states of layers 0, 2, 4; logits (top-16)``."""
        parts = []
        if self.layers:
            parts.append("hidden states of layers " + ", ".join(map(str, self.layers)))
        if self.attentions:
            parts.append("attention maps")
        if self.logits:
            parts.append("logits" + (f" (top-{self.top_k})" if self.logits == "topk" else ""))
        parts += [f"module '{path}'" for path in self.modules]
        return "; ".join(parts) or "nothing"


def tokenizers_meta(tokenizer: Any, student_tokenizer: Any = None) -> dict[str, Any]:
    """The tokenizer entries of a cache's settings (known before any weights load).

    Args:
        tokenizer: The teacher's tokenizer.
        student_tokenizer: The student's when it differs from the teacher's (its tokens cut the text into the
            blocks the teacher's outputs are stored for), else None.

    """
    student = None if student_tokenizer is None else tokenizer_settings(student_tokenizer)
    return {"tokenizer": tokenizer_settings(tokenizer), "student_tokenizer": student}


def expected_meta(
    config: Any, teacher: nn.Module, tokenizer: Any, device: torch.device, student_tokenizer: Any = None
) -> dict[str, Any]:
    """The settings a cache must have been written with to serve a run of ``config`` (compared key by key).

    Args:
        config: The :class:`~distillkit.config.DistillConfig` (its task, data and precision count).
        teacher: The teacher model (its weights' fingerprint counts).
        tokenizer: The teacher's tokenizer (its settings count).
        device: Where the run computes (the precision ``auto`` resolves to depends on it).
        student_tokenizer: The student's tokenizer when it differs from the teacher's (see
            :func:`tokenizers_meta`).

    """
    data = config.data.training_identity()
    return {
        "format": FORMAT,
        "task": config.task,
        "teacher": model_fingerprint(teacher),
        **tokenizers_meta(tokenizer, student_tokenizer),
        "data": data,
        "precision": resolved_precision(config.train.precision, device),
    }
