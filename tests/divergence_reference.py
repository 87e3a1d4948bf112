"""Float64 divergences from their definitions: the yardstick for the losses and the fused ops."""

import torch


def float64_divergence(
    p: torch.Tensor, q: torch.Tensor, kind: str, beta: float, alpha: float
) -> torch.Tensor:
    """``D(p ‖ q)`` per row of two float64 distributions ``[..., V]`` (teacher ``p``, student ``q``)."""

    def kl(a, b):
        return torch.where(a > 0, a * (a.log() - b.log()), torch.zeros_like(a)).sum(-1)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "skew_forward_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    return kl(q, alpha * q + (1 - alpha) * p)
