"""``attention``: attention-probability transfer between mapped layers (TinyBERT, MiniLM).

TinyBERT (Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding", Findings of EMNLP
2020) matches the attention maps of mapped layers with a mean squared error; MiniLM (Wang et al., "MiniLM:
Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020)
matches the attention distributions of the last layer with a KL divergence. With ``A`` the attention
probabilities ``[B, H, T, T]`` of a layer (query rows, key columns), per mapped pair ``(s, t)``:

- ``kind: mse``: ``mean over heads h, real query rows q and real key columns k of (A_s[h,q,k] − A_t[h,q,k])²``
- ``kind: kl``: ``mean over heads h and real query rows q of KL(A_t[h,q,:] ‖ A_s[h,q,:])
  = Σ_k A_t log(A_t / A_s)`` over real keys (``0 · log 0 = 0``; ``A_s`` is clamped at 1e-12 inside the log)

and the loss is the mean over layer pairs. Layers are numbered as hidden states are (layer ``i`` reads
``Taps.attentions[i - 1]``); layer 0, the embedding output, has no attention and is refused. The two models
must have the same number of heads, unless ``heads: mean`` averages the heads of each side first.
"""

from __future__ import annotations

from typing import Literal

import torch

from distillkit import ConfigError, LayerMapSpec, LossParams, LossTerm, ModelDims, TapRequest, Taps, hookimpl

LOG_FLOOR = 1e-12
"""Student probabilities are clamped here inside the log (a row may underflow to 0 in half precision)."""


class AttentionParams(LossParams):
    """Parameters of ``attention``.

    Attributes:
        layer_map: Layer map over transformer layers (``uniform``, ``skip``, ``last`` or ``[[s, t], ...]``,
            indices ``1..depth``); ``uniform`` is TinyBERT's map.
        kind: ``mse`` (TinyBERT) or ``kl`` (MiniLM, KL(teacher ‖ student) per query row).
        heads: ``each`` compares head ``h`` with head ``h`` (equal head counts); ``mean`` averages the heads
            of each model first, so models with different head counts can be matched.

    """

    layer_map: LayerMapSpec = "uniform"
    kind: Literal["mse", "kl"] = "mse"
    heads: Literal["each", "mean"] = "each"


def attention_pairs(pairs: list[tuple[int, int]], spec: LayerMapSpec) -> list[tuple[int, int]]:
    """Refuses pairs that use layer 0, the embedding output, which has no attention."""
    for s, t in pairs:
        if s == 0 or t == 0:
            where = "named map" if isinstance(spec, str) else "layer map"
            raise ConfigError(
                f"loss 'attention': the {where} {spec!r} pairs student layer {s} with teacher layer {t}, but "
                "layer 0 is the embedding output and has no attention probabilities; use transformer layers "
                "1..depth, e.g. explicit pairs [[1, 2], [2, 4]] or layer_map: last"
            )
    return pairs


class AttentionLoss(LossTerm):
    """MSE or KL between the attention probabilities of mapped layers, over real queries and keys."""

    name = "attention"
    Params = AttentionParams
    student_reads = TapRequest(attentions=True)
    teacher_reads = TapRequest(attentions=True)

    def __init__(self, params: AttentionParams, dims: ModelDims) -> None:
        super().__init__(params, dims)
        self.pairs = attention_pairs(self.layer_pairs(params.layer_map), params.layer_map)
        heads = (dims.student_heads, dims.teacher_heads)
        if params.heads == "each" and None not in heads and heads[0] != heads[1]:
            raise ConfigError(
                f"loss 'attention': the student has {heads[0]} attention heads and the teacher {heads[1]}, "
                "so heads cannot be compared one by one; set heads: mean to average each model's heads first"
            )

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss.

        Args:
            student: Student taps; ``attentions[s - 1]`` is ``[B, H_s, T, T]``.
            teacher: Teacher taps; ``attentions[t - 1]`` is ``[B, H_t, T, T]``.

        Returns:
            Scalar loss (float32, or float64 for float64 inputs).

        """
        if not student.attentions or not teacher.attentions:
            raise ValueError("attention needs attention probabilities of both models (Taps.attentions)")
        first = student.attentions[0]
        mask = (  # [B, T]; every token is real when the batch has no attention mask
            student.token_mask()
            if student.attention_mask is not None
            else first.new_ones(first.shape[0], first.shape[-1], dtype=torch.float32)
        )
        losses = []
        for s, t in self.pairs:
            a_s, a_t = student.attentions[s - 1], teacher.attentions[t - 1]
            dtype = torch.promote_types(a_s.dtype, torch.float32)
            a_s, a_t = a_s.to(dtype), a_t.to(dtype)
            if self.params.heads == "mean":
                a_s, a_t = a_s.mean(dim=1, keepdim=True), a_t.mean(dim=1, keepdim=True)
            elif a_s.shape[1] != a_t.shape[1]:
                raise ValueError(
                    f"student layer {s} has {a_s.shape[1]} heads and teacher layer {t} has {a_t.shape[1]}; "
                    "set heads: mean"
                )
            if a_s.shape[-2:] != a_t.shape[-2:] or a_s.shape[0] != a_t.shape[0]:
                raise ValueError(
                    f"attention shapes differ: student {tuple(a_s.shape)}, teacher {tuple(a_t.shape)}"
                )
            losses.append(self._pair_loss(a_s, a_t, mask.to(dtype)))
        return torch.stack(losses).mean()

    def _pair_loss(self, a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        heads = a_s.shape[1]
        queries = mask[:, None, :, None]  # [B, 1, T, 1]
        keys = mask[:, None, None, :]  # [B, 1, 1, T]
        if self.params.kind == "mse":
            weights = queries * keys
            count = weights.sum() * heads
            return ((a_s - a_t).pow(2) * weights).sum() / count.clamp_min(1.0)
        per_key = torch.xlogy(a_t, a_t) - a_t * a_s.clamp_min(LOG_FLOOR).log()
        per_key = per_key.masked_fill(keys == 0, 0.0)
        rows = per_key.sum(dim=-1) * queries.squeeze(-1)  # [B, H, T]
        return rows.sum() / (mask.sum() * heads).clamp_min(1.0)


@hookimpl
def distillkit_register_losses(register):
    """Registers ``attention``."""
    register(AttentionLoss)
