"""``causal_lm``: distil a causal language model into a smaller one on text.

Batches carry ``labels [B, T]``: the next token of each position (-100 at padding and at the last position),
so ``ce`` is the language-modelling loss and ``kd`` compares next-token distributions at the same positions.
Evaluation: perplexity of the student (and, once, of the teacher) on held-out text, and top-1 next-token
agreement between the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from distillkit.data import Collator, TaskData, load_text_data
from distillkit.objective.terms import TaskInfo
from distillkit.tasks.base import ReportContext, time_forward
from distillkit.tasks.tokens import TokenTask


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


class CausalLM(TokenTask):
    """Causal LM distillation: ``[B, T, V]`` logits, next-token labels; perplexity and agreement."""

    name = "causal_lm"
    info = TaskInfo(name="causal_lm", labels="token", logits="token")
    metric = "perplexity"
    metrics = ("perplexity", "loss", "agreement")
    reuses_teacher_predictions = True

    def load_data(self, tokenizer: Any) -> TaskData:
        """Text blocks of ``data.max_length`` tokens (packed unless ``data.packing`` is false)."""
        packing = self.config.data.packing is not False
        return load_text_data(self.config.data, tokenizer, packing)

    def collator(self, tokenizer: Any) -> Callable:
        """Padding plus next-token labels."""
        return NextTokenCollator(tokenizer)

    def describe(self, metrics: dict[str, float]) -> str:
        """``perplexity 41.2 agreement 0.44``."""
        text = f"perplexity {metrics['perplexity']:.2f} loss {metrics['loss']:.4f}"
        return text + (f" agreement {metrics['agreement']:.4f}" if "agreement" in metrics else "")

    def report(self, context: ReportContext) -> dict[str, Any]:
        """Tokens/s of both models and a greedy continuation of one held-out prompt."""
        batches = context.eval_batches(examples=16, batch=8)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        with context.autocast():
            seconds = {name: time_forward(m, batches, repeats=3) for name, m in context.models}
        first = context.data.eval[0]["input_ids"]
        prompt_ids = first[: max(4, min(16, len(first) // 2))]
        prompt = torch.tensor([prompt_ids], device=context.accelerator.device)
        new_tokens = self.config.evaluation.sample_tokens
        samples = {
            name: greedy_continuation(m, prompt, context.tokenizer, new_tokens) for name, m in context.models
        }
        return {
            "prompt": context.tokenizer.decode(prompt_ids),
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
