"""Pure-PyTorch forms of the memory-bank InfoNCE loss: the chunked reference, the naive one, the exact one.

The reference computes the same ``(loss, lse, wsum)`` as the compiled op with an online softmax over bank
chunks, so its memory stays bounded for any bank size and it runs on any device; it shares the compiled
op's backward. It is the fallback when the extension is missing. The naive form materialises the logits
(``[..., B, K+1]``, or the gathered ``[..., B, K, D]`` keys with ``negative_index``) and is differentiated by
autograd: the baseline for tests and benchmarks. The exact form evaluates the formula in float64 from the
inputs as a kernel reads them (float32 optionally rounded to tf32, as tensor cores read it): the yardstick of
the self-check.
"""

from __future__ import annotations

import torch

from distillkit.ops.infonce.backward import input_gradients, save_for_backward
from distillkit.ops.infonce.validate import InfonceArgs, canonicalize

# Elements of the per-chunk score (and gathered-key) temporaries the reference allows itself.
_CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather_keys(bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``bank`` (``[L, N, D]`` or ``[N, D]``) at ``index`` ``[L, B, c]`` -> ``[L, B, c, D]``."""
    if bank.dim() == 2:
        return bank[index]
    layer = torch.arange(bank.shape[0], device=bank.device).view(-1, 1, 1)
    return bank[layer, index]


def reference_forward(args: InfonceArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward pass on canonical arguments, chunked over the bank (or over ``negative_index``'s K).

    Args:
        args: Canonical :class:`InfonceArgs`.

    Returns:
        ``(loss [L, B], lse [L, B], wsum [L, B, D])`` in float32 (float64 for float64 inputs).
    """
    query, positive, bank, temperature, query_labels, bank_labels, negative_index = args.op_inputs()
    acc = _acc_dtype(query.dtype)
    with torch.no_grad():
        q = query.to(acc)
        s_pos = (q * positive.to(acc)).sum(-1) / temperature
        m = s_pos.clone()
        neg = torch.zeros_like(s_pos)  # sum over valid negatives of exp(s_j - m)
        w = torch.zeros_like(q)
        layers, batch, dim = q.shape
        count = negative_index.shape[-1] if negative_index is not None else bank.shape[-2]
        per_col = layers * batch * (dim if negative_index is not None else 1)
        chunk = max(1, min(count, _CHUNK_ELEMENTS // max(1, per_col)))
        for j0 in range(0, count, chunk):
            if negative_index is None:
                keys = bank[..., j0 : j0 + chunk, :].to(acc)  # [L, c, D] or [c, D]
                scores = q @ keys.transpose(-1, -2) / temperature  # [L, B, c]
                if query_labels is not None:
                    same = query_labels[:, None] == bank_labels[None, j0 : j0 + chunk]
                    scores = scores.masked_fill(same, float("-inf"))
            else:
                index = negative_index[..., j0 : j0 + chunk]
                keys = _gather_keys(bank, index).to(acc)  # [L, B, c, D]
                scores = (keys @ q.unsqueeze(-1)).squeeze(-1) / temperature
                if query_labels is not None:
                    scores = scores.masked_fill(bank_labels[index] == query_labels[:, None], float("-inf"))
            m_new = torch.maximum(m, scores.amax(-1))
            alpha = torch.exp(m - m_new)
            p = torch.exp(scores - m_new.unsqueeze(-1))
            neg = neg * alpha + p.sum(-1)
            keys = torch.nan_to_num(keys, nan=0.0, posinf=0.0, neginf=0.0)  # masked keys: p = 0, 0 * NaN
            if negative_index is None:
                w = w * alpha.unsqueeze(-1) + p @ keys
            else:
                w = w * alpha.unsqueeze(-1) + (p.unsqueeze(-2) @ keys).squeeze(-2)
            m = m_new
        total = torch.exp(s_pos - m) + neg
        lse = m + torch.log(total)
        # lse - s_pos without the cancellation: log1p when the positive holds the max, else two terms >= 0.
        loss = torch.where(m == s_pos, torch.log1p(neg), (m - s_pos) + torch.log(total))
        return loss, lse, w / total.unsqueeze(-1)


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to tf32 as tensor cores read it: 10 mantissa bits, to nearest, ties away.

    The same rounding as CUDA's ``cvt.rna.tf32.f32``; Inf and NaN are kept.
    """
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    finite = (bits & 0x7F800000) != 0x7F800000
    return torch.where(finite, rounded, bits).view(torch.float32)


def exact_forward(
    args: InfonceArgs, *, tf32: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward outputs in float64 on the inputs' device, materialising every logit (small inputs only).

    Independent of autocast, of ``torch.backends.cuda.matmul.allow_tf32`` and of the chunking of the other
    forms: every product is float64 (exact for half-precision inputs). Inputs must be finite.

    Args:
        args: Canonical :class:`InfonceArgs`.
        tf32: Model tensor cores on float32 inputs: the scores ``<query, key>`` and the weighted sum of keys
            use query and bank rounded by :func:`round_to_tf32`; ``s_pos`` uses the inputs as given.

    Returns:
        ``(loss [L, B], lse [L, B], wsum [L, B, D])`` in float64.
    """
    query, positive, bank, temperature, query_labels, bank_labels, negative_index = args.op_inputs()
    s_pos = (query.double() * positive.double()).sum(-1) / temperature  # [L, B]
    if tf32 and query.dtype == torch.float32:
        query, bank = round_to_tf32(query), round_to_tf32(bank)
    q, bank = query.double(), bank.double()
    if negative_index is None:
        keys = bank  # [L, K, D] or [K, D]
        scores = q @ keys.transpose(-1, -2) / temperature  # [L, B, K]
        key_labels = bank_labels[None, None, :] if bank_labels is not None else None
    else:
        keys = _gather_keys(bank, negative_index)  # [L, B, K, D]
        scores = (keys @ q.unsqueeze(-1)).squeeze(-1) / temperature
        key_labels = bank_labels[negative_index] if bank_labels is not None else None
    if query_labels is not None:
        scores = scores.masked_fill(key_labels == query_labels[None, :, None], float("-inf"))
    lse = torch.logsumexp(torch.cat([s_pos.unsqueeze(-1), scores], dim=-1), dim=-1)
    prob = torch.exp(scores - lse.unsqueeze(-1))  # masked keys: 0
    wsum = prob @ keys if negative_index is None else (prob.unsqueeze(-2) @ keys).squeeze(-2)
    return lse - s_pos, lse, wsum


class _ReferenceFunction(torch.autograd.Function):
    """The reference forward with the op's backward; inputs are :meth:`InfonceArgs.op_inputs`."""

    @staticmethod
    def forward(ctx, *inputs):
        args = InfonceArgs(*inputs)
        loss, _lse, wsum = reference_forward(args)
        save_for_backward(ctx, args, loss, wsum)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return input_gradients(ctx, grad_loss)


def reference_loss(args: InfonceArgs) -> torch.Tensor:
    """``[L, B]`` loss of canonical arguments by the chunked reference; gradients reach query and positive."""
    return _ReferenceFunction.apply(*args.op_inputs())


def naive_loss(args: InfonceArgs) -> torch.Tensor:
    """``[L, B]`` loss of canonical arguments from the full logits, differentiated by autograd."""
    q, bank = args.query, args.bank
    s_pos = (q * args.positive).sum(-1, keepdim=True)  # [L, B, 1]
    if args.negative_index is None:
        s_neg = q @ bank.transpose(-1, -2)  # [L, B, K]
        if args.query_labels is not None:
            s_neg = s_neg.masked_fill(args.query_labels[:, None] == args.bank_labels[None, :], float("-inf"))
    else:
        keys = _gather_keys(bank, args.negative_index)  # [L, B, K, D]
        s_neg = (keys @ q.unsqueeze(-1)).squeeze(-1)
        if args.query_labels is not None:
            same = args.bank_labels[args.negative_index] == args.query_labels[:, None]
            s_neg = s_neg.masked_fill(same, float("-inf"))
    logits = torch.cat([s_pos, s_neg], dim=-1) / args.temperature
    loss = torch.logsumexp(logits, dim=-1) - logits[..., 0]
    return loss.to(_acc_dtype(q.dtype))


def reference_membank_infonce(
    query: torch.Tensor,
    positive: torch.Tensor,
    bank: torch.Tensor,
    temperature: float,
    **options: torch.Tensor | None,
) -> torch.Tensor:
    """Memory-bank InfoNCE in pure PyTorch, chunked over the bank; same contract as ``membank_infonce``.

    Arguments (``query_labels``, ``bank_labels`` and ``negative_index`` by keyword), shapes, result and
    errors as in :func:`distillkit.ops.membank_infonce`; the bank gets no gradient.

    Returns:
        ``[..., B]`` per-row loss, float32 (float64 for float64 inputs).
    """
    args = canonicalize(InfonceArgs(query, positive, bank, temperature, **options))
    return args.caller_shape(reference_loss(args))


def naive_membank_infonce(
    query: torch.Tensor,
    positive: torch.Tensor,
    bank: torch.Tensor,
    temperature: float,
    **options: torch.Tensor | None,
) -> torch.Tensor:
    """Memory-bank InfoNCE written the obvious way: full logits, ``logsumexp``, autograd.

    Computes in the inputs' dtype. With ``negative_index`` it gathers ``[..., B, K, D]`` keys and uses a
    batched matmul (the usual CRD implementation). Arguments (``query_labels``, ``bank_labels`` and
    ``negative_index`` by keyword) and result as in :func:`distillkit.ops.membank_infonce`.

    Returns:
        ``[..., B]`` per-row loss, float32 (float64 for float64 inputs).
    """
    args = canonicalize(InfonceArgs(query, positive, bank, temperature, **options))
    return args.caller_shape(naive_loss(args))
