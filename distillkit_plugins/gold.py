"""``gold``: logit distillation across tokenizers by GOLD's alignment (TRL's GOLD trainer, hybrid ULD loss).

The two tokenizations of the same text are aligned by character spans: groups of consecutive predicted
tokens of the teacher and the student that cover the same characters; a group of several tokens gets one
vector of probabilities by the chain rule over its tokens (:mod:`distillkit_plugins.span_alignment`). For
each aligned group, with ``p`` the teacher's merged probabilities and ``q`` the student's:

- **matched** vocabulary entries, whose token string both vocabularies hold, are compared entry to entry
  with one of ``kd``'s divergences (:func:`distillkit.ops.divergence`; default ``jsd`` with ``β = 0.5``);
- the **unmatched** rest of each vocabulary by ULD's sorted L1, ``Σ_i |sort↓(p_u)_i − sort↓(q_u)_i|``
  (the shorter side zero-padded);
- weighted by the matched share of the teacher's vocabulary, ``w_m = |matched| / |V_teacher|`` and
  ``w_u = 1 − w_m`` (or fixed weights): ``loss = w_m · D(p_m ‖ q_m) + w_u · ULD(p_u, q_u)``.

The loss is the mean over the aligned groups of each sequence, averaged over sequences (as TRL does). The
matched entries are compared as they are, not renormalised (as in TRL): they are a part of each
distribution, and of a merged group's joint probability. ``jsd`` and ``tvd`` stay non-negative on such
parts; the KL forms may not. TRL clamps probabilities at 1e-8 before taking logarithms; here the
log-probabilities are exact. Without spans in the batch (both models read the same tokens) position ``k``
is paired with position ``k``, and with one vocabulary every entry is matched: the loss is then ``kd``'s
divergence at temperature ``temperature`` without the ``T²`` factor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field, model_validator

from distillkit import BenchCase, LossParams, ModelDims, Taps, hookimpl
from distillkit.ops import DIVERGENCES, divergence
from distillkit_plugins.span_alignment import AlignedLogitsTerm, mean_per_row, sorted_l1


class GOLDParams(LossParams):
    """Parameters of ``gold``.

    Attributes:
        divergence: The divergence of the matched entries (``kd``'s names).
        beta: ``jsd``'s ``β`` (TRL's ``beta``; 0.5 by default).
        alpha: The skew divergences' ``α``.
        temperature: Softmax temperature of both models' logits.
        matched_weight: Fixed weight of the matched part (None: ``|matched| / |V_teacher|``).
        unmatched_weight: Fixed weight of the unmatched part (None: ``1 − matched share``); set both or none.
        merge: ``last`` (chain rule: the last token's distribution times the earlier tokens' probabilities)
            or ``first`` (the first token's distribution times the later tokens' probabilities).

    """

    divergence: Literal[DIVERGENCES] = "jsd"
    beta: float = Field(default=0.5, gt=0.0, lt=1.0)
    alpha: float = Field(default=0.1, gt=0.0, lt=1.0)
    temperature: float = Field(default=1.0, gt=0.0)
    matched_weight: float | None = Field(default=None, ge=0.0)
    unmatched_weight: float | None = Field(default=None, ge=0.0)
    merge: Literal["last", "first"] = "last"

    @model_validator(mode="after")
    def _weights_together(self) -> GOLDParams:
        """Refuses one fixed weight without the other."""
        if (self.matched_weight is None) != (self.unmatched_weight is None):
            raise ValueError(
                "set matched_weight and unmatched_weight together, or neither (the matched share)"
            )
        return self


class GOLDLoss(AlignedLogitsTerm):
    """GOLD: kd's divergence on tokens both vocabularies hold, ULD on the rest, over span-aligned groups."""

    name = "gold"
    Params = GOLDParams

    def __init__(self, params: GOLDParams, dims: ModelDims) -> None:
        super().__init__(params, dims)
        self._pairs: list[tuple[int, int]] | None = None  # (teacher id, student id) of each shared string
        self._index: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def use_vocabularies(self, student: Mapping[str, int], teacher: Mapping[str, int]) -> None:
        """Pairs the ids of every token string both vocabularies hold."""
        self._pairs = sorted((i, student[token]) for token, i in teacher.items() if token in student)
        self._index = {}

    def vocabulary_split(self, teacher_width: int, student_width: int, device: torch.device) -> tuple:
        """Ids of the shared strings inside both logit widths, paired, and the ids of neither pair.

        Without :meth:`use_vocabularies` the models are taken to share one vocabulary (equal widths).

        Returns:
            ``(matched teacher ids, matched student ids, other teacher ids, other student ids)``, int64.

        Raises:
            ValueError: For unknown vocabularies of two different widths.

        """
        key = (teacher_width, student_width, str(device))
        if key not in self._index:
            if self._pairs is None:
                if teacher_width != student_width:
                    raise ValueError(
                        "gold needs the two vocabularies to match tokens by string (logits of "
                        f"{teacher_width} and {student_width} entries); the run gives them, or call "
                        "use_vocabularies()"
                    )
                pairs = [(i, i) for i in range(teacher_width)]
            else:
                pairs = [(t, s) for t, s in self._pairs if t < teacher_width and s < student_width]
            ids = torch.tensor(pairs, dtype=torch.long, device=device).reshape(-1, 2)
            split = []
            for side, width in ((0, teacher_width), (1, student_width)):
                other = torch.ones(width, dtype=torch.bool, device=device).index_fill(0, ids[:, side], False)
                split.append(other.nonzero().squeeze(1))
            self._index[key] = (ids[:, 0], ids[:, 1], *split)
        return self._index[key]

    def forward(self, student: Taps, teacher: Taps) -> torch.Tensor:
        """Computes the loss.

        Args:
            student: Student taps: ``logits`` ``[B, T, V_s]``, ``labels``, ``extras["label_spans"]``.
            teacher: Teacher taps of the same text: ``[B, T', V_t]`` and its own labels and spans.

        Returns:
            Scalar float32 loss.

        """
        aligned = self.aligned(student, teacher)
        if aligned is None:
            return student.logits.sum() * 0.0
        pairs, log_q, log_p = aligned
        params = self.params
        teacher_ids, student_ids, teacher_rest, student_rest = self.vocabulary_split(
            log_p.shape[-1], log_q.shape[-1], log_q.device
        )
        kind, beta, alpha = params.divergence, params.beta, params.alpha
        matched = divergence(log_p[:, teacher_ids], log_q[:, student_ids], kind, beta=beta, alpha=alpha)
        unmatched = sorted_l1(log_p[:, teacher_rest].exp(), log_q[:, student_rest].exp())
        if params.matched_weight is None:
            share = len(teacher_ids) / log_p.shape[-1]
            weights = (share, 1.0 - share)
        else:
            weights = (params.matched_weight, params.unmatched_weight)
        return mean_per_row(weights[0] * matched + weights[1] * unmatched, pairs.rows, student.logits)


@hookimpl
def distillkit_register_losses(register):
    """Registers ``gold``."""
    register(GOLDLoss)


@hookimpl
def distillkit_register_bench_cases(register):
    """A case at a language model's vocabulary size: one position per example, 32,768 entries."""
    register(BenchCase("gold-vocab-32k", "gold", shapes={"classes": 32768}))
