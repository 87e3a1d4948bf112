"""``causal_lm``: distil a causal language model into a smaller one on text.

Batches carry ``labels [B, T]``: the next token of each position (-100 at padding and at the last position;
with prompt/completion data also at every position whose next token is part of the prompt), so ``ce`` is the
language-modelling loss and ``kd`` compares next-token distributions at the same positions.
Evaluation: perplexity of the student (and, once, of the teacher) on held-out text, top-1 next-token
agreement between the two, and ``sample_nll``: the teacher's mean per-token negative log-likelihood of
continuations the student samples from held-out prompts (for the teacher itself: of its own samples, the
reference line).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from distillkit.config import DistillConfig
from distillkit.data import Collator, TaskData, load_text_data
from distillkit.objective.terms import TaskInfo
from distillkit.tasks.base import Batch, EvalContext, ReportContext, on_device, time_forward
from distillkit.tasks.sampling import Sampling, end_and_pad, sample_batch
from distillkit.tasks.tokens import TokenTask, token_stats

SAMPLE_SEED = 1234
"""Seeds the continuations ``sample_nll`` scores (the same at every evaluation and in every run)."""

DEFAULT_PROMPT_TOKENS = 16
"""Prompt length of ``sample_nll`` without ``train.generation`` (at most half of ``data.max_length``)."""


class NextTokenCollator(Collator):
    """Pads rows and adds ``labels [B, T]``: ``input_ids`` shifted left, -100 where nothing is predicted.

    With ``prompt_lengths`` (prompt/completion data) the positions whose next token belongs to the prompt
    are -100 too: only the completion is counted.
    """

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Collates ``rows`` into a batch dict."""
        batch = super().__call__(rows)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        ignored = mask[:, 1:] == 0
        if "prompt_lengths" in batch:
            positions = torch.arange(ids.shape[1] - 1)[None]
            ignored = ignored | (positions < batch["prompt_lengths"][:, None] - 1)
        labels = torch.full_like(ids, -100)
        labels[:, :-1] = ids[:, 1:].masked_fill(ignored, -100)
        batch["labels"] = labels
        return batch


class CausalLM(TokenTask):
    """Causal LM distillation: ``[B, T, V]`` logits, next-token labels; perplexity and agreement."""

    name = "causal_lm"
    info = TaskInfo(name="causal_lm", labels="token", logits="token")
    metric = "perplexity"
    metrics = ("perplexity", "loss", "agreement", "sample_nll")
    lower_is_better = frozenset({"loss", "perplexity", "sample_nll"})
    reuses_teacher_predictions = True

    def __init__(self, config: DistillConfig) -> None:
        super().__init__(config)
        self.sampling: Sampling | None = None  # set by load_data (the tokenizer's special tokens)

    def load_data(self, tokenizer: Any) -> TaskData:
        """Text blocks of ``data.max_length`` tokens or prompt/completion examples (and the special tokens).

        Text is packed unless ``data.packing`` is false; the end-of-text and padding tokens are kept for
        ``sample_nll``.
        """
        data, generation = self.config.data, self.config.train.generation
        packing = data.packing is not False and data.prompt_column is None
        end, pad = end_and_pad(tokenizer)
        self.sampling = Sampling(max_new_tokens=self.config.evaluation.sample_tokens, end_id=end, pad_id=pad)
        limit = generation.prompt_tokens if generation is not None else None
        return load_text_data(data, tokenizer, packing, prompt_limit=limit)

    @property
    def prompt_tokens(self) -> int:
        """Prompt length of ``sample_nll``: ``train.generation.prompt_tokens``, else 16 (≤ max_length / 2)."""
        generation = self.config.train.generation
        if generation is not None:
            return generation.prompt_tokens
        return max(1, min(DEFAULT_PROMPT_TOKENS, self.config.data.max_length // 2))

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], context: EvalContext) -> dict[str, float]:
        """Perplexity, loss and agreement (see :class:`TokenTask`), and ``sample_nll``.

        ``sample_nll``: ``model`` samples a continuation of each of the first ``evaluation.sample_prompts``
        held-out prompts (``evaluation.sample_tokens`` new tokens at most, temperature 1, a fixed seed) and
        ``context.teacher`` scores them: its mean negative log-likelihood per sampled token (the end-of-text
        token included). Without a teacher in the context (the teacher being evaluated), ``model`` scores its
        own samples.
        """
        batches = list(on_device(batches, context.accelerator))
        metrics = super().evaluate(model, batches, context)
        prompts = self.config.evaluation.sample_prompts
        if prompts > 0 and self.sampling is not None:
            scorer = context.teacher if context.teacher is not None else model
            nll, tokens = sampled_nll(
                model, scorer, batches, prompts, self.prompt_tokens, self.sampling, context.autocast
            )
            metrics["sample_nll"] = nll / max(tokens, 1)
            metrics["sampled_tokens"] = tokens
        return metrics

    def collator(self, tokenizer: Any) -> Callable:
        """Padding plus next-token labels."""
        return NextTokenCollator(tokenizer)

    def describe(self, metrics: dict[str, float]) -> str:
        """``perplexity 41.20 loss 3.7184 agreement 0.4400 sample_nll 2.9051``."""
        text = f"perplexity {metrics['perplexity']:.2f} loss {metrics['loss']:.4f}"
        text += f" agreement {metrics['agreement']:.4f}" if "agreement" in metrics else ""
        return text + (f" sample_nll {metrics['sample_nll']:.4f}" if "sample_nll" in metrics else "")

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
        if "sample_nll" in student["eval"]:
            reference = teacher["eval"].get("sample_nll", math.nan)
            lines.append(
                f"teacher's NLL per token of sampled continuations: student's samples "
                f"{student['eval']['sample_nll']:.4f}, the teacher's own {reference:.4f}"
            )
        lines.append(
            f"held-out positions: {student['eval']['positions']}  "
            f"(trained on {summary['train_examples']} blocks)"
        )
        if "samples" in summary:
            lines.append(f"prompt: {summary['prompt']!r}")
            lines += [f"  {name}: {text!r}" for name, text in summary["samples"].items()]
        return lines


def sampled_nll(
    writer: nn.Module,
    scorer: nn.Module,
    batches: Sequence[Batch],
    prompts: int,
    prompt_tokens: int,
    sampling: Sampling,
    autocast: Any = None,
) -> tuple[float, int]:
    """The scorer's summed negative log-likelihood of the writer's continuations of held-out prompts.

    Args:
        writer: Samples the continuations (temperature 1, the whole vocabulary, seed :data:`SAMPLE_SEED`).
        scorer: Scores them (eval mode, no gradients).
        batches: Held-out batches; the prompts of their first ``prompts`` rows are continued.
        prompts: How many prompts.
        prompt_tokens: Prompt length (see :func:`~distillkit.tasks.sampling.prompts_of`).
        sampling: End-of-text and padding tokens and ``max_new_tokens``.
        autocast: Mixed precision around sampling and scoring.

    Returns:
        ``(summed NLL in nats, sampled tokens)``; the tokens include each continuation's end-of-text token.

    """
    nll, tokens, left = 0.0, 0, prompts
    for index, batch in enumerate(batches):
        if left <= 0:
            break
        rows = {k: v[:left] for k, v in batch.items()}
        left -= rows["input_ids"].shape[0]
        sampled = sample_batch(
            writer, rows, prompt_tokens, sampling, seed=SAMPLE_SEED + index, autocast=autocast
        )
        stats = token_stats(scorer, [sampled.batch], autocast)
        nll, tokens = nll + stats.nll, tokens + stats.positions
    return nll, tokens


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
