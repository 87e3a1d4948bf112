"""``masked_lm``: general distillation of a masked-LM encoder on text (DistilBERT, CoDIR pre-training).

Batches are masked dynamically, BERT style (a fraction ``data.mlm_probability`` of the real, non-special
tokens is chosen; 80% become the mask token, 10% a random token, 10% stay), and carry ``labels [B, T]`` with
the original token at chosen positions and -100 elsewhere: ``ce`` is the student's masked-LM loss, and ``kd``
compares the two models' distributions at the chosen positions (``Taps.position_mask``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from distillkit.data import Collator, TaskData
from distillkit.errors import ConfigError
from distillkit.objective.terms import TaskInfo
from distillkit.tasks.tokens import TokenTask
from distillkit.text_data import load_text_data


class MaskingCollator(Collator):
    """Pads rows and masks tokens; the mask of a batch depends only on ``seed`` and its example ids.

    A mask that is a function of the batch's content (not of a global random state) is the same when a run
    is resumed, and differs between epochs because batches are composed differently.

    Args:
        tokenizer: The tokenizer (needs a mask token).
        probability: Fraction of real, non-special tokens chosen per sequence.
        seed: Seed of the masking.

    """

    def __init__(self, tokenizer: Any, probability: float, seed: int = 0) -> None:
        super().__init__(tokenizer)
        if tokenizer.mask_token_id is None:
            raise ConfigError("task masked_lm needs a tokenizer with a mask token (e.g. a BERT tokenizer)")
        self.probability = probability
        self.seed = seed
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collates and masks ``rows``."""
        batch = super().__call__(rows)
        ids = batch["input_ids"]
        key = sum((int(i) + 1) * 1_000_003**k for k, i in enumerate(batch["example_ids"].tolist()))
        generator = torch.Generator().manual_seed((self.seed * 7_919 + key) % 2**62)
        candidates = (batch["attention_mask"] == 1) & ~torch.isin(ids, self.special)
        chosen = (torch.rand(ids.shape, generator=generator) < self.probability) & candidates
        labels = ids.masked_fill(~chosen, -100)
        draw = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(len(self.tokenizer), ids.shape, generator=generator)
        masked = ids.clone()
        masked[chosen & (draw < 0.8)] = self.tokenizer.mask_token_id
        swap = chosen & (draw >= 0.8) & (draw < 0.9)
        masked[swap] = random_ids[swap]
        batch["input_ids"], batch["labels"] = masked, labels
        return batch


class MaskedLM(TokenTask):
    """Masked-LM distillation: ``[B, T, V]`` logits, labels at masked positions; masked-token perplexity."""

    name = "masked_lm"
    info = TaskInfo(name="masked_lm", labels="token", logits="token")
    metric = "perplexity"
    metrics = ("perplexity", "loss", "accuracy", "agreement")
    scores_accuracy = True

    def load_data(self, tokenizer: Any) -> TaskData:
        """One truncated text per example (packed blocks when ``data.packing`` is true)."""
        return load_text_data(self.config.data, tokenizer, bool(self.config.data.packing))

    def collator(self, tokenizer: Any) -> Callable:
        """Padding plus dynamic masking (seeded by ``train.seed``)."""
        return MaskingCollator(tokenizer, self.config.data.mlm_probability, self.config.train.seed)

    def describe(self, metrics: dict[str, float]) -> str:
        """``perplexity 12.3 accuracy 0.41``."""
        return f"perplexity {metrics['perplexity']:.2f} accuracy {metrics['accuracy']:.4f}"

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """Masked-token perplexity, accuracy and parameters of both models."""
        lines = [f"{'':10} {'perplexity':>11} {'accuracy':>9} {'params':>13}"]
        for name in ("teacher", "student"):
            part = summary[name]
            lines.append(
                f"{name:10} {part['eval']['perplexity']:11.2f} {part['eval']['accuracy']:9.4f} "
                f"{part['parameters']:13,}"
            )
        lines.append(f"held-out masked positions: {summary['student']['eval']['positions']}")
        return lines
