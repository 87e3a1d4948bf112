"""``causal_lm``: distil a causal language model into a smaller one on text.

Batches carry ``labels [B, T]``: the next token of each position (-100 at padding and at the last position),
so ``ce`` is the language-modelling loss and ``kd`` compares next-token distributions at the same positions.
A student with its own tokenizer reads its own tokens of the same text, the teacher its own
(:mod:`distillkit.tasks.streams`; ``teacher_`` keys). Evaluation: perplexity of the student (and, once, of
the teacher) on held-out text, bits per byte of both (comparable across tokenizers), and top-1 next-token
agreement between the two when they share a tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from distillkit.data import TaskData
from distillkit.objective.taps import teacher_view
from distillkit.objective.terms import TaskInfo
from distillkit.tasks.base import ReportContext, time_forward
from distillkit.tasks.streams import NOT_TEXT, TokenStreamCollator, load_token_streams
from distillkit.tasks.tokens import TokenTask


class NextTokenCollator(TokenStreamCollator):
    """Pads each token stream and adds its next-token ``labels [B, T]`` (-100 where nothing is predicted).

    Per stream (the student's, and the teacher's under ``teacher_`` keys), from the rows' per-token columns:
    ``label_bytes [B, T]``, the UTF-8 bytes of the text the label token covers (-1: not scored in bits per
    byte), and ``label_spans [B, T, 2]``, its character span (-1: none; cross-tokenizer rows only).
    """

    def __call__(self, rows: Any) -> dict[str, torch.Tensor]:
        """Collates ``rows`` into a batch dict."""
        batch = super().__call__(rows)
        for prefix, _ in self.streams:
            ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
            labels = torch.full_like(ids, -100)
            labels[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
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
    metrics = ("perplexity", "loss", "agreement", "bits_per_byte")
    lower_is_better = frozenset({"loss", "perplexity", "bits_per_byte"})
    reuses_teacher_predictions = True
    cross_tokenizer = True

    def load_data(self, tokenizer: Any, teacher_tokenizer: Any = None) -> TaskData:
        """Text blocks of ``data.max_length`` student tokens (packed unless ``data.packing`` is false)."""
        packing = self.config.data.packing is not False
        return load_token_streams(self.config.data, tokenizer, teacher_tokenizer, packing)

    def collator(self, tokenizer: Any, teacher_tokenizer: Any = None) -> Callable:
        """Padding plus next-token labels, per token stream."""
        return NextTokenCollator(tokenizer, teacher_tokenizer)

    def describe(self, metrics: dict[str, float]) -> str:
        """``perplexity 41.2 loss 3.7 bits/byte 1.12 agreement 0.44``."""
        text = f"perplexity {metrics['perplexity']:.2f} loss {metrics['loss']:.4f}"
        if "bits_per_byte" in metrics:
            text += f" bits/byte {metrics['bits_per_byte']:.4f}"
        return text + (f" agreement {metrics['agreement']:.4f}" if "agreement" in metrics else "")

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
