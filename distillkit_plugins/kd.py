"""``kd``: soft-target distillation with a choice of token-level divergence, plus optional hard-label CE.

``T² ×`` the mean over counted positions of ``D(p ‖ q)``, with ``p = softmax(teacher logits / T)`` and
``q = softmax(student logits / T)``. ``D`` is one of (see :mod:`distillkit.ops.divergences`):

- ``forward_kl`` — ``KL(p ‖ q)`` (Hinton, Vinyals & Dean 2015);
- ``reverse_kl`` — ``KL(q ‖ p)`` (Gu et al. 2024, MiniLLM);
- ``jsd`` — ``β·KL(p ‖ m) + (1−β)·KL(q ‖ m)``, ``m = β·p + (1−β)·q`` (Agarwal et al. 2024, GKD);
- ``tvd`` — ``½·Σ|p − q|`` (total variation distance);
- ``skew_forward_kl`` — ``KL(p ‖ α·p + (1−α)·q)`` and ``skew_reverse_kl`` — ``KL(q ‖ α·q + (1−α)·p)``
  (Ko et al. 2024, DistiLLM).

Counted positions: every example for ``[B, C]`` logits; for ``[B, T, V]`` logits the positions of
``student.position_mask()``: those the task's token labels count (next-token positions for a causal LM, masked
positions for a masked LM), else every real token.

When the loop gives the models' output layers in place of logits (``train.fused_logits``, see
:mod:`distillkit.objective.output_layer`), the same loss is computed by
:func:`distillkit.ops.fused_linear_divergence`
without building either ``[B, T, V]`` tensor. A teacher read from a top-k cache then gives its top-k tokens
and tail mass (``Taps.topk_logits``) and the loss goes through
:func:`distillkit.ops.fused_linear_divergence_topk` (no teacher GEMM, no ``[B, T, V]`` tensor), with the tail
as ``topk_tail`` says: ``spread`` (default) spreads it evenly over the other tokens, exactly the teacher the
cache's dense logits give, for any divergence;
``bucket`` compares the student's mass outside the top k with the teacher's tail as one bucket (as verl and
Arcee's DistillKit do; ``forward_kl``, ``reverse_kl``, ``jsd``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from distillkit import ConfigError, LossParams, LossTerm, TapRequest, Taps, TaskInfo, hookimpl
from distillkit.ops import (
    BUCKET_DIVERGENCES,
    DIVERGENCES,
    TOPK_TAILS,
    divergence,
    fused_linear_divergence,
    fused_linear_divergence_topk,
    label_cross_entropy,
)


class KDParams(LossParams):
    """Parameters of ``kd``.

    Attributes:
        divergence: The token-level divergence ``D(p ‖ q)`` between teacher ``p`` and student ``q``.
        temperature: Softmax temperature ``T`` (> 0).
        beta: ``jsd``'s mixing weight ``β`` in ``(0, 1)``; accepted only with ``divergence: jsd``.
        alpha: The skew weight ``α`` in ``(0, 1)``; accepted only with the ``skew_*`` divergences.
        ce_weight: Weight of the hard-label cross-entropy added to the soft term (0 disables it).
        topk_tail: With a teacher read from a top-k cache through the output layers: ``spread`` its tail mass
            evenly over the other tokens (the cache's dense logits), or compare it as one ``bucket``.

    """

    divergence: Literal[DIVERGENCES] = "forward_kl"  # the names distillkit.ops.DIVERGENCES lists
    temperature: float = Field(default=2.0, gt=0.0)
    beta: float = Field(default=0.5, gt=0.0, lt=1.0)
    alpha: float = Field(default=0.1, gt=0.0, lt=1.0)
    ce_weight: float = Field(default=0.0, ge=0.0)
    topk_tail: Literal[TOPK_TAILS] = "spread"  # the names distillkit.ops.TOPK_TAILS lists

    @model_validator(mode="after")
    def _mixing_weights_match_divergence(self) -> KDParams:
        """Refuses ``beta`` without ``jsd`` and ``alpha`` without a skew divergence."""
        if "beta" in self.model_fields_set and self.divergence != "jsd":
            raise ValueError(
                f"beta applies only to divergence 'jsd' (got divergence '{self.divergence}'); "
                "remove beta or set divergence: jsd"
            )
        if "alpha" in self.model_fields_set and not self.divergence.startswith("skew_"):
            raise ValueError(
                f"alpha applies only to divergences 'skew_forward_kl' and 'skew_reverse_kl' (got divergence "
                f"'{self.divergence}'); remove alpha or choose a skew divergence"
            )
        if self.topk_tail == "bucket" and self.divergence not in BUCKET_DIVERGENCES:
            raise ValueError(
                f"topk_tail: bucket has {', '.join(BUCKET_DIVERGENCES)}, not divergence '{self.divergence}'; "
                "use topk_tail: spread"
            )
        return self


class KDLoss(LossTerm):
    """Soft-target KD with a token-level divergence, on logits ``[B, C]`` or ``[B, T, V]``.

    The divergence is summed over classes, averaged over examples (or counted tokens), then scaled by ``T²``
    so its gradient scale does not depend on ``T``. Computed in float32 (also under autocast).
    """

    name = "kd"
    Params = KDParams
    reads_output_layer = True
    teacher_reads = TapRequest(logits=True)

    def tap_requests(self) -> tuple[TapRequest, TapRequest]:
        """Logits of both models; the student's labels too when ``ce_weight > 0``."""
        return TapRequest(logits=True, labels=self.params.ce_weight > 0), self.teacher_reads

    def teacher_logit_temperature(self) -> float:
        """Teacher logits are read at ``temperature`` (several teachers are mixed at it)."""
        return self.params.temperature

    def reads_topk_teacher(self) -> bool:
        """Reads a top-k teacher in every divergence (``topk_tail: bucket`` checks its own at config time)."""
        return True

    def topk_logits_note(self) -> str | None:
        """Every divergence but ``forward_kl``/``tvd`` at temperature 1 weighs the evenly spread tail."""
        params = self.params
        if params.divergence not in ("forward_kl", "tvd"):
            return (
                f"divergence '{params.divergence}' weighs the teacher's tail probabilities, which the cache "
                "spreads evenly, so it is approximate"
            )
        if params.temperature != 1.0:
            return (
                f"at temperature {params.temperature:g} the cached top-k distribution is rescaled with its "
                "evenly spread tail, so it is approximate"
            )
        return None

    def check_cross_tokenizer(self, task: TaskInfo) -> None:
        """Works on class logits (they do not depend on the tokens); refuses next-token distributions.

        Those are compared position by position over one vocabulary, and two tokenizers' differ.
        """
        if task.logits == "class":
            return
        raise ConfigError(
            "loss 'kd' compares the two models' next-token distributions position by position over one "
            "vocabulary, and their tokens and vocabularies differ"
        )

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss.

        Args:
            student: Student taps with ``logits`` ``[B, C]`` or ``[B, T, V]``.
            teacher: Teacher taps with logits of the same shape.

        Returns:
            Scalar float32 loss.

        """
        if student.logits is None and student.output_hidden is not None:
            return self._from_output_layers(student, teacher)
        if student.logits is None or teacher.logits is None:
            raise ValueError("kd needs logits from both models (use models with a task head)")
        if student.logits.shape != teacher.logits.shape:
            raise ValueError(
                f"kd needs logits of equal shape, got student {tuple(student.logits.shape)} and teacher "
                f"{tuple(teacher.logits.shape)}; the models must share the label set or vocabulary"
            )
        params = self.params
        with torch.autocast(student.logits.device.type, enabled=False):
            temperature = params.temperature
            log_q = F.log_softmax(student.logits.float() / temperature, dim=-1)
            log_p = F.log_softmax(teacher.logits.float() / temperature, dim=-1)
            per_position = divergence(log_p, log_q, params.divergence, beta=params.beta, alpha=params.alpha)
            if student.logits.dim() == 2:
                soft = per_position.mean()
            else:
                counted = student.position_mask().to(per_position.device) > 0  # [B, T]
                total = torch.where(counted, per_position, torch.zeros_like(per_position)).sum()
                soft = total / counted.sum().clamp_min(1)
            loss = temperature**2 * soft
            if params.ce_weight > 0:
                if student.labels is None:
                    raise ValueError("kd with ce_weight > 0 needs labels in the batch")
                loss = loss + params.ce_weight * label_cross_entropy(student.logits, student.labels)
        return loss

    def _from_output_layers(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """The same loss from both models' output layers (or a top-k teacher), never building the logits."""
        topk = teacher.topk_logits
        if topk is None and (teacher.output_hidden is None or teacher.output_weight is None):
            raise ValueError("kd reads the student's output layer, so it needs the teacher's too")
        params = self.params
        rows = student.output_hidden.shape[:-1].numel()
        common = {
            "divergence": params.divergence,
            "temperature": params.temperature,
            "beta": params.beta,
            "alpha": params.alpha,
            "mask": student.position_mask().reshape(rows).to(student.output_hidden.device) > 0,
            "labels": None,
            "ce_weight": params.ce_weight,
        }
        if params.ce_weight > 0:
            if student.labels is None:
                raise ValueError("kd with ce_weight > 0 needs labels in the batch")
            common["labels"] = student.labels.reshape(rows)
        hidden = student.output_hidden.reshape(rows, -1)
        with torch.autocast(student.output_hidden.device.type, enabled=False):
            if topk is not None:
                k = topk.index.shape[-1]
                return fused_linear_divergence_topk(
                    hidden,
                    student.output_weight,
                    topk.index.reshape(rows, k),
                    topk.logp.reshape(rows, k),
                    topk.log_tail.reshape(rows),
                    tail=params.topk_tail,
                    **common,
                )
            return fused_linear_divergence(
                hidden,
                student.output_weight,
                teacher.output_hidden.reshape(rows, -1),
                teacher.output_weight,
                **common,
            )


@hookimpl
def distillkit_register_losses(register):
    """Registers ``kd``."""
    register(KDLoss)
