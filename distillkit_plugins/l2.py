"""``l2``: mean squared error between mapped student and teacher hidden states (TinyBERT style).

When the hidden sizes differ, the student's states go through a learned linear map (owned by the term).
"""

from __future__ import annotations

import torch

from distillkit import (
    HiddenStateParams,
    HiddenStateTerm,
    Taps,
    hookimpl,
)


class L2Params(HiddenStateParams):
    """Parameters of ``l2``: ``layer_map`` (default ``uniform``) and ``projection`` (``auto``)."""


class L2HiddenLoss(HiddenStateTerm):
    """Masked MSE over mapped layers, averaged over real tokens, hidden units and layer pairs."""

    name = "l2"
    Params = L2Params

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
        for hidden, target in self.mapped_states(student, teacher):
            squared = (hidden - target.to(hidden.dtype)).pow(2) * mask
            losses.append(squared.sum() / (tokens * hidden.shape[-1]))
        return torch.stack(losses).mean()


@hookimpl
def distillkit_register_losses(register):
    """Registers ``l2``."""
    register(L2HiddenLoss)
