"""``uld``: Universal Logit Distillation across tokenizers (Boizard et al., 2024, arXiv 2402.12030).

At each aligned position, the two next-token distributions are compared sorted, with no vocabulary mapping:

    ULD(p, q) = Σ_i |sort↓(p)_i − sort↓(q)_i|

(``p`` the teacher's, ``q`` the student's, the shorter vocabulary zero-padded): a closed-form surrogate of the
Wasserstein-1 distance that ignores which token carries which probability. It is invariant to permuting
either vocabulary, so it also gives 0 when the student predicts the same probabilities for other tokens.

Aligned positions (``align``): ``spans`` aligns the two tokenizations of the same text by character spans and
merges a span of several tokens by the chain rule (:mod:`distillkit_plugins.span_alignment`; TRL's
"extended ULD"); without spans in the batch (both models read the same tokens) position ``k`` is paired with
position ``k``. ``positions`` always pairs the ``k``-th predicted position of each model (the paper).

The loss is the mean over the aligned groups of each sequence, averaged over sequences (as TRL's ULD loss).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from distillkit import BenchCase, LossParams, Taps, hookimpl
from distillkit_plugins.span_alignment import AlignedLogitsTerm, mean_per_row, sorted_l1


class ULDParams(LossParams):
    """Parameters of ``uld``.

    Attributes:
        temperature: Softmax temperature of both models' logits.
        align: ``spans`` (character spans when the batch has them, else position by position) or
            ``positions`` (the ``k``-th predicted position of each model, as in the paper).
        merge: How a span of several tokens becomes one distribution: ``last`` (the last token's
            distribution times the probabilities of the earlier tokens: the chain rule) or ``first`` (the
            first token's distribution times the probabilities of the later ones).

    """

    temperature: float = Field(default=1.0, gt=0.0)
    align: Literal["spans", "positions"] = "spans"
    merge: Literal["last", "first"] = "last"


class ULDLoss(AlignedLogitsTerm):
    """Sorted-probability L1 between aligned next-token distributions of models with any two vocabularies."""

    name = "uld"
    Params = ULDParams

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """The mean over sequences of the mean sorted L1 over their aligned groups (taps: see ``aligned``)."""
        aligned = self.aligned(student, teacher, by_spans=self.params.align == "spans")
        if aligned is None:
            return student.logits.sum() * 0.0
        pairs, log_q, log_p = aligned
        return mean_per_row(sorted_l1(log_p.exp(), log_q.exp()), pairs.rows, student.logits)


@hookimpl
def distillkit_register_losses(register):
    """Registers ``uld``."""
    register(ULDLoss)


@hookimpl
def distillkit_register_bench_cases(register):
    """A case at a language model's vocabulary size: one position per example, 32,768 entries."""
    register(BenchCase("uld-vocab-32k", "uld", shapes={"classes": 32768}))
