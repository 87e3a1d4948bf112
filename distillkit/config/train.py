"""Optimisation and bookkeeping of a run (``train:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distillkit.config.base import Strict


class FSDPConfig(Strict):
    """Settings of ``train.strategy: fsdp`` (``train.fsdp``).

    Attributes:
        teacher_offload: Keep each live teacher's sharded transformer blocks in CPU memory between uses;
            a block is copied to the device and all-gathered only while it runs (FSDP2's
            ``CPUOffloadPolicy``). Its embeddings, final norm and output layer stay on the device.

    """

    teacher_offload: bool = False


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
        strategy: How several processes share the work: ``ddp`` replicates the student, its optimizer state
            and the teachers in every process and averages gradients; ``fsdp`` shards the student, the
            objective's heads, their gradients and optimizer state, and every live teacher's transformer
            blocks across processes (PyTorch FSDP2), gathering one block at a time while it runs.
        fsdp: Settings of the ``fsdp`` strategy.

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
    strategy: Literal["ddp", "fsdp"] = "ddp"
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)

    @model_validator(mode="after")
    def _fsdp_settings_need_fsdp(self) -> TrainConfig:
        changed = sorted(k for k, v in self.fsdp if v != FSDPConfig.model_fields[k].default)
        if self.strategy != "fsdp" and changed:
            raise ValueError(
                f"train.fsdp ({', '.join(changed)}) applies to train.strategy: fsdp, but the strategy is "
                f"'{self.strategy}'; set train.strategy: fsdp or remove train.fsdp"
            )
        return self
