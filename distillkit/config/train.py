"""Optimisation and bookkeeping of a run (``train:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distillkit.config.base import Strict


class GenerationSettings(Strict):
    """Where each micro-batch's sequences come from (``train.generation``, ``causal_lm`` only).

    One seeded draw per micro-batch picks the source: with probability ``student_fraction`` the student
    samples continuations of the batch's prompts (on-policy distillation, GKD's λ), with probability
    ``teacher_fraction`` the teacher does (online sequence-level KD), otherwise the data block is used as it
    is. On a sampled micro-batch the loss counts only the generated positions (up to and including the
    end-of-text token).

    Attributes:
        student_fraction: Share of micro-batches whose sequences the student samples (λ).
        teacher_fraction: Share of micro-batches whose sequences the main teacher samples.
        prompt_tokens: Prompt length: the leading tokens of each data block, or at most this many (the last
            ones) of a ``data.prompt_column`` prompt. Must be below ``data.max_length``.
        max_new_tokens: Tokens sampled per prompt at most (a sequence ends earlier at the end-of-text
            token). None: up to ``data.max_length`` in all; prompt plus new tokens may not exceed it.
        temperature: Sampling temperature (1: the model's own distribution).
        top_p: Nucleus sampling: sample from the smallest set of tokens whose probability reaches ``top_p``
            (1: the whole vocabulary).

    """

    student_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    teacher_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    prompt_tokens: int = Field(default=16, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _fractions_fit(self) -> GenerationSettings:
        total = self.student_fraction + self.teacher_fraction
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"train.generation.student_fraction + teacher_fraction is {total:g}, above 1; they are "
                "shares of the micro-batches (the rest use the data): lower one of them"
            )
        return self

    @property
    def samples(self) -> bool:
        """Whether any micro-batch is sampled (a fraction above zero)."""
        return self.student_fraction > 0 or self.teacher_fraction > 0


class TrainConfig(Strict):
    """Optimisation and bookkeeping.

    Attributes:
        steps: Optimizer steps.
        batch_size: Examples per micro-batch (per process).
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights).
        warmup_ratio: Fraction of steps of linear warm-up; linear decay to zero afterwards.
        max_grad_norm: Gradient clipping norm (None: no clipping).
        eval_every: Evaluate every N steps (and always at the end).
        save_every: Write a checkpoint every N steps (and always at the end).
        keep_last: Checkpoints kept on disk.
        log_every: Write the running per-term losses to the JSONL log every N steps.
        precision: ``bf16`` autocast, ``fp32``, or ``auto`` (bf16 where the device supports it fast: CUDA).
        seed: Seed of initialisation, data order and dropout.
        on_nonfinite: On a NaN/inf loss term or gradient: ``stop`` the run or ``skip`` the step.
        progress: Show a tqdm progress bar.
        tensorboard: Also write TensorBoard scalars when ``tensorboard`` is installed.
        eval_batch_size: Examples per evaluation batch (default: ``batch_size``).
        fused_logits: Compute the logit-reading terms (``kd``, ``ce``) from the models' output layers with
            the fused linear-divergence op, never building ``[tokens, vocab]`` logits for training: ``auto``
            where every logit-reading term can and each model's logits are its last hidden state times its
            output embedding (causal LMs), ``always`` (refuse the run where not), ``never``.
        generation: ``causal_lm``: sequences sampled by the student or the teacher in place of some data
            blocks (on-policy and sequence-level distillation; see :class:`GenerationSettings`). None: data
            only.

    """

    steps: int = Field(default=100, ge=1)
    batch_size: int = Field(default=16, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=5e-5, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    eval_every: int | None = Field(default=None, ge=1)
    save_every: int | None = Field(default=None, ge=1)
    keep_last: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    seed: int = 0
    on_nonfinite: Literal["stop", "skip"] = "stop"
    progress: bool = True
    tensorboard: bool = True
    eval_batch_size: int | None = Field(default=None, ge=1)
    fused_logits: Literal["auto", "always", "never"] = "auto"
    generation: GenerationSettings | None = None
