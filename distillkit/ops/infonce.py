"""The public memory-bank InfoNCE op."""

from __future__ import annotations

import torch

from distillkit.ops import _loader
from distillkit.ops._validate import canonicalize
from distillkit.ops.reference import _ReferenceFunction


def membank_infonce(
    query: torch.Tensor,
    positive: torch.Tensor,
    bank: torch.Tensor,
    temperature: float,
    *,
    query_labels: torch.Tensor | None = None,
    bank_labels: torch.Tensor | None = None,
    negative_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row InfoNCE of each query against its positive and a memory bank of negatives, fused.

    ``loss = -s_pos/τ + logsumexp([s_pos, s_neg_1, ..., s_neg_K]/τ)`` with ``s = dot(query, key)`` (no
    normalisation inside: normalise the vectors first for cosine similarity). The ``B × K`` similarity
    matrix is never stored; the backward pass needs no second pass over the bank. Uses the compiled kernel
    for the inputs' device when built, else the chunked pure-PyTorch reference.

    Args:
        query: ``[..., B, D]`` float32, bfloat16, float16 or float64; leading dims (e.g. layers) are
            batched in one call.
        positive: ``[..., B, D]``, same shape and dtype.
        bank: ``[..., K, D]`` with the same leading dims, or ``[K, D]`` shared by all of them (not
            copied); ``N`` rows instead of ``K`` when ``negative_index`` is given. Receives no gradient.
        temperature: τ > 0.
        query_labels: ``[B]`` integer labels; a bank row with the query's label is not a negative. A row
            left with no negative has loss 0.
        bank_labels: ``[K]`` (``[N]``) integer labels; required with ``query_labels``.
        negative_index: ``[..., B, K]`` int64 rows of the bank: per-query negatives (CRD style), fused
            so that the gathered ``[..., B, K, D]`` keys are never made.

    Returns:
        ``[..., B]`` loss, float32 (float64 for float64 inputs); gradients reach query and positive in
        their own dtype (accumulated in float32).

    Raises:
        TypeError: Wrong argument type or dtype.
        ValueError: Wrong shape, device or value (the message names the argument and the fix).
    """
    c = canonicalize(query, positive, bank, temperature, query_labels, bank_labels, negative_index)
    args = (c.query, c.positive, c.bank, c.temperature, c.query_labels, c.bank_labels, c.negative_index)
    if _loader.kernel_available(c.query.device.type):
        loss = torch.ops.distillkit.membank_infonce_fwd(*args)[0]
    else:
        loss = _ReferenceFunction.apply(*args)
    return loss.reshape(*c.lead_shape, c.query.shape[1])
