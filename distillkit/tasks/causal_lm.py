"""``causal_lm``: distil a causal language model into a smaller one on text.

Batches carry ``labels [B, T]``: the next token of each position (-100 at padding and at the last position),
so ``ce`` is the language-modelling loss and ``kd`` compares next-token distributions at the same positions.
Evaluation: perplexity of the student (and, once, of the teacher) on held-out text, and top-1 next-token
agreement between the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.data import Collator, TaskData, load_text_data
from distillkit.tasks.base import (
    Autocast,
    Task,
    context,
    first_batches,
    model_inputs,
    on_device,
    time_forward,
)
from distillkit.terms import TaskInfo


class NextTokenCollator(Collator):
    """Pads rows and adds ``labels [B, T]``: ``input_ids`` shifted left, -100 where nothing is predicted."""

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collates ``rows`` into a batch dict."""
        batch = super().__call__(rows)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        batch["labels"] = labels
        return batch


@torch.no_grad()
def next_token_stats(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], autocast: Autocast | None = None
) -> tuple[float, int, list[torch.Tensor]]:
    """Summed next-token cross-entropy, counted positions and per-batch argmax predictions.

    Returns:
        ``(nll_sum, positions, predictions)``; ``predictions[i]`` is ``[B, T]`` int64 for batch ``i``.

    """
    was_training = model.training
    model.eval()
    nll, count, predictions = 0.0, 0, []
    for batch in batches:
        with context(autocast):
            logits = model(**model_inputs(batch)).logits
        logits = logits.float()
        labels = batch["labels"]
        nll += float(
            F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        )
        count += int((labels != -100).sum())
        predictions.append(logits.argmax(-1))
    model.train(was_training)
    return nll, count, predictions


class CausalLM(Task):
    """Causal LM distillation: ``[B, T, V]`` logits, next-token labels; perplexity and agreement."""

    name = "causal_lm"
    info = TaskInfo(name="causal_lm", labels="token", logits="token")
    metric = "perplexity"
    metrics = ("perplexity", "loss", "agreement")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._teacher_predictions: list[torch.Tensor] | None = None
        self._teacher_nll: tuple[float, int] | None = None

    def load_data(self, tokenizer: Any) -> TaskData:
        """Text blocks of ``data.max_length`` tokens (packed unless ``data.packing`` is false)."""
        packing = self.config.data.packing is not False
        return load_text_data(self.config.data, tokenizer, packing)

    def collator(self, tokenizer: Any) -> Callable:
        """Padding plus next-token labels."""
        return NextTokenCollator(tokenizer)

    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[dict[str, torch.Tensor]],
        accelerator: Any,
        autocast: Autocast | None = None,
        teacher: nn.Module | None = None,
    ) -> dict[str, float]:
        """Perplexity and mean next-token loss of ``model``; agreement with ``teacher`` when given."""
        batches = list(on_device(batches, accelerator))
        nll, count, predictions = next_token_stats(model, batches, autocast)
        metrics = {"loss": nll / max(count, 1), "perplexity": math.exp(min(nll / max(count, 1), 50.0))}
        if teacher is not None:
            if self._teacher_predictions is None:  # the frozen teacher's answers do not change
                t_nll, t_count, self._teacher_predictions = next_token_stats(teacher, batches, autocast)
                self._teacher_nll = (t_nll, t_count)
            agree = sum(
                int(((s == t) & (b["labels"] != -100)).sum())
                for s, t, b in zip(predictions, self._teacher_predictions, batches, strict=True)
            )
            metrics["agreement"] = agree / max(count, 1)
        metrics["positions"] = count
        return metrics

    def describe(self, metrics: dict[str, float]) -> str:
        """``perplexity 41.2 agreement 0.44``."""
        text = f"perplexity {metrics['perplexity']:.2f} loss {metrics['loss']:.4f}"
        return text + (f" agreement {metrics['agreement']:.4f}" if "agreement" in metrics else "")

    def report(
        self,
        *,
        student: nn.Module,
        teacher: nn.Module,
        data: TaskData,
        collator: Callable,
        tokenizer: Any,
        accelerator: Any,
        autocast: Autocast,
    ) -> dict[str, Any]:
        """Teacher perplexity, tokens/s of both models and a greedy continuation of one held-out prompt."""
        batches = first_batches(data.eval, collator, accelerator, examples=16, batch=8)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        with autocast():
            seconds = {
                name: time_forward(m, batches, repeats=3)
                for name, m in (("teacher", teacher), ("student", student))
            }
        prompt_ids = data.eval[0]["input_ids"][: max(4, min(16, len(data.eval[0]["input_ids"]) // 2))]
        prompt = torch.tensor([prompt_ids], device=accelerator.device)
        samples = {
            name: greedy_continuation(m, prompt, tokenizer, self.config.evaluation.sample_tokens)
            for name, m in (("teacher", teacher), ("student", student))
        }
        return {
            "prompt": tokenizer.decode(prompt_ids),
            "samples": samples,
            "tokens_per_second": {k: tokens / v if v > 0 else math.nan for k, v in seconds.items()},
            "throughput_method": f"forward over {tokens} held-out tokens, median of 3 passes after a warm-up",
        }

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """Perplexity, parameters and tokens/s of both models; agreement; the two continuations."""
        teacher, student = summary["teacher"], summary["student"]
        speed = summary.get("tokens_per_second", {})
        lines = [f"{'':10} {'perplexity':>11} {'params':>13} {'tokens/s':>9}"]
        for name, part in (("teacher", teacher), ("student", student)):
            lines.append(
                f"{name:10} {part['eval']['perplexity']:11.2f} {part['parameters']:13,} "
                f"{speed.get(name, math.nan):9.0f}"
            )
        if "agreement" in student["eval"]:
            lines.append(f"top-1 next-token agreement with the teacher: {student['eval']['agreement']:.4f}")
        lines.append(
            f"held-out positions: {student['eval']['positions']}  "
            f"(trained on {summary['train_examples']} blocks)"
        )
        if "samples" in summary:
            lines.append(f"prompt: {summary['prompt']!r}")
            lines += [f"  {name}: {text!r}" for name, text in summary["samples"].items()]
        return lines


@torch.no_grad()
def greedy_continuation(model: nn.Module, prompt: torch.Tensor, tokenizer: Any, tokens: int) -> str:
    """Greedy decoding of ``tokens`` new tokens after ``prompt [1, P]``; returns the new text."""
    was_training = model.training
    model.eval()
    ids = prompt
    for _ in range(tokens):  # plain loop: works for any causal LM, cache or not
        next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        if tokenizer.eos_token_id is not None and int(next_id) == tokenizer.eos_token_id:
            break
    model.train(was_training)
    return tokenizer.decode(ids[0, prompt.shape[1] :], skip_special_tokens=True)
