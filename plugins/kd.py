"""``kd``: Hinton soft-target distillation, ``T² · KL(teacher ‖ student)``, plus optional hard-label CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from distillkit import hookimpl
from distillkit.losses import LossParams, LossTerm, Taps


class KDParams(LossParams):
    """Parameters of ``kd``.

    Attributes:
        temperature: Softmax temperature ``T`` (> 0).
        ce_weight: Weight of the hard-label cross-entropy added to the soft term (0 disables it).

    """

    temperature: float = Field(default=2.0, gt=0.0)
    ce_weight: float = Field(default=0.0, ge=0.0)


def _token_weights(student: Taps) -> torch.Tensor | None:
    """Returns ``[B, T]`` weights for token-level logits ``[B, T, V]`` (None for ``[B, C]`` logits)."""
    if student.logits.dim() == 2:
        return None
    return student.token_mask().float()


class KDLoss(LossTerm):
    """Soft-target KD on logits ``[B, C]`` (per example) or ``[B, T, V]`` (per real token).

    The KL is summed over classes and averaged over examples (or real tokens), then scaled by ``T²`` so its
    gradient scale does not depend on ``T``.
    """

    name = "kd"
    Params = KDParams

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss.

        Args:
            student: Student taps with ``logits`` ``[B, C]`` or ``[B, T, V]``.
            teacher: Teacher taps with logits of the same shape.

        Returns:
            Scalar loss.

        """
        if student.logits is None or teacher.logits is None:
            raise ValueError("kd needs logits from both models (use models with a task head)")
        if student.logits.shape != teacher.logits.shape:
            raise ValueError(
                f"kd needs logits of equal shape, got student {tuple(student.logits.shape)} and teacher "
                f"{tuple(teacher.logits.shape)}; the models must share the label set or vocabulary"
            )
        temperature = self.params.temperature
        log_p_student = F.log_softmax(student.logits.float() / temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher.logits.float() / temperature, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)  # [B] or [B, T]
        weights = _token_weights(student)
        if weights is None:
            soft = kl.mean()
        else:
            soft = (kl * weights).sum() / weights.sum().clamp_min(1.0)
        loss = temperature**2 * soft
        if self.params.ce_weight > 0:
            if student.labels is None:
                raise ValueError("kd with ce_weight > 0 needs labels in the batch")
            logits = student.logits.float()
            loss = loss + self.params.ce_weight * F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), student.labels.reshape(-1), ignore_index=-100
            )
        return loss


@hookimpl
def distillkit_register_losses(register):
    """Registers ``kd``."""
    register(KDLoss)
