"""``ce``: the student's cross-entropy on hard labels (fine-tuning without distillation, or alongside it)."""

from __future__ import annotations

import torch

from distillkit import hookimpl
from distillkit.divergences import label_cross_entropy
from distillkit.terms import LossTerm, TapRequest, Taps


class CrossEntropyLoss(LossTerm):
    """Cross-entropy of the student's logits ``[B, C]`` (or ``[B, T, V]``, -100 ignored) against labels."""

    name = "ce"
    uses_teacher = False
    student_reads = TapRequest(logits=True, labels=True)

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss; ``teacher`` is not used."""
        if student.logits is None or student.labels is None:
            raise ValueError("ce needs the student's logits and labels in the batch")
        return label_cross_entropy(student.logits, student.labels)


@hookimpl
def distillkit_register_losses(register):
    """Registers ``ce``."""
    register(CrossEntropyLoss)
