"""Optimisation and bookkeeping of a run (``train:``)."""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distillkit.config.base import Strict

TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")
"""The experiment trackers ``train.report_to`` accepts (accelerate's trackers of those names)."""

_NOTICES: dict = {}
"""The warnings registry of the notices below (each is shown once per process)."""


class FSDPConfig(Strict):
    """Settings of ``train.strategy: fsdp`` (``train.fsdp``).

    Attributes:
        teacher_offload: Keep each live teacher's sharded transformer blocks in CPU memory between uses;
            a block is copied to the device and all-gathered only while it runs (FSDP2's
            ``CPUOffloadPolicy``). Its embeddings, final norm and output layer stay on the device.

    """

    teacher_offload: bool = False


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
        report_to: Experiment trackers that receive the resolved config, every term's loss, the learning rate
            and the evaluation metrics (besides ``metrics.jsonl``): ``tensorboard``, ``mlflow``, ``trackio``,
            ``wandb``. A tracker whose package is missing stops the run before any weights load.
        tensorboard: The former switch for TensorBoard scalars, read as ``report_to: [tensorboard]`` (true) or
            nothing (false), with a notice.
        eval_batch_size: Examples per evaluation batch (default: ``batch_size``).
        fused_logits: Compute the logit-reading terms (``kd``, ``ce``) from the models' output layers with
            the fused linear-divergence op, never building ``[tokens, vocab]`` logits for training: ``auto``
            where every logit-reading term can and each model's logits are its last hidden state times its
            output embedding (causal LMs), ``always`` (refuse the run where not), ``never``.
        strategy: How several processes share the work: ``ddp`` replicates the student, its optimizer state
            and the teachers in every process and averages gradients; ``fsdp`` shards the student, the
            objective's heads, their gradients and optimizer state, and every live teacher's transformer
            blocks across processes (PyTorch FSDP2), gathering one block at a time while it runs.
        fsdp: Settings of the ``fsdp`` strategy.
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
    report_to: list[Literal[TRACKERS]] = Field(default_factory=list)
    tensorboard: bool | None = None
    eval_batch_size: int | None = Field(default=None, ge=1)
    fused_logits: Literal["auto", "always", "never"] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    generation: GenerationSettings | None = None

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_several(cls, value: Any) -> Any:
        """``report_to: tensorboard`` is one tracker; ``null`` none."""
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _former_tensorboard_switch(self) -> TrainConfig:
        """Reads ``tensorboard: true|false`` as ``report_to``, once, and says so."""
        self.report_to = list(dict.fromkeys(self.report_to))
        if self.tensorboard is None:
            return self
        given, read = ("true", "[tensorboard]") if self.tensorboard else ("false", "[]")
        warnings.warn_explicit(  # one line, shown once: no source line of pydantic's to point at
            f"train.tensorboard is now train.report_to: read `tensorboard: {given}` as `report_to: {read}`; "
            "rename it in the config",
            FutureWarning,
            filename="config",
            lineno=0,
            module=__name__,
            registry=_NOTICES,
        )
        if self.tensorboard and "tensorboard" not in self.report_to:
            self.report_to.append("tensorboard")
        self.tensorboard = None
        return self

    @model_validator(mode="after")
    def _fsdp_settings_need_fsdp(self) -> TrainConfig:
        changed = sorted(k for k, v in self.fsdp if v != FSDPConfig.model_fields[k].default)
        if self.strategy != "fsdp" and changed:
            raise ValueError(
                f"train.fsdp ({', '.join(changed)}) applies to train.strategy: fsdp, but the strategy is "
                f"'{self.strategy}'; set train.strategy: fsdp or remove train.fsdp"
            )
        return self
