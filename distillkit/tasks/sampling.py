"""Sampled continuations of a causal LM, as batches the objective reads.

Three steps, each a function, all batched and on the batch's device:

1. :func:`prompts_of`: the prompts of a batch (its rows' leading ``prompt_tokens`` tokens, or each row's
   ``prompt_lengths`` of a prompt/completion data set), left-padded ``[B, P]`` as generation wants them;
2. :func:`sample`: the model samples continuations with transformers' ``generate`` (KV cache, the model in
   eval mode without gradients, only the :class:`Sampling` settings, a seed of its own that leaves every
   other random generator as it was); a row ends at the end-of-text token;
3. :func:`join`: prompt and continuation (up to and including the end-of-text token) of each row, right-padded
   like a data batch (positions 0, 1, ... from the first token, as in generation), with next-token ``labels``
   and a ``loss_mask`` that count exactly the positions whose next token was sampled.

:func:`sample_batch` runs the three. Example::

    sampling = Sampling(max_new_tokens=48, end_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    sampled = sample_batch(student, batch, prompt_tokens=16, sampling=sampling, seed=7)
    sampled.batch["loss_mask"]   # [B, T] bool: True where the next token is a sampled one
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from distillkit.errors import DistillkitError
from distillkit.tasks.base import Autocast, Batch, autocast_scope
from distillkit.text_data import end_of_text_id

__all__ = [
    "Prompts",
    "Sampled",
    "Sampling",
    "end_and_pad",
    "join",
    "prompts_of",
    "sample",
    "sample_batch",
]


def end_and_pad(tokenizer: Any) -> tuple[int | None, int]:
    """The tokenizer's end-of-text token (None without one) and its padding token (else the end, else 0)."""
    end = end_of_text_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    return end, pad if pad is not None else 0


@dataclass(frozen=True)
class Sampling:
    """How continuations are sampled.

    Attributes:
        max_new_tokens: Tokens sampled per prompt at most.
        end_id: The token that ends a continuation (the tokenizer's end-of-text token), or None (every
            continuation runs to ``max_new_tokens``).
        pad_id: The padding token.
        temperature: Softmax temperature of the sampling distribution.
        top_p: Nucleus sampling threshold (1: the whole vocabulary).
        max_length: Prompt plus continuation are at most this long (None: no bound): fewer new tokens are
            sampled after longer prompts.

    """

    max_new_tokens: int
    end_id: int | None
    pad_id: int
    temperature: float = 1.0
    top_p: float = 1.0
    max_length: int | None = None

    def new_tokens(self, prompt_width: int) -> int:
        """Tokens sampled at most after prompts ``prompt_width`` tokens wide."""
        if self.max_length is None:
            return self.max_new_tokens
        return max(1, min(self.max_new_tokens, self.max_length - prompt_width))

    def generation_config(self, prompt_width: int) -> GenerationConfig:
        """The ``generate`` settings of exactly this sampling (no top-k, repetition penalty or the like)."""
        return GenerationConfig(
            do_sample=True,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,
            num_beams=1,
            max_new_tokens=self.new_tokens(prompt_width),
            eos_token_id=self.end_id,
            pad_token_id=self.pad_id,
            use_cache=True,
        )


@dataclass(frozen=True)
class Prompts:
    """Left-padded prompts.

    Attributes:
        ids: ``[B, P]`` int64 token ids, padding first.
        mask: ``[B, P]`` int64, 1 on the prompt's tokens.
        lengths: ``[B]`` int64 tokens of each prompt (at least 1).

    """

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


@dataclass(frozen=True)
class Sampled:
    """A batch of sampled sequences.

    Attributes:
        batch: ``input_ids``, ``attention_mask``, ``labels``, ``loss_mask`` ``[B, T]`` and ``prompt_lengths``
            ``[B]`` (plus the source batch's ``example_ids``).
        lengths: ``[B]`` int64 tokens sampled per row (the end-of-text token included).
        generated_tokens: ``lengths.sum()``.

    """

    batch: Batch
    lengths: torch.Tensor
    generated_tokens: int


def prompts_of(batch: Batch, prompt_tokens: int, pad_id: int) -> Prompts:
    """The prompts of a batch, left-padded.

    Args:
        batch: ``input_ids [B, T]`` (right- or left-padded; ``attention_mask [B, T]`` marks real tokens) and,
            for prompt/completion data, ``prompt_lengths [B]``.
        prompt_tokens: Without ``prompt_lengths``: each row's first ``prompt_tokens`` tokens (all of a shorter
            row).
        pad_id: The padding token.

    Returns:
        The prompts.

    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    real = mask.sum(1)
    lengths = batch.get("prompt_lengths")
    lengths = real.clamp(max=prompt_tokens) if lengths is None else torch.minimum(lengths.to(real), real)
    lengths = lengths.clamp(min=1)
    leading_pads = (mask.cumsum(1) == 0).sum(1)
    width = int(lengths.max())
    positions = torch.arange(width, device=ids.device)[None]
    offset = (width - lengths)[:, None]
    source = (leading_pads[:, None] + positions - offset).clamp(0, ids.shape[1] - 1)
    in_prompt = positions >= offset
    prompt_ids = torch.where(in_prompt, ids.gather(1, source), torch.full_like(source, pad_id))
    return Prompts(ids=prompt_ids, mask=in_prompt.long(), lengths=lengths.long())


@torch.no_grad()
def sample(
    model: nn.Module, prompts: Prompts, sampling: Sampling, seed: int, autocast: Autocast | None = None
) -> torch.Tensor:
    """Samples continuations of ``prompts`` with ``model.generate`` (KV cache, batched).

    The model runs in eval mode (no dropout) without gradients and with only ``sampling``'s settings (its own
    ``generation_config`` is set aside meanwhile); its training mode is restored afterwards. The sampling
    draws from a generator seeded with ``seed``: the CPU (and the CUDA device's) random state is the same
    after the call as before it.

    Args:
        model: A causal LM with ``generate`` (transformers' ``GenerationMixin``).
        prompts: Left-padded prompts on the model's device.
        sampling: The sampling settings.
        seed: Seeds this sampling.
        autocast: Mixed precision around the generation (None: the model's own precision).

    Returns:
        ``[B, N]`` int64 sampled tokens; after a row's end-of-text token, padding.

    Raises:
        DistillkitError: If the model cannot generate.

    """
    if not callable(getattr(model, "generate", None)):
        raise DistillkitError(
            f"{type(model).__name__} has no generate(); sampling continuations needs a transformers causal LM"
        )
    device = prompts.ids.device
    config = sampling.generation_config(prompts.ids.shape[1])
    was_training, own_config = model.training, getattr(model, "generation_config", None)
    model.eval()
    model.generation_config = GenerationConfig()
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), autocast_scope(autocast):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            out = model.generate(input_ids=prompts.ids, attention_mask=prompts.mask, generation_config=config)
    finally:
        model.generation_config = own_config
        model.train(was_training)
    return out[:, prompts.ids.shape[1] :]


def join(prompts: Prompts, generated: torch.Tensor, end_id: int | None, pad_id: int) -> Sampled:
    """Each row's prompt and continuation as one right-padded sequence, with the loss on the continuation.

    A continuation is its tokens up to and including its first ``end_id`` (all of them without one).
    Position ``t`` of a sequence predicts token ``t + 1``, so the counted positions are those from the
    prompt's last token to the one before the continuation's last: ``labels`` holds the next token there
    and -100 elsewhere (prompt, padding), and ``loss_mask`` is ``labels != -100``.

    Args:
        prompts: The left-padded prompts ``[B, P]``.
        generated: ``[B, N]`` the sampled tokens (padding after a row's end).
        end_id: The end-of-text token, or None.
        pad_id: The padding token.

    Returns:
        The sequences, their labels and masks, and the tokens sampled per row.

    """
    rows, new = generated.shape
    width = prompts.ids.shape[1]
    if end_id is None:
        lengths = torch.full((rows,), new, dtype=torch.long, device=generated.device)
    else:
        ends = generated == end_id
        lengths = torch.where(
            ends.any(1), ends.int().argmax(1) + 1, torch.full_like(ends[:, 0], new, dtype=torch.long)
        )
    prompt, total = prompts.lengths[:, None], (prompts.lengths + lengths)[:, None]
    positions = torch.arange(int(total.max()), device=generated.device)[None]
    source = torch.where(positions < prompt, width - prompt + positions, width + positions - prompt)
    tokens = torch.cat([prompts.ids, generated], dim=1).gather(1, source.clamp(max=width + new - 1))
    real = positions < total
    ids = torch.where(real, tokens, torch.full_like(tokens, pad_id))
    labels = torch.full_like(ids, -100)
    counted = (positions[:, :-1] >= prompt - 1) & real[:, 1:]
    labels[:, :-1] = torch.where(counted, ids[:, 1:], labels[:, 1:])
    batch = {
        "input_ids": ids,
        "attention_mask": real.long(),
        "labels": labels,
        "loss_mask": labels != -100,
        "prompt_lengths": prompts.lengths,
    }
    return Sampled(batch=batch, lengths=lengths, generated_tokens=int(lengths.sum()))


def sample_batch(
    model: nn.Module,
    batch: Batch,
    prompt_tokens: int,
    sampling: Sampling,
    seed: int,
    autocast: Autocast | None = None,
) -> Sampled:
    """The batch's prompts continued by ``model``: :func:`prompts_of`, :func:`sample`, :func:`join`.

    Args:
        model: The causal LM that samples.
        batch: A data batch (its ``example_ids`` are carried over).
        prompt_tokens: Prompt length (see :func:`prompts_of`).
        sampling: The sampling settings.
        seed: Seeds the sampling.
        autocast: Mixed precision around the generation.

    Returns:
        The sampled sequences as a batch.

    """
    prompts = prompts_of(batch, prompt_tokens, sampling.pad_id)
    generated = sample(model, prompts, sampling, seed, autocast)
    sampled = join(prompts, generated, sampling.end_id, sampling.pad_id)
    carried: dict[str, Any] = {k: batch[k] for k in ("example_ids",) if k in batch}
    sampled.batch.update(carried)
    return sampled
