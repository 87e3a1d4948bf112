"""Evaluation shared by the tasks whose model predicts a token at labelled positions (causal and masked LM).

Batches carry ``labels [B, T]``: the token to predict at each position, -100 where nothing is predicted; the
model's logits are ``[B, T, V]`` at the same positions (causal LM labels are already shifted by the
collator). The metrics are taken over the labelled positions only. Batches with ``label_bytes [B, T]`` (the
UTF-8 bytes of the text each label token covers; -1: not scored) are also scored in bits per byte: the
summed next-token loss of the scored positions over ``ln 2 ·`` their bytes, a number that does not depend on
the tokenizer, so models with different vocabularies are compared on the same text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.config import DistillConfig
from distillkit.objective.taps import teacher_view
from distillkit.tasks.base import Autocast, Batch, EvalContext, Task, autocast_scope, model_inputs, on_device
from distillkit.tasks.examples import PER_EXAMPLE, capped_exp, ratio_of, to_lists


@dataclass(frozen=True)
class TokenStats:
    """One model's token predictions over a list of batches.

    Attributes:
        nll: Summed cross-entropy (nats, float32 logits) over the labelled positions.
        positions: Number of labelled positions (``labels != -100``).
        predictions: Per batch, the argmax token ``[B, T]`` int64 at every position.
        sequence_nll: Per batch, each sequence's summed cross-entropy ``[B]`` (float32).
        text_nll: Summed cross-entropy (nats) over the positions ``label_bytes`` scores.
        text_bytes: Their UTF-8 bytes (0 when the batches carry no ``label_bytes``).
        sequence_bytes: Per batch, each sequence's ``(text nll [B], bytes [B])`` (with ``label_bytes``).

    """

    nll: float
    positions: int
    predictions: list[torch.Tensor]
    sequence_nll: list[torch.Tensor] = field(default_factory=list)
    text_nll: float = 0.0
    text_bytes: int = 0
    sequence_bytes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def bits_per_byte(self) -> float:
        """``text_nll / (ln 2 · text_bytes)`` (nan without scored bytes)."""
        return self.text_nll / (math.log(2) * self.text_bytes) if self.text_bytes else math.nan

    @property
    def loss(self) -> float:
        """Mean cross-entropy per labelled position (0 when there is none)."""
        return self.nll / max(self.positions, 1)

    @property
    def perplexity(self) -> float:
        """``exp(loss)``, with the loss capped at 50 so the value stays finite."""
        return math.exp(min(self.loss, 50.0))

    def match_rate(self, targets: Sequence[torch.Tensor], batches: Sequence[Batch]) -> float:
        """Fraction of labelled positions where the prediction equals the target.

        Args:
            targets: Per batch, ``[B, T]`` token ids: the labels (accuracy) or another model's
                predictions (agreement).
            batches: The batches the predictions were made on (their ``labels [B, T]`` select positions).

        Returns:
            Matches / :attr:`positions` (0 when there is no labelled position).

        """
        hits = sum(int(h.sum()) for h in self.sequence_matches(targets, batches))
        return hits / max(self.positions, 1)

    def sequence_matches(
        self, targets: Sequence[torch.Tensor], batches: Sequence[Batch]
    ) -> list[torch.Tensor]:
        """Per batch, each sequence's labelled positions where the prediction equals the target ``[B]``."""
        return [
            ((p == t) & (b["labels"] != -100)).sum(1)
            for p, t, b in zip(self.predictions, targets, batches, strict=True)
        ]


@torch.no_grad()
def token_stats(model: nn.Module, batches: Iterable[Batch], autocast: Autocast | None = None) -> TokenStats:
    """Scores ``model``'s ``[B, T, V]`` logits against each batch's ``labels [B, T]`` (eval mode, no grad).

    Args:
        model: A model whose output has ``logits [B, T, V]``.
        batches: Batches with the model's inputs and ``labels [B, T]`` (-100: not scored), on its device.
        autocast: Enters mixed precision around each forward (None: none); logits are scored in float32.

    Returns:
        The summed cross-entropy, the labelled positions and the argmax predictions.

    """
    was_training = model.training
    model.eval()
    nll, count, predictions, sequences, text_nll, text_bytes = 0.0, 0, [], [], 0.0, 0
    sequence_bytes: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in batches:
        with autocast_scope(autocast):
            logits = model(**model_inputs(batch)).logits
        logits = logits.float()
        labels = batch["labels"]
        per_position = F.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
        ).view_as(labels)
        sequences.append(per_position.sum(1))
        nll += float(per_position.sum())
        count += int((labels != -100).sum())
        predictions.append(logits.argmax(-1))
        if "label_bytes" in batch:
            scored = (batch["label_bytes"] >= 0) & (labels != -100)
            byte_nll = torch.where(scored, per_position.double(), 0.0).sum(1)
            byte_count = torch.where(scored, batch["label_bytes"], 0).sum(1)
            sequence_bytes.append((byte_nll, byte_count))
            text_nll += float(byte_nll.sum())
            text_bytes += int(byte_count.sum())
    model.train(was_training)
    return TokenStats(nll, count, predictions, sequences, text_nll, text_bytes, sequence_bytes)


class TokenTask(Task):
    """A task scored by token prediction at labelled positions: ``[B, T, V]`` logits, ``labels [B, T]``.

    :meth:`evaluate` reports ``loss`` (mean cross-entropy), ``perplexity``, ``accuracy`` (argmax equals
    the label; when :attr:`scores_accuracy`), ``positions``, ``bits_per_byte`` and ``bytes`` (when the
    batches carry ``label_bytes``) and, given a teacher with the same tokenizer, ``agreement`` (the two
    models' argmax tokens are equal).
    """

    example_metrics = {
        "loss": ratio_of("nll", "positions"),
        "perplexity": ratio_of("nll", "positions", capped_exp),
        "accuracy": ratio_of("correct", "positions"),
        "agreement": ratio_of("agree", "positions"),
        "bits_per_byte": ratio_of("byte_nll", "bytes", lambda nats: nats / math.log(2)),
    }
    scores_accuracy: ClassVar[bool] = False
    """Report the fraction of labelled positions where the model's argmax is the label."""
    reuses_teacher_predictions: ClassVar[bool] = False
    """Run the teacher at the first evaluation only and reuse its predictions (the frozen teacher's answers
    do not change as long as the evaluation batches are the same at every call)."""

    def __init__(self, config: DistillConfig) -> None:
        super().__init__(config)
        self._teacher_stats: TokenStats | None = None

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], context: EvalContext) -> dict[str, Any]:
        """Loss, perplexity (and accuracy) of ``model``; agreement with ``context.teacher`` when given.

        With ``context.per_example``, per sequence: ``example_id``, ``nll``, ``positions``, ``correct`` (with
        accuracy), ``agree`` (with a teacher), ``byte_nll`` and ``bytes`` (with ``label_bytes``).
        """
        batches = list(on_device(batches, context.accelerator))
        stats = token_stats(model, batches, context.autocast)
        metrics: dict[str, Any] = {"loss": stats.loss, "perplexity": stats.perplexity}
        labels = [b["labels"] for b in batches]
        if self.scores_accuracy:
            metrics["accuracy"] = stats.match_rate(labels, batches)
        metrics["positions"] = stats.positions
        teacher = None
        if stats.text_bytes:
            metrics["bits_per_byte"], metrics["bytes"] = stats.bits_per_byte, stats.text_bytes
        if context.teacher is not None:
            teacher = self._teacher_stats
            if teacher is None:
                teacher = token_stats(context.teacher, [teacher_view(b) for b in batches], context.autocast)
                if self.reuses_teacher_predictions:
                    self._teacher_stats = teacher
            if all(teacher_view(b) is b for b in batches):  # the same tokens: position by position
                metrics["agreement"] = stats.match_rate(teacher.predictions, batches)
            else:
                teacher = None  # other tokens: no position-by-position agreement
        if context.per_example:
            columns = {
                "example_id": [b.get("example_ids", torch.full((len(b["labels"]),), -1)) for b in batches],
                "nll": stats.sequence_nll,
                "positions": [(b["labels"] != -100).sum(1) for b in batches],
            }
            if self.scores_accuracy:
                columns["correct"] = stats.sequence_matches(labels, batches)
            if teacher is not None:
                columns["agree"] = stats.sequence_matches(teacher.predictions, batches)
            if stats.sequence_bytes:
                columns["byte_nll"] = [nll for nll, _ in stats.sequence_bytes]
                columns["bytes"] = [count for _, count in stats.sequence_bytes]
            metrics[PER_EXAMPLE] = {"eval": to_lists({k: torch.cat(v) for k, v in columns.items()})}
        return metrics
