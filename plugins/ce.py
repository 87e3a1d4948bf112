"""``ce``: the student's cross-entropy on hard labels (fine-tuning without distillation, or alongside it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillkit import hookimpl
from distillkit.losses import LossTerm, TapRequest, Taps


class CrossEntropyLoss(LossTerm):
    """Cross-entropy of the student's logits ``[B, C]`` (or ``[B, T, V]``, -100 ignored) against labels."""

    name = "ce"
    uses_teacher = False
    student_reads = TapRequest(logits=True, labels=True)

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss; ``teacher`` is not used."""
        if student.logits is None or student.labels is None:
            raise ValueError("ce needs the student's logits and labels in the batch")
        logits = student.logits.float()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), student.labels.reshape(-1), ignore_index=-100
        )


@hookimpl
def distillkit_register_losses(register):
    """Registers ``ce``."""
    register(CrossEntropyLoss)
