"""``pkd``: Patient Knowledge Distillation of intermediate first-token vectors.

Sun et al., "Patient Knowledge Distillation for BERT Model Compression", EMNLP 2019. The first-token
(``[CLS]``) vectors of mapped intermediate layers are normalised to unit length and compared (the paper's
``L_PT``)::

    L = mean over examples b and layer pairs (s, t) of ‖ u(P h_s[b, 0]) − u(h_t[b, 0]) ‖²₂,   u(v) = v / ‖v‖₂

``P`` is a learned linear map (one per pair) when the hidden sizes differ (or ``projection: always``), the
identity otherwise; the paper distils between models of equal width. The default map, ``skip``, is
PKD-Skip (student layer ``i`` with teacher layer ``i · T/S``); the paper leaves the last pair to the
logit-level KD term, which explicit pairs (``[[1, 2], [2, 4], ...]``) reproduce.
"""

from __future__ import annotations

import torch

from distillkit import (
    HiddenStateParams,
    HiddenStateTerm,
    LayerMapSpec,
    Taps,
    hookimpl,
)


class PKDParams(HiddenStateParams):
    """Parameters of ``pkd``: ``layer_map`` (default ``skip``, PKD-Skip) and ``projection`` (``auto``)."""

    layer_map: LayerMapSpec = "skip"


def unit(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x / ‖x‖`` over the last dim; a vector shorter than ``eps`` maps to 0 with a zero gradient.

    (``F.normalize`` gives a gradient of size 1/eps there, which overflows half precision.)
    """
    squares = x.pow(2).sum(-1, keepdim=True)
    return torch.where(squares > eps * eps, x * squares.clamp_min(eps * eps).rsqrt(), 0.0)


class PatientKDLoss(HiddenStateTerm):
    """Mean squared distance between unit-length first-token vectors of mapped layers."""

    name = "pkd"
    Params = PKDParams

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss.

        Args:
            student: Student taps; ``hidden_states[s]`` is ``[B, T, H_s]`` (position 0 is read).
            teacher: Teacher taps; ``hidden_states[t]`` is ``[B, T, H_t]``.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs).

        """
        losses = []
        for first, target in self.mapped_states(student, teacher, select=lambda hidden: hidden[:, 0]):
            dtype = torch.promote_types(first.dtype, torch.float32)
            u_s = unit(first.to(dtype))
            u_t = unit(target.to(dtype))
            losses.append((u_s - u_t).pow(2).sum(dim=-1).mean())
        return torch.stack(losses).mean()


@hookimpl
def distillkit_register_losses(register):
    """Registers ``pkd``."""
    register(PatientKDLoss)
