"""``l2``: mean squared error between mapped student and teacher hidden states (TinyBERT style).

When the hidden sizes differ, the student's states go through a learned linear map (owned by the term).
"""

from __future__ import annotations

from typing import Literal

import torch

from distillkit import (
    LayerMapSpec,
    LossParams,
    LossTerm,
    ModelDims,
    TapRequest,
    Taps,
    hookimpl,
    student_projections,
)


class L2Params(LossParams):
    """Parameters of ``l2``.

    Attributes:
        layer_map: Layer map (``uniform``, ``skip``, ``last`` or ``[[s, t], ...]``).
        projection: ``auto`` adds a linear map when hidden sizes differ; ``always``/``never`` force it.

    """

    layer_map: LayerMapSpec = "uniform"
    projection: Literal["auto", "always", "never"] = "auto"


class L2HiddenLoss(LossTerm):
    """Masked MSE over mapped layers, averaged over real tokens, hidden units and layer pairs."""

    name = "l2"
    Params = L2Params
    student_reads = TapRequest(hidden_states=True)
    teacher_reads = TapRequest(hidden_states=True)

    def __init__(self, params: L2Params, dims: ModelDims) -> None:
        super().__init__(params, dims)
        self.pairs = self.layer_pairs(params.layer_map)
        self.projections = student_projections(self.name, params.projection, self.pairs, dims)

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss.

        Args:
            student: Student taps; ``hidden_states[i]`` is ``[B, T, H_s]``.
            teacher: Teacher taps; ``hidden_states[j]`` is ``[B, T, H_t]``.

        Returns:
            Scalar loss.

        """
        mask = student.token_mask().unsqueeze(-1)  # [B, T, 1]
        tokens = mask.sum().clamp_min(1.0)
        losses = []
        for index, (s, t) in enumerate(self.pairs):
            hidden = student.hidden_states[s]
            if self.projections is not None:
                hidden = self.projections[index](hidden)
            target = teacher.hidden_states[t].to(hidden.dtype)
            squared = (hidden - target).pow(2) * mask
            losses.append(squared.sum() / (tokens * hidden.shape[-1]))
        return torch.stack(losses).mean()


@hookimpl
def distillkit_register_losses(register):
    """Registers ``l2``."""
    register(L2HiddenLoss)
