"""``ce``: the student's cross-entropy on hard labels (fine-tuning without distillation, or alongside it)."""

from __future__ import annotations

import torch

from distillkit import LossTerm, TapRequest, Taps, hookimpl
from distillkit.ops import fused_linear_divergence, label_cross_entropy


class CrossEntropyLoss(LossTerm):
    """Cross-entropy of the student's logits ``[B, C]`` (or ``[B, T, V]``, -100 ignored) against labels."""

    name = "ce"
    uses_teacher = False
    reads_output_layer = True
    student_reads = TapRequest(logits=True, labels=True)

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss; ``teacher`` is not used."""
        if student.labels is None:
            raise ValueError("ce needs labels in the batch")
        if student.logits is None and student.output_hidden is not None:
            return self._from_output_layer(student)
        if student.logits is None:
            raise ValueError("ce needs the student's logits (use a model with a task head)")
        return label_cross_entropy(student.logits, student.labels)

    def _from_output_layer(self, student: Taps) -> torch.Tensor:
        """The same loss from the student's output layer, never building the ``[B, T, V]`` logits.

        The fused op computes a divergence too; with every row's divergence weight zero it only adds the
        cross-entropy (its teacher side runs on the student's own detached rows).
        """
        hidden, weight = student.output_hidden, student.output_weight
        rows = hidden.shape[:-1].numel()
        flat = hidden.reshape(rows, -1)
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_divergence(
                flat,
                weight,
                flat.detach(),
                weight.detach(),
                mask=torch.zeros(rows, dtype=torch.bool, device=hidden.device),
                labels=student.labels.reshape(rows),
                ce_weight=1.0,
            )


@hookimpl
def distillkit_register_losses(register):
    """Registers ``ce``."""
    register(CrossEntropyLoss)
