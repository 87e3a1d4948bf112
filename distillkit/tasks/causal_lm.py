"""``causal_lm``: distil a causal language model into a smaller one on text.

Batches carry ``labels [B, T]``: the next token of each position (-100 at padding and at the last position;
with prompt/completion data also at every position whose next token is part of the prompt), so ``ce`` is the
language-modelling loss and ``kd`` compares next-token distributions at the same positions. A student with its
own tokenizer reads its own tokens of the same text, the teacher its own (:mod:`distillkit.tasks.streams`;
``teacher_`` keys). Evaluation: perplexity of the student (and, once, of the teacher) on held-out text, bits
per byte of both (comparable across tokenizers), top-1 next-token agreement between the two when they share a
tokenizer, and ``sample_nll``: the teacher's mean per-token negative log-likelihood of continuations the
student samples from held-out prompts (for the teacher itself: of its own samples, the reference line).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from distillkit.config import DistillConfig
from distillkit.data import TaskData
from distillkit.errors import ConfigError
from distillkit.objective.taps import teacher_view
from distillkit.objective.terms import TaskInfo
from distillkit.tasks.base import Batch, EvalContext, ReportContext, on_device, time_forward
from distillkit.tasks.sampling import Sampling, end_and_pad, sample_batch
from distillkit.tasks.streams import NOT_TEXT, TokenStreamCollator, load_token_streams
from distillkit.tasks.tokens import TokenTask, token_stats
from distillkit.text_data import load_text_data

SAMPLE_SEED = 1234
"""Seeds the continuations ``sample_nll`` scores (the same at every evaluation and in every run)."""

DEFAULT_PROMPT_TOKENS = 16
"""Prompt length of ``sample_nll`` without ``train.generation`` (at most half of ``data.max_length``)."""


class NextTokenCollator(TokenStreamCollator):
    """Pads each token stream and adds its next-token ``labels [B, T]`` (-100 where nothing is predicted).

    Per stream (the student's, and the teacher's under ``teacher_`` keys), from the rows' per-token columns:
    ``label_bytes [B, T]``, the UTF-8 bytes of the text the label token covers (-1: not scored in bits per
    byte), and ``label_spans [B, T, 2]``, its character span (-1: none; cross-tokenizer rows only). With
    ``prompt_lengths`` (prompt/completion data) the positions whose next token belongs to the prompt are -100
    too: only the completion is counted.
    """

    def __call__(self, rows: Any) -> dict[str, torch.Tensor]:
        """Collates ``rows`` into a batch dict."""
        batch = super().__call__(rows)
        for prefix, _ in self.streams:
            ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
            ignored = mask[:, 1:] == 0
            if not prefix and "prompt_lengths" in batch:  # only the completion is counted
                positions = torch.arange(ids.shape[1] - 1)[None]
                ignored = ignored | (positions < batch["prompt_lengths"][:, None] - 1)
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = ids[:, 1:].masked_fill(ignored, -100)
            labels = labels.masked_fill(mask == 0, -100)  # a padded position predicts nothing
            batch[f"{prefix}labels"] = labels
            for key, name in (("token_bytes", "label_bytes"), ("spans", "label_spans")):
                if f"{prefix}{key}" in batch:
                    per_token = batch.pop(f"{prefix}{key}")
                    shifted = torch.full_like(per_token, NOT_TEXT)
                    shifted[:, :-1] = per_token[:, 1:]
                    shifted[labels == -100] = NOT_TEXT
                    batch[f"{prefix}{name}"] = shifted
        return batch


class CausalLM(TokenTask):
    """Causal LM distillation: ``[B, T, V]`` logits, next-token labels; perplexity and agreement."""

    name = "causal_lm"
    info = TaskInfo(name="causal_lm", labels="token", logits="token")
    metric = "perplexity"
    metrics = ("perplexity", "loss", "agreement", "bits_per_byte", "sample_nll")
    lower_is_better = frozenset({"loss", "perplexity", "bits_per_byte", "sample_nll"})
    reuses_teacher_predictions = True
    cross_tokenizer = True

    def __init__(self, config: DistillConfig) -> None:
        super().__init__(config)
        self.sampling: Sampling | None = None  # set by load_data (the tokenizer's special tokens)

    def load_data(self, tokenizer: Any, teacher_tokenizer: Any = None) -> TaskData:
        """Text blocks of ``data.max_length`` student tokens, or prompt/completion examples.

        Text is packed unless ``data.packing`` is false; with ``teacher_tokenizer`` (a student with its own
        tokenizer) each block also carries the teacher's tokens of the same text. The end-of-text and padding
        tokens are kept for ``sample_nll``.

        Raises:
            ConfigError: For prompt/completion data or sampled sequences across two tokenizers.

        """
        data, generation = self.config.data, self.config.train.generation
        if teacher_tokenizer is not None and (data.prompt_column or (generation and generation.samples)):
            field = "data.prompt_column" if data.prompt_column else "train.generation"
            raise ConfigError(
                f"{field} works with one tokenizer, but the student's differs from the teacher's; remove "
                f"{field}, or give the student the teacher's tokenizer"
            )
        end, pad = end_and_pad(tokenizer)
        self.sampling = Sampling(max_new_tokens=self.config.evaluation.sample_tokens, end_id=end, pad_id=pad)
        if data.prompt_column is not None:  # prompt/completion examples, never packed
            limit = generation.prompt_tokens if generation is not None else None
            return load_text_data(data, tokenizer, False, prompt_limit=limit)
        return load_token_streams(data, tokenizer, teacher_tokenizer, data.packing is not False)

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
        same_tokens = all(teacher_view(b) is b for b in batches)  # samples are the student's tokens
        if prompts > 0 and self.sampling is not None and same_tokens:
            scorer = context.teacher if context.teacher is not None else model
            nll, tokens = sampled_nll(
                model, scorer, batches, prompts, self.prompt_tokens, self.sampling, context.autocast
            )
            metrics["sample_nll"] = nll / max(tokens, 1)
            metrics["sampled_tokens"] = tokens
        return metrics

    def collator(self, tokenizer: Any, teacher_tokenizer: Any = None) -> Callable:
        """Padding plus next-token labels, per token stream."""
        return NextTokenCollator(tokenizer, teacher_tokenizer)

    def describe(self, metrics: dict[str, float]) -> str:
        """``perplexity 41.20 loss 3.7184 bits/byte 1.1200 agreement 0.4400 sample_nll 2.9051``."""
        text = f"perplexity {metrics['perplexity']:.2f} loss {metrics['loss']:.4f}"
        if "bits_per_byte" in metrics:
            text += f" bits/byte {metrics['bits_per_byte']:.4f}"
        text += f" agreement {metrics['agreement']:.4f}" if "agreement" in metrics else ""
        return text + (f" sample_nll {metrics['sample_nll']:.4f}" if "sample_nll" in metrics else "")

    def report(self, context: ReportContext) -> dict[str, Any]:
        """Tokens/s of both models and a greedy continuation of one held-out prompt by each."""
        batches = context.eval_batches(examples=16, batch=8)
        tokens, seconds = {}, {}
        with context.autocast():
            for name, model in context.models:
                own = batches if name == "student" else [teacher_view(b) for b in batches]
                tokens[name] = sum(int(b["attention_mask"].sum()) for b in own)
                seconds[name] = time_forward(model, own, repeats=3)
        mine, cross = context.student_tokenizer, context.student_tokenizer is not context.tokenizer
        first = context.data.eval[0]["input_ids"]
        prompt_ids = first[: max(4, min(16, len(first) // 2))]
        prompt = mine.decode(prompt_ids)
        samples = {}
        for name, model in context.models:
            tokenizer = mine if name == "student" else context.tokenizer
            ids = (
                prompt_ids if tokenizer is mine else tokenizer(prompt, add_special_tokens=False)["input_ids"]
            )
            ids = torch.tensor([ids], device=context.accelerator.device)
            samples[name] = greedy_continuation(model, ids, tokenizer, self.config.evaluation.sample_tokens)
        counted = (
            f"{tokens['student']} held-out tokens"
            if not cross
            else f"the same text ({tokens['student']} student and {tokens['teacher']} teacher tokens)"
        )
        return {
            "prompt": prompt,
            "samples": samples,
            "tokens_per_second": {k: tokens[k] / v if v > 0 else math.nan for k, v in seconds.items()},
            "throughput_method": f"forward over {counted}, median of 3 passes after a warm-up",
            "cross_tokenizer": cross,
        }

    def summary_lines(self, summary: dict[str, Any]) -> list[str]:
        """Perplexity, bits per byte, parameters and tokens/s of both models; agreement; the continuations."""
        teacher, student = summary["teacher"], summary["student"]
        speed = summary.get("tokens_per_second", {})
        lines = [f"{'':10} {'perplexity':>11} {'bits/byte':>9} {'params':>13} {'tokens/s':>9}"]
        for name, part in (("teacher", teacher), ("student", student)):
            held_out = part["eval"]
            lines.append(
                f"{name:10} {held_out['perplexity']:11.2f} {held_out.get('bits_per_byte', math.nan):9.4f} "
                f"{part['parameters']:13,} {speed.get(name, math.nan):9.0f}"
            )
        if summary.get("cross_tokenizer"):
            lines.append("the two tokenizers differ: perplexity is per token of each; compare bits per byte")
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
