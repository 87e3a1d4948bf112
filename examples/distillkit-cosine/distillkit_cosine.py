"""A third-party distillkit loss: ``token_cosine``, 1 − cos(student, teacher) over mapped hidden states.

Installing this package is all it takes: its entry point in group ``distillkit`` makes ``loss: token_cosine``
usable in any config. (distillkit's own ``cosine`` loss does the same and also learns a projection when the
hidden sizes differ; this module is the smallest complete example of a plugin.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillkit import LayerMapSpec, LossParams, LossTerm, TapRequest, Taps, hookimpl


class TokenCosineParams(LossParams):
    """Parameters of ``token_cosine``.

    Attributes:
        layer_map: Layer map (``uniform``, ``skip``, ``last`` or ``[[s, t], ...]``).
    """

    layer_map: LayerMapSpec = "last"


class TokenCosineLoss(LossTerm):
    """Mean over real tokens and layer pairs of ``1 − cos(h_student, h_teacher)`` (equal hidden sizes)."""

    name = "token_cosine"
    Params = TokenCosineParams
    student_reads = TapRequest(hidden_states=True)  # what it reads of each model: hidden states only
    teacher_reads = TapRequest(hidden_states=True)

    def __init__(self, params: TokenCosineParams, dims) -> None:
        super().__init__(params, dims)
        if dims.student_hidden != dims.teacher_hidden:
            raise ValueError("token_cosine needs equal hidden sizes; use cosine, which learns a projection")
        self.pairs = self.layer_pairs(params.layer_map)

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss from hidden states ``[B, T, H]``."""
        mask = student.token_mask()
        losses = []
        for s, t in self.pairs:
            cosine = F.cosine_similarity(student.hidden_states[s], teacher.hidden_states[t], dim=-1)
            losses.append(((1.0 - cosine) * mask).sum() / mask.sum().clamp_min(1.0))
        return torch.stack(losses).mean()


@hookimpl
def distillkit_register_losses(register):
    """Registers ``token_cosine``."""
    register(TokenCosineLoss)
