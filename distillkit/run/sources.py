"""Where each micro-batch's sequences come from: the data, the student's samples or the teacher's.

With ``train.generation`` the loop hands every micro-batch to a :class:`SequenceSource` first (the
``sampling`` phase). One seeded draw (:class:`SourceDraw`) picks its source: with probability
``student_fraction`` the student samples continuations of the batch's prompts (on-policy distillation),
with probability ``teacher_fraction`` the main teacher does (online sequence-level KD), otherwise the data
block is used as it is. The draw's generator is its own (the data order, dropout and initialisation are
untouched by it) and is saved in every checkpoint, so a resumed run draws and samples exactly as an
uninterrupted one. Every process draws the same sources (the same seed), so all ranks sample on the same
micro-batches; each samples its own prompts with its own seed.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn

from distillkit.config import GenerationSettings
from distillkit.tasks.base import Autocast, Batch
from distillkit.tasks.sampling import Sampling, end_and_pad, sample_batch

SOURCES = ("student", "teacher", "data")
"""Where a micro-batch's sequences come from."""


class SourceDraw:
    """One seeded draw per micro-batch: its source and, for a sampled one, the seed it samples with.

    Args:
        student_fraction: Probability of ``student``.
        teacher_fraction: Probability of ``teacher``.
        seed: Seeds the draw's own generator (NumPy PCG64).

    """

    def __init__(self, student_fraction: float, teacher_fraction: float, seed: int) -> None:
        self.student_fraction, self.teacher_fraction = student_fraction, teacher_fraction
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def next(self) -> tuple[str, int]:
        """Returns ``(source, sampling seed)``; both numbers are drawn every time, whatever the source."""
        u = float(self._rng.random())
        seed = int(self._rng.integers(0, 2**62))
        if u < self.student_fraction:
            return "student", seed
        if u < self.student_fraction + self.teacher_fraction:
            return "teacher", seed
        return "data", seed

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (JSON-able)."""
        return self._rng.bit_generator.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self._rng.bit_generator.state = state


class SequenceSource:
    """Replaces a micro-batch by sampled sequences when the draw says so, and counts what it sampled.

    Args:
        settings: ``train.generation``.
        sampling: The sampling settings (end-of-text and padding tokens, ``data.max_length`` bound).
        models: ``{"student": ..., "teacher": ...}``: the models that sample (unwrapped, on the device).
        seed: The run's seed (seeds the draw).
        rank: This process's index (its samples differ from other ranks').
        autocast: The run's mixed precision.

    Attributes:
        generated_tokens: Tokens sampled since :meth:`take_counts` was last called.
        sources: Micro-batches per source since then.
        seconds: Seconds spent sampling since then.

    """

    def __init__(
        self,
        settings: GenerationSettings,
        sampling: Sampling,
        models: dict[str, nn.Module],
        seed: int,
        rank: int = 0,
        autocast: Autocast | None = None,
    ) -> None:
        self.settings, self.sampling, self.models = settings, sampling, models
        self.rank, self.autocast = rank, autocast
        self.draw = SourceDraw(settings.student_fraction, settings.teacher_fraction, seed)
        self.generated_tokens, self.sources, self.seconds = 0, Counter(), 0.0
        self.last = "data"

    def __call__(self, batch: Batch) -> Batch:
        """The micro-batch to train on: ``batch`` itself, or its prompts continued by the drawn model."""
        source, seed = self.draw.next()
        self.last = source
        self.sources[source] += 1
        if source == "data":
            return batch
        started = time.perf_counter()
        sampled = sample_batch(
            self.models[source],
            batch,
            self.settings.prompt_tokens,
            self.sampling,
            seed=(seed + self.rank) % 2**63,
            autocast=self.autocast,
        )
        self.generated_tokens += sampled.generated_tokens
        self.seconds += time.perf_counter() - started
        return sampled.batch

    def take_counts(self, accelerator: Any = None) -> dict[str, Any]:
        """What was sampled since the last call, then counts afresh (all processes call it together).

        Args:
            accelerator: With several processes, ``generated_tokens`` is summed over them.

        Returns:
            ``generated_tokens`` (all processes), ``sampled_tokens_per_second`` (this process's tokens per
            second of sampling) and ``sources``: this process's micro-batches per source.

        """
        tokens = self.generated_tokens
        if accelerator is not None and accelerator.num_processes > 1:
            total = torch.tensor(float(tokens), dtype=torch.float64, device=accelerator.device)
            tokens = int(accelerator.reduce(total, "sum"))
        counts = {
            "generated_tokens": tokens,
            "sampled_tokens_per_second": round(self.rate(), 3),
            "sources": {name: self.sources[name] for name in SOURCES},
        }
        self.generated_tokens, self.sources, self.seconds = 0, Counter(), 0.0
        return counts

    def rate(self) -> float:
        """Tokens sampled per second of sampling since the counts were last taken."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the draw's generator."""
        return {"draw": self.draw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned."""
        self.draw.load_state_dict(state["draw"])


def sampling_of(generation: GenerationSettings, tokenizer: Any, max_length: int) -> Sampling:
    """The sampling settings of ``train.generation``.

    Its temperature and top-p, the tokenizer's end-of-text and padding tokens, ``max_new_tokens`` new tokens
    at most, prompt and continuation within ``max_length``.
    """
    end, pad = end_and_pad(tokenizer)
    return Sampling(
        max_new_tokens=generation.max_new_tokens or max_length,
        end_id=end,
        pad_id=pad,
        temperature=generation.temperature,
        top_p=generation.top_p,
        max_length=max_length,
    )


def sequence_source(
    generation: GenerationSettings | None,
    tokenizer: Any,
    max_length: int,
    models: dict[str, nn.Module | None],
    seed: int,
    rank: int = 0,
    autocast: Autocast | None = None,
) -> SequenceSource | None:
    """The run's sequence source, or None when ``train.generation`` is not set.

    Args:
        generation: ``train.generation``.
        tokenizer: The run's tokenizer (end-of-text and padding tokens).
        max_length: ``data.max_length``: prompt plus sampled tokens stay within it.
        models: ``student`` and the main ``teacher`` (None: read from a cache; then it cannot sample).
        seed: ``train.seed``.
        rank: This process's index.
        autocast: The run's mixed precision.

    """
    if generation is None:
        return None
    live = {name: model for name, model in models.items() if isinstance(model, nn.Module)}
    sampling = sampling_of(generation, tokenizer, max_length)
    return SequenceSource(generation, sampling, live, seed, rank, autocast)
