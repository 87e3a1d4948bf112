"""Float64 ground truth for the memory-bank InfoNCE tests, written independently of the package."""

from __future__ import annotations

import torch


def float64_truth(
    query, positive, bank, temperature, query_labels=None, bank_labels=None, negative_index=None
):
    """Loss [..., B] in float64, one query row at a time (no chunking, no online softmax)."""
    q = query.detach().double()
    p = positive.detach().double()
    lead = q.shape[:-2]
    batch, dim = q.shape[-2:]
    q = q.reshape(-1, batch, dim)
    p = p.reshape(-1, batch, dim)
    bk = bank.detach().double()
    bk = bk.expand(q.shape[0], *bk.shape) if bk.dim() == 2 else bk.reshape(q.shape[0], -1, dim)
    out = torch.empty(q.shape[0], batch, dtype=torch.float64)
    for layer in range(q.shape[0]):
        for b in range(batch):
            if negative_index is None:
                rows = torch.arange(bk.shape[1])
            else:
                rows = negative_index.reshape(q.shape[0], batch, -1)[layer, b]
            if query_labels is not None:
                rows = rows[bank_labels[rows] != query_labels[b]]
            s_pos = q[layer, b] @ p[layer, b]
            s_neg = bk[layer, rows] @ q[layer, b]
            logits = torch.cat([s_pos.view(1), s_neg]) / temperature
            out[layer, b] = torch.logsumexp(logits, 0) - logits[0]
    return out.reshape(*lead, batch)
