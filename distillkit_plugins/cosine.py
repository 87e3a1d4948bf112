"""``cosine``: cosine alignment of mapped hidden states (DistilBERT).

Sanh et al., "DistilBERT, a distilled version of BERT: smaller, faster, cheaper and lighter" (2019): besides
soft-target KD and masked-LM, the student's hidden states are aligned in direction with the teacher's by a
cosine embedding loss. Per mapped layer pair ``(s, t)``:

    L_(s,t) = Σ_{b,i} m_{b,i} · (1 − cos(P h_s[b, i], h_t[b, i])) / Σ_{b,i} m_{b,i}

over real tokens (``m`` the attention mask), and the loss is the mean over pairs. ``P`` is a learned linear
map (one per pair) when the hidden sizes differ (or ``projection: always``), the identity otherwise.
DistilBERT applies it to the last layer, the default map here.
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


class CosineParams(HiddenStateParams):
    """Parameters of ``cosine``: ``layer_map`` (default ``last``) and ``projection`` (``auto``)."""

    layer_map: LayerMapSpec = "last"


def safe_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity over the last dim, ``[..., H] -> [...]``.

    A vector shorter than ``eps`` has no direction: its cosine is 0 with a zero gradient
    (``F.cosine_similarity`` returns a gradient of size 1/eps there, which overflows half precision).
    """
    squares = a.pow(2).sum(-1) * b.pow(2).sum(-1)
    defined = squares > eps**4
    return torch.where(defined, (a * b).sum(-1) * squares.clamp_min(eps**4).rsqrt(), 0.0)


class CosineLoss(HiddenStateTerm):
    """Mean over real tokens and layer pairs of ``1 − cos(P h_student, h_teacher)``."""

    name = "cosine"
    Params = CosineParams

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss.

        Args:
            student: Student taps; ``hidden_states[s]`` is ``[B, T, H_s]``.
            teacher: Teacher taps; ``hidden_states[t]`` is ``[B, T, H_t]``.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs).

        """
        mask = student.token_mask()  # [B, T]
        losses = []
        for hidden, target in self.mapped_states(student, teacher):
            dtype = torch.promote_types(hidden.dtype, torch.float32)
            cosine = safe_cosine(hidden.to(dtype), target.to(dtype))
            weights = mask.to(dtype)
            losses.append(((1.0 - cosine) * weights).sum() / weights.sum().clamp_min(1.0))
        return torch.stack(losses).mean()


@hookimpl
def distillkit_register_losses(register):
    """Registers ``cosine``."""
    register(CosineLoss)
