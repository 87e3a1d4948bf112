"""Two models' next-token predictions over the same text: aligned by characters, merged by the chain rule.

Used by ``uld`` and ``gold``. Each model predicts its own tokens of the text; position ``t`` of a model
predicts its label token ``labels[b, t]``, which covers the characters ``label_spans[b, t]`` (``(-1, -1)``:
not counted). :func:`align` pairs groups of consecutive predicted tokens of the two models that cover
exactly the same characters: walking both lists of spans, a group closes where both tokenizations end at the
same character (a token that shares the last character, such as the second byte piece of an emoji, joins the
group); a pair whose groups begin at different characters (the first group of a row, when the two rows'
first predicted tokens differ) covers different text and is dropped, as is an unclosed group at the end.

Without spans (both models read the same tokens, or sequence-level logits ``[B, C]``), the ``k``-th
counted position of one model is paired with the ``k``-th of the other (ULD's original alignment).

:func:`group_log_probs` turns each group into one vector over the vocabulary by the chain rule: with the
group's tokens ``x_1 .. x_n`` predicted at positions ``t_1 .. t_n``, ``merge: last`` gives
``log p_{t_n}(v) + Σ_{i<n} log p_{t_i}(x_i)`` (the joint probability of the earlier tokens and ``v``; its
entry at ``x_n`` is the span's probability), ``merge: first`` gives
``log p_{t_1}(v) + Σ_{i>1} log p_{t_i}(x_i)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distillkit import ConfigError, LossTerm, TapRequest, Taps, TaskInfo


@dataclass(frozen=True)
class Alignment:
    """Pairs of aligned position groups of a batch (positions are flat indices ``b·T + t`` of each model).

    Attributes:
        rows: ``[G]`` the batch row of each group pair.
        student: Per group, the student's positions, in text order.
        teacher: Per group, the teacher's positions, in text order.

    """

    rows: torch.Tensor
    student: list[list[int]]
    teacher: list[list[int]]

    def __len__(self) -> int:
        return len(self.student)


def _span_groups(
    mine: Sequence[tuple[int, int, int]], theirs: Sequence[tuple[int, int, int]]
) -> list[tuple[list[int], list[int]]]:
    """Groups of ``(position, begin, end)`` of two rows that cover the same characters."""
    groups = []
    i = j = start_i = start_j = 0
    while i < len(mine) and j < len(theirs):
        end_i, end_j = mine[i][2], theirs[j][2]
        if end_i < end_j:
            i += 1
            continue
        if end_j < end_i:
            j += 1
            continue
        i, j = i + 1, j + 1
        while i < len(mine) and mine[i][1] == mine[i][2] == end_i:  # pieces of the group's last character
            i += 1
        while j < len(theirs) and theirs[j][1] == theirs[j][2] == end_j:
            j += 1
        a, b = mine[start_i:i], theirs[start_j:j]
        if a[0][1] == b[0][1] and _contiguous(a) and _contiguous(b):
            groups.append(([p for p, _, _ in a], [p for p, _, _ in b]))
        start_i, start_j = i, j
    return groups


def _contiguous(tokens: Sequence[tuple[int, int, int]]) -> bool:
    return all(tokens[k][1] == tokens[k - 1][2] for k in range(1, len(tokens)))


def _counted(spans: list[list[list[int]]], row: int, width: int) -> list[tuple[int, int, int]]:
    return [(row * width + t, b, e) for t, (b, e) in enumerate(spans[row]) if b >= 0]


def align(student: Taps, teacher: Taps, by_spans: bool = True) -> Alignment:
    """Aligns the counted positions of the two models' taps, row by row.

    Args:
        student: Student taps with ``logits`` ``[B, T, V_s]`` (or ``[B, C]``) and, for span alignment,
            ``extras["label_spans"]`` ``[B, T, 2]``.
        teacher: Teacher taps of the same rows, ``[B, T', V_t]`` and its own ``label_spans``.
        by_spans: Align by character spans when both taps have them; False: the ``k``-th counted positions.

    Returns:
        The aligned groups (one position per group and side without spans).

    Raises:
        ValueError: When only one of the two models' taps carries ``label_spans``.

    """
    spans = [taps.extras.get("label_spans") for taps in (student, teacher)]
    if (spans[0] is None) != (spans[1] is None):
        raise ValueError("the batch has label_spans for one model only; both token streams need them")
    rows, mine, theirs = [], [], []
    if by_spans and spans[0] is not None:
        widths = [int(s.shape[1]) for s in spans]
        lists = [s.tolist() for s in spans]
        for row in range(len(lists[0])):
            for a, b in _span_groups(_counted(lists[0], row, widths[0]), _counted(lists[1], row, widths[1])):
                rows.append(row)
                mine.append(a)
                theirs.append(b)
    else:
        masks = [_counted_mask(taps) for taps in (student, teacher)]
        for row in range(masks[0].shape[0]):
            left, right = (m[row].nonzero().squeeze(1).tolist() for m in masks)
            for a, b in zip(left, right, strict=False):
                rows.append(row)
                mine.append([row * masks[0].shape[1] + a])
                theirs.append([row * masks[1].shape[1] + b])
    return Alignment(torch.tensor(rows, dtype=torch.long), mine, theirs)


def _counted_mask(taps: Taps) -> torch.Tensor:
    """``[B, T]`` bool: the positions a token-level loss counts (every example for ``[B, C]`` logits)."""
    if taps.logits.dim() == 2:
        return torch.ones(taps.logits.shape[0], 1, dtype=torch.bool)
    return taps.position_mask().bool().cpu()


def group_log_probs(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    groups: list[list[int]],
    temperature: float,
    merge: str = "last",
) -> torch.Tensor:
    """Each group's tokens merged into one vector of log-probabilities by the chain rule.

    Args:
        logits: ``[B, T, V]`` (or ``[B, C]``) of one model.
        labels: ``[B, T]`` the token each position predicts (needed when a group has several tokens).
        groups: Per group, flat positions ``b·T + t`` of that model, in text order.
        temperature: Softmax temperature ``T`` (``log_softmax(z / T)``).
        merge: ``last`` (the distribution at the group's last position times the probabilities of the
            earlier tokens) or ``first`` (the first position's times the later tokens').

    Returns:
        ``[G, V]`` merged log-probabilities (not normalised: a group of several tokens sums to less than 1),
        float32 (float64 for float64 logits).

    """
    flat = logits.reshape(-1, logits.shape[-1])
    base = [g[-1] if merge == "last" else g[0] for g in groups]
    others = [(k, p) for k, g in enumerate(groups) for p in (g[:-1] if merge == "last" else g[1:])]
    device, dtype = flat.device, torch.promote_types(flat.dtype, torch.float32)
    with torch.autocast(device.type, enabled=False):
        merged = F.log_softmax(flat[torch.tensor(base, device=device)].to(dtype) / temperature, dim=-1)
        if others:
            if labels is None:
                raise ValueError("merging several tokens into one needs the labels (the predicted tokens)")
            group, positions = (torch.tensor(x, device=device) for x in zip(*others, strict=True))
            scaled = flat[positions].to(dtype) / temperature
            tokens = labels.reshape(-1)[positions].long()
            chosen = scaled.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(scaled, dim=-1)
            merged = merged + merged.new_zeros(len(groups)).index_add(0, group, chosen)[:, None]
    return merged


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """ULD's distance ``Σ_i |sort↓(p)_i − sort↓(q)_i|`` per row, the shorter side zero-padded.

    Exactly, without sorting all of the longer side: with ``m`` the shorter width, the padded ranks ``i > m``
    add the longer side's entries below its top ``m``, whose sum is its total minus its top ``m``; so only the
    top ``m`` of the longer side are sorted (``topk``), e.g. 8k of a 49k-entry teacher vocabulary.

    Args:
        p: ``[G, V_p]`` probabilities (non-negative).
        q: ``[G, V_q]`` probabilities.

    Returns:
        ``[G]``.

    """
    width = min(p.shape[-1], q.shape[-1])
    if width == 0:
        return p.sum(dim=-1) + q.sum(dim=-1)
    top_p = p.topk(width, dim=-1).values if p.shape[-1] > width else p.sort(dim=-1, descending=True).values
    top_q = q.topk(width, dim=-1).values if q.shape[-1] > width else q.sort(dim=-1, descending=True).values
    rest = (p.sum(dim=-1) - top_p.sum(dim=-1)) + (q.sum(dim=-1) - top_q.sum(dim=-1))
    return (top_p - top_q).abs().sum(dim=-1) + rest


def mean_per_row(values: torch.Tensor, rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The mean over rows (that have a group) of each row's mean over its groups; 0 with no group at all.

    Args:
        values: ``[G]`` per-group losses.
        rows: ``[G]`` their batch rows.
        reference: A tensor of the student's graph (a zero loss still has a gradient path).

    """
    if values.numel() == 0:
        return reference.sum() * 0.0
    rows = rows.to(values.device)
    count = int(rows.max()) + 1
    sums = torch.zeros(count, device=values.device, dtype=values.dtype).index_add(0, rows, values)
    sizes = torch.zeros(count, device=values.device, dtype=values.dtype).index_add(
        0, rows, torch.ones_like(values)
    )
    present = sizes > 0
    return (sums[present] / sizes[present]).mean()


class AlignedLogitsTerm(LossTerm):
    """Base of ``uld`` and ``gold``: next-token logits of both models, aligned across tokenizers.

    Subclasses have a ``temperature`` and a ``merge`` parameter and call :meth:`aligned` in ``forward``.
    """

    cross_tokenizer = True
    student_reads = TapRequest(logits=True, labels=True)
    teacher_reads = TapRequest(logits=True, labels=True)

    def teacher_logit_temperature(self) -> float:
        """Teacher logits are read at ``temperature``."""
        return self.params.temperature

    def check_task(self, task: TaskInfo) -> None:
        """Next-token distributions only: ``[B, T, V]`` logits."""
        super().check_task(task)
        if task.logits != "token":
            raise ConfigError(
                f"loss '{self.name}' compares next-token distributions, and task '{task.name}' has none; "
                "use kd for class logits"
            )

    def aligned(
        self, student: Taps, teacher: Taps, by_spans: bool = True
    ) -> tuple[Alignment, torch.Tensor, torch.Tensor] | None:
        """The aligned groups and each model's merged log-probabilities (None when nothing aligns).

        Args:
            student: Student taps with ``logits``, ``labels`` (and ``extras["label_spans"]``).
            teacher: Teacher taps of the same text (their own labels and spans).
            by_spans: See :func:`align`.

        Returns:
            ``(alignment, student [G, V_s], teacher [G, V_t])``, the teacher's detached, both in one dtype.

        """
        if student.logits is None or teacher.logits is None:
            raise ValueError(f"{self.name} needs the logits of both models")
        pairs = align(student, teacher, by_spans)
        if not len(pairs):
            return None
        temperature, merge = self.params.temperature, self.params.merge
        mine = group_log_probs(student.logits, student.labels, pairs.student, temperature, merge)
        theirs = group_log_probs(teacher.logits.detach(), teacher.labels, pairs.teacher, temperature, merge)
        return pairs, mine, theirs.to(mine.dtype)
