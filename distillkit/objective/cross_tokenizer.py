"""A student with another tokenizer than its teacher: which terms of the objective may run, and vocabularies.

Each model runs on its own tokens of the same text (:func:`distillkit.objective.taps.teacher_view`), so a term
that compares the models position by position has nothing to compare; :func:`check_across_tokenizers` refuses
such an objective before any weights load, naming the terms, both tokenizers and the losses that do work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from distillkit.errors import ConfigError
from distillkit.objective.objective import DistillationObjective
from distillkit.objective.terms import TaskInfo


def cross_tokenizer_losses() -> list[str]:
    """Names of the registered losses that work across tokenizers (they declare it, or read no teacher)."""
    from distillkit.registry import loss_registry

    return sorted(
        name
        for name, info in loss_registry().items()
        if info.cls.cross_tokenizer or not info.cls.uses_teacher
    )


def check_across_tokenizers(
    objective: DistillationObjective, task: TaskInfo, tokenizers: str, differences: Sequence[str]
) -> None:
    """Refuses every term of ``objective`` that cannot compare two models with different tokenizers.

    Args:
        objective: The objective (built, no weights needed).
        task: The task.
        tokenizers: Both tokenizers in words, e.g. ``"teacher X (...) and student Y (...)"``.
        differences: What differs between them (:func:`distillkit.tokenizers.compare_tokenizers`).

    Raises:
        ConfigError: Naming each refused term and why, both tokenizers, how they differ and the losses that
            work across tokenizers.

    """
    refused = []
    for label, term in objective.terms.items():
        try:
            term.check_cross_tokenizer(task)
        except ConfigError as exc:
            refused.append(f"objective term '{label}': {exc}")
    if not refused:
        return
    logits = any(term.tap_requests()[1].logits for term in objective.terms.values())
    hint = " (for logits: uld or gold, which align the two tokenizations by their character spans)"
    raise ConfigError(
        f"{'; '.join(refused)}. The {tokenizers} differ ({'; '.join(differences[:3])}), so each model reads "
        f"its own tokens of the text. Losses that work across tokenizers: "
        f"{', '.join(cross_tokenizer_losses())}{hint if logits else ''}. Replace the term, or give the "
        "student the teacher's tokenizer"
    )


def share_vocabularies(
    objective: DistillationObjective, student: Mapping[str, int], teacher: Mapping[str, int]
) -> None:
    """Gives every term the two vocabularies (see ``LossTerm.use_vocabularies``)."""
    for term in objective.terms.values():
        term.use_vocabularies(student, teacher)
